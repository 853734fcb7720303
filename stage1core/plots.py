"""PNG figures for bundles and model cards: FNR/FPR vs threshold, reliability diagram, risk-coverage.

Uses matplotlib's non-interactive Agg backend through the object API (Figure + FigureCanvasAgg), so it
works in headless workers and threads, never touches pyplot's global figure registry, and leaks no
figures. Every function writes its PNG atomically (`storage.atomic_write_bytes`) and returns the path
written.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: Prefect workers and CI have no display

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from stage1core.metrics import ece, fnr_fpr_curve, reliability_curve  # noqa: E402
from stage1core.storage import atomic_write_bytes  # noqa: E402

__all__ = ["plot_fnr_fpr", "plot_reliability", "plot_risk_coverage"]

_DPI = 120
_SIZE = (6.4, 4.8)


def _new_figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=_SIZE, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _finish(fig: Figure, ax: Any, path: str | Path, *, xlabel: str, ylabel: str, title: str, legend: str) -> Path:
    """Label the axes, add the grid and the legend, and write the PNG atomically."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend, fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def plot_fnr_fpr(
    y: Any,
    p_pos: Any,
    path: str | Path,
    *,
    threshold: float | None = None,
    alpha: float | None = None,
) -> Path:
    """FNR and FPR of "roadwork iff p >= t" against t; marks the chosen threshold and the FNR target."""
    thresholds, fnr, fpr = fnr_fpr_curve(y, p_pos)
    fig, ax = _new_figure()
    ax.step(thresholds, fnr, where="post", label="FNR (missed roadwork)", color="tab:red")
    ax.step(thresholds, fpr, where="post", label="FPR (false alarms)", color="tab:blue")
    if alpha is not None:
        ax.axhline(alpha, color="tab:red", linestyle=":", linewidth=1, label=f"FNR target alpha = {alpha:g}")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.4g}")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(-0.02, 1.02)
    return _finish(fig, ax, path, xlabel="threshold t on p(roadwork)", ylabel="rate",
                   title="Error rates against decision threshold", legend="center right")


def plot_reliability(y: Any, curves: Mapping[str, Any], path: str | Path, n_bins: int = 15) -> Path:
    """Top-label reliability diagram, one line per named p(roadwork) array (e.g. before/after calibration).

    Same binning as metrics.ece (top-label confidence, n_bins equal-width bins); the legend shows each
    curve's ECE.
    """
    if not curves:
        raise ValueError("curves is empty: pass at least one {name: p_pos} entry")
    fig, ax = _new_figure()
    ax.plot([0.5, 1.0], [0.5, 1.0], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
    for name, p_pos in curves.items():
        rc = reliability_curve(y, p_pos, n_bins)
        ax.plot(rc.confidence, rc.accuracy, marker="o", label=f"{name} (ECE {ece(y, p_pos, n_bins):.3f})")
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.02)
    return _finish(fig, ax, path, xlabel="top-label confidence max(p, 1 - p)", ylabel="accuracy of top label",
                   title=f"Reliability ({n_bins} equal-width bins)", legend="upper left")


def plot_risk_coverage(curves: Mapping[str, tuple[Any, Any]], path: str | Path) -> Path:
    """Selective risk against coverage, one line per named (coverage, risk) pair of arrays."""
    if not curves:
        raise ValueError("curves is empty: pass at least one {name: (coverage, risk)} entry")
    fig, ax = _new_figure()
    for name, (coverage, risk) in curves.items():
        cov = np.asarray(coverage, dtype=np.float64)
        r = np.asarray(risk, dtype=np.float64)
        if cov.shape != r.shape:
            raise ValueError(f"curve {name!r}: coverage {cov.shape} and risk {r.shape} differ in shape")
        order = np.argsort(cov, kind="stable")
        ax.plot(cov[order], r[order], label=name)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(bottom=0.0)
    return _finish(fig, ax, path, xlabel="coverage (fraction accepted)",
                   ylabel="selective risk (error rate among accepted)", title="Risk-coverage", legend="upper left")
