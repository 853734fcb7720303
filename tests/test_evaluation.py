"""Test-split evaluation of a fitted policy: the numbers match a direct count, the plots are written."""

from __future__ import annotations

import numpy as np
import pytest

from stage1core.evaluation import evaluate_policy
from stage1core.guarantees import GuaranteeConfig
from stage1core.policy import PolicyConfig, fit_policy, softmax_positive

GUARANTEE = GuaranteeConfig(alpha=0.05, delta=0.1)
PLOTS = ("fnr_fpr.png", "reliability.png", "risk_coverage.png")


def synthetic(n, seed):
    """Overconfident logits; the gate logit says which samples are easy."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    easy = rng.random(n) < 0.7
    margin = np.where(easy, 3.0, 0.4) * (2 * y - 1) + rng.normal(0, 1.0, n)
    logits = np.stack([-margin, margin], axis=1) * 1.5
    gate = np.where(easy, 2.0, -2.0) + rng.normal(0, 0.7, n)
    return logits, y, gate


def test_threshold_policy_metrics_match_a_direct_count(tmp_path):
    calib_logits, calib_y, _ = synthetic(3000, 0)
    fitted = fit_policy(calib_logits, calib_y, None, guarantee=GUARANTEE, config=PolicyConfig())
    logits, y, _ = synthetic(2000, 1)
    m = evaluate_policy(fitted, {"logits": logits}, y, tmp_path, calib_logits=calib_logits, calib_y=calib_y)

    p = softmax_positive(logits)
    predicted = p >= fitted.threshold.threshold
    assert m["accuracy"] == pytest.approx(np.mean(predicted == y))
    assert m["fnr"] == pytest.approx(np.mean(~predicted[y == 1]))
    assert m["accuracy_at_0.5"] == pytest.approx(np.mean((p >= 0.5) == y))
    # the threshold policy accepts everything and decides at the guaranteed threshold
    assert (m["policy"], m["coverage"], m["mean_set_size"]) == ("threshold", 1.0, 1.0)
    assert m["selective_fnr"] == pytest.approx(m["fnr"])
    # each calibrator is fitted on calib and judged on test; scaling down overconfident logits helps
    assert m["calibrator"] == "temperature"
    assert m["calibration/temperature/nll"] < m["calibration/raw/nll"]
    assert m["calibration/temperature/ece"] < m["calibration/raw/ece"]
    assert {"selective/maxprob/aurc", "selective/calibrated/aurc"} <= set(m)
    assert not any(key.startswith("selective/gate/") for key in m)  # no gate, no gate scores
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gate_policy_abstains_on_hard_samples_and_scores_the_gate(tmp_path):
    calib_logits, calib_y, calib_gate = synthetic(3000, 0)
    config = PolicyConfig(policy="gate", gate_min_confidence=0.85)
    fitted = fit_policy(calib_logits, calib_y, calib_gate, guarantee=GUARANTEE, config=config)
    logits, y, gate = synthetic(2000, 1)
    m = evaluate_policy(fitted, {"logits": logits, "gate_logit": gate}, y, tmp_path, calib_logits=calib_logits,
                        calib_y=calib_y)
    accepted = fitted.apply(logits, gate)["accepted"]
    assert m["coverage"] == pytest.approx(accepted.mean()) and 0.3 < m["coverage"] < 0.95
    # the gate keeps the easy samples, so the accepted ones are right more often than all of them
    assert m["selective_accuracy"] > m["accuracy_at_0.5"] + 0.05
    # ... and ranking by the gate is far better than chance (a random ranking's AURC is the error rate)
    assert m["selective/gate/aurc"] < 0.5 * (1 - m["accuracy_at_0.5"])
    assert all((tmp_path / name).is_file() for name in PLOTS)
