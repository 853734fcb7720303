"""Test-split evaluation of a fitted policy: classification metrics at the guaranteed threshold,
calibration before/after each calibrator, selective metrics for each confidence score, and the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .comparison import coverage_at_fnr
from .metrics import (
    augrc,
    aurc,
    binary_metrics,
    coverage_at_risk,
    e_aurc,
    risk_at_coverage,
    risk_coverage_curve,
)
from .policy import FittedPolicy, calibrated_positive, fit_calibrator, sigmoid

RISK_COVERAGE = 0.8  # risk@coverage is reported at this coverage
COVERAGE_RISK = 0.05  # coverage@risk is reported at this risk


def evaluate_policy(fitted: FittedPolicy, outputs: dict[str, np.ndarray], y: np.ndarray, out_dir: str | Path, *,
                    calib_logits: np.ndarray, calib_y: np.ndarray) -> dict[str, Any]:
    out_dir = Path(out_dir)
    y = np.asarray(y).astype(np.int64)
    logits, gate = outputs["logits"], outputs.get("gate_logit")
    applied = fitted.apply(logits, gate)
    t = fitted.threshold.threshold
    p_raw = applied["p_raw"]

    metrics: dict[str, Any] = dict(binary_metrics(y, p_raw, threshold=t))
    half = binary_metrics(y, p_raw, threshold=0.5)
    metrics.update({f"{k}_at_0.5": half[k] for k in ("accuracy", "mcc", "fnr", "fpr")})

    # calibration of the reported probability: each calibrator fitted on calib, judged on test
    curves = {"raw": p_raw}
    for kind in ("temperature", "dirichlet"):
        curves[kind] = calibrated_positive(fit_calibrator(kind, calib_logits, calib_y), logits)
    for name, p in curves.items():
        judged = binary_metrics(y, p)
        metrics[f"calibration/{name}/nll"] = judged["nll"]
        metrics[f"calibration/{name}/ece"] = judged["ece"]
    metrics["calibrator"] = "none" if fitted.calibrator is None else fitted.calibrator.kind

    # the policy: coverage and errors among accepted samples
    accepted = applied["accepted"]
    positives = y == 1
    metrics["policy"] = fitted.policy
    metrics["coverage"] = float(accepted.mean())
    metrics["selective_fnr"] = (float(np.mean(applied["decision"][accepted & positives] == 0))
                                if (accepted & positives).any() else float("nan"))
    metrics["selective_accuracy"] = (float(np.mean(applied["decision"][accepted] == y[accepted]))
                                     if accepted.any() else float("nan"))
    sets = applied["set"][accepted]
    metrics["mean_set_size"] = float(np.mean(np.where(sets == 2, 2, 1))) if accepted.any() else float("nan")

    # selective metrics (risk-coverage, AURC, ...) of the argmax prediction, the prediction that
    # max(p, 1 - p) and the gate are confidences of; the policy's own numbers are above
    decision = (p_raw >= 0.5).astype(np.int64)
    scores = {"maxprob": np.maximum(p_raw, 1 - p_raw)}
    if fitted.calibrator is not None:
        p_cal = applied["p"]
        scores["calibrated"] = np.maximum(p_cal, 1 - p_cal)
    if gate is not None:
        scores["gate"] = sigmoid(gate)
    rc_curves = {}
    for name, conf in scores.items():
        metrics[f"selective/{name}/aurc"] = aurc(y, decision, conf)
        metrics[f"selective/{name}/e_aurc"] = e_aurc(y, decision, conf)
        metrics[f"selective/{name}/augrc"] = augrc(y, decision, conf)
        key = f"selective/{name}"
        metrics[f"{key}/risk_at_coverage_{RISK_COVERAGE}"] = risk_at_coverage(y, decision, conf, RISK_COVERAGE)
        metrics[f"{key}/coverage_at_risk_{COVERAGE_RISK}"] = coverage_at_risk(y, decision, conf, COVERAGE_RISK)
        coverage, risk, _ = risk_coverage_curve(y, decision, conf)
        rc_curves[name] = (coverage, risk)

    # matplotlib is imported here, not with the module: a fully cached run draws nothing
    from .plots import plot_fnr_fpr, plot_reliability, plot_risk_coverage

    plot_fnr_fpr(y, p_raw, out_dir / "fnr_fpr.png", threshold=t, alpha=fitted.threshold.alpha)
    plot_reliability(y, curves, out_dir / "reliability.png")
    plot_risk_coverage(rc_curves, out_dir / "risk_coverage.png")
    return metrics


def bundle_metrics(y: np.ndarray, outputs: dict[str, np.ndarray], *, threshold: float, alpha: float,
                   policy: str) -> dict[str, Any]:
    """A shipped bundle's metrics on labelled images (`evaluate-bundle`): the classification metrics at
    its FNR-guaranteed threshold, which applies to the raw head probability `p_raw`
    (stage1core.policy); coverage at that FNR; its policy's share of decided images and the FNR among
    them; the ECE of the calibrated `p` it reports. Undefined values (NaN) are None."""
    y = np.asarray(y)
    metrics: dict[str, Any] = dict(binary_metrics(y, outputs["p_raw"], threshold=threshold))
    metrics["coverage_at_fnr"] = coverage_at_fnr(y, outputs["p_raw"], threshold, alpha)
    accepted, positives = outputs["decision"] >= 0, y == 1
    metrics["policy"] = policy
    metrics["coverage"] = float(accepted.mean())
    metrics["selective_fnr"] = (float(np.mean(outputs["decision"][accepted & positives] == 0))
                                if (accepted & positives).any() else None)
    metrics["ece_calibrated"] = binary_metrics(y, outputs["p"])["ece"]
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in metrics.items()}
