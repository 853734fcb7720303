"""Tests of stage1core.plots: each figure draws the data it is given, lands on disk as a decodable,
non-blank PNG of a sane size, and no figure is left open."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from stage1core import plots
from stage1core.metrics import ece, fnr_fpr_curve, reliability_curve, risk_coverage_curve
from stage1core.plots import plot_fnr_fpr, plot_reliability, plot_risk_coverage

TAB_RED, TAB_BLUE, TAB_ORANGE = (214, 39, 40), (31, 119, 180), (255, 127, 14)


def _data(n=800, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    p = 1 / (1 + np.exp(-rng.normal(np.where(y == 1, 1.5, -1.5), 1.2)))
    return y, p


def _pixels(path) -> np.ndarray:
    """The decoded PNG as RGB; checks it is a plausible figure and that no temp file was left."""
    with Image.open(path) as image:
        image.load()
        rgb = np.asarray(image.convert("RGB"))
    height, width, _ = rgb.shape
    assert 300 <= width <= 2000 and 200 <= height <= 2000
    ink = np.any(rgb < 235, axis=2).mean()  # not white: axes, text, curves
    assert 0.01 < ink < 0.6, ink
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]
    return rgb


def _count(rgb: np.ndarray, colour: tuple[int, int, int], tol: int = 12) -> int:
    return int(np.all(np.abs(rgb.astype(int) - colour) <= tol, axis=2).sum())


@pytest.fixture
def axes(monkeypatch):
    """The Axes each plot function finished, to check the data it drew."""
    seen = []
    finish = plots._finish

    def recording(fig, ax, path, **kwargs):
        seen.append(ax)
        return finish(fig, ax, path, **kwargs)

    monkeypatch.setattr(plots, "_finish", recording)
    return seen


@pytest.fixture(autouse=True)
def _no_open_figures():
    plt.close("all")
    yield
    assert plt.get_fignums() == []


def test_plot_fnr_fpr_draws_both_rates_and_the_markers(tmp_path, axes):
    y, p = _data()
    out = plot_fnr_fpr(y, p, tmp_path / "sub" / "fnr_fpr.png", threshold=0.31, alpha=0.02)
    assert out == tmp_path / "sub" / "fnr_fpr.png"
    thresholds, fnr, fpr = fnr_fpr_curve(y, p)
    fnr_line, fpr_line, target, marker = axes[0].lines
    np.testing.assert_allclose(fnr_line.get_xdata(), thresholds)
    np.testing.assert_allclose(fnr_line.get_ydata(), fnr)
    np.testing.assert_allclose(fpr_line.get_ydata(), fpr)
    assert list(target.get_ydata()) == [0.02, 0.02] and list(marker.get_xdata()) == [0.31, 0.31]
    rgb = _pixels(out)
    assert _count(rgb, TAB_RED) > 200 and _count(rgb, TAB_BLUE) > 200  # both curves are visible


def test_plot_fnr_fpr_without_markers_and_overwrite(tmp_path, axes):
    y, p = _data()
    path = tmp_path / "fnr_fpr.png"
    plot_fnr_fpr(y, p, path)
    assert len(axes[0].lines) == 2  # no target, no threshold line
    first = _pixels(path)
    plot_fnr_fpr(y, p, str(path), threshold=0.5)
    second = _pixels(path)
    assert len(axes[1].lines) == 3
    # the threshold line adds dark pixels in the middle of the plot
    assert np.any(second < 60, axis=2).sum() > np.any(first < 60, axis=2).sum()


def test_plot_reliability_draws_each_curve_with_its_ece(tmp_path, axes):
    y, p = _data()
    overconfident = np.clip((p - 0.5) * 1.8 + 0.5, 0, 1)
    rgb = _pixels(plot_reliability(y, {"before": overconfident, "after": p}, tmp_path / "rel.png", n_bins=10))
    diagonal, before, after = axes[0].lines
    assert list(diagonal.get_xdata()) == [0.5, 1.0]
    for line, probs, name in ((before, overconfident, "before"), (after, p, "after")):
        curve = reliability_curve(y, probs, 10)
        np.testing.assert_allclose(line.get_xdata(), curve.confidence)
        np.testing.assert_allclose(line.get_ydata(), curve.accuracy)
        assert line.get_label() == f"{name} (ECE {ece(y, probs, 10):.3f})"
    assert _count(rgb, TAB_BLUE) > 100 and _count(rgb, TAB_ORANGE) > 100
    with pytest.raises(ValueError, match="empty"):
        plot_reliability(y, {}, tmp_path / "none.png")


def test_plot_risk_coverage_draws_each_curve_in_coverage_order(tmp_path, axes):
    y, p = _data()
    pred = (p >= 0.5).astype(int)
    curves = {
        "max-prob": risk_coverage_curve(y, pred, np.maximum(p, 1 - p))[:2],
        "random": risk_coverage_curve(y, pred, np.random.default_rng(1).random(y.size))[:2],
    }
    rgb = _pixels(plot_risk_coverage(curves, tmp_path / "rc.png"))
    for line, (name, (coverage, risk)) in zip(axes[0].lines, curves.items(), strict=True):
        order = np.argsort(coverage, kind="stable")
        assert line.get_label() == name
        np.testing.assert_allclose(line.get_xdata(), np.asarray(coverage)[order])
        np.testing.assert_allclose(line.get_ydata(), np.asarray(risk)[order])
    # ranking by confidence beats random: lower risk at low coverage
    risk_at_a_fifth = {name: np.interp(0.2, *curve) for name, curve in curves.items()}
    assert risk_at_a_fifth["max-prob"] < risk_at_a_fifth["random"]
    assert _count(rgb, TAB_BLUE) > 100 and _count(rgb, TAB_ORANGE) > 100
    with pytest.raises(ValueError, match="shape"):
        plot_risk_coverage({"bad": ([0.5, 1.0], [0.1])}, tmp_path / "bad.png")
