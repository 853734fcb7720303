"""Tests of stage1core.metrics against hand-computed values and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    log_loss,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from stage1core.metrics import (
    augrc,
    aurc,
    binary_metrics,
    coverage_at_risk,
    e_aurc,
    ece,
    fnr_fpr_curve,
    generalized_risk_coverage_curve,
    reliability_curve,
    risk_at_coverage,
    risk_coverage_curve,
    selective_fnr,
)

# y, p chosen away from the 1/15 bin edges: top-label confidences 0.85, 0.65, 0.65, 0.85
Y4 = np.array([0, 0, 1, 1])
P4 = np.array([0.15, 0.65, 0.35, 0.85])


def test_binary_metrics_hand_case():
    m = binary_metrics(Y4, P4, threshold=0.5)  # decisions 0, 1, 0, 1: TP=FP=FN=TN=1
    assert m["accuracy"] == 0.5
    assert m["fnr"] == 0.5 and m["fpr"] == 0.5
    assert m["precision"] == 0.5 and m["recall"] == 0.5
    assert m["mcc"] == pytest.approx(0.0)
    assert m["auroc"] == pytest.approx(0.75)  # pairs (pos, neg): 0.35>0.15, 0.35<0.65, 0.85>both
    assert m["brier"] == pytest.approx((0.15**2 + 0.65**2 + 0.65**2 + 0.15**2) / 4)
    assert m["nll"] == pytest.approx(-(2 * math.log(0.85) + 2 * math.log(0.35)) / 4)
    # bin (0.6, 0.667]: conf 0.65, acc 0; bin (0.8, 0.867]: conf 0.85, acc 1 -> 0.5*0.65 + 0.5*0.15
    assert m["ece"] == pytest.approx(0.4)
    assert (m["n"], m["n_pos"], m["threshold"]) == (4, 2, 0.5)
    assert all(type(v) in (int, float) for v in m.values())


def test_binary_metrics_threshold_moves_decisions():
    m = binary_metrics(Y4, P4, threshold=0.3)  # decisions 0, 1, 1, 1
    assert m["fnr"] == 0.0 and m["fpr"] == 0.5 and m["precision"] == pytest.approx(2 / 3)


def test_binary_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.3).astype(int)
    p = 1 / (1 + np.exp(-rng.normal(np.where(y == 1, 1.5, -1.5), 1.2)))
    t = 0.37
    m = binary_metrics(y, p, t)
    pred = (p >= t).astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["fnr"] == pytest.approx(1 - recall_score(y, pred))
    assert m["fpr"] == pytest.approx(np.mean(pred[y == 0]))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert m["nll"] == pytest.approx(log_loss(y, p))


def test_nll_clips_at_1e_12():
    m = binary_metrics(np.array([1, 0]), np.array([0.0, 0.0]))
    assert m["nll"] == pytest.approx(-math.log(1e-12) / 2)
    assert math.isfinite(m["nll"])


def test_single_class_gives_nan_where_undefined():
    m = binary_metrics(np.zeros(5, dtype=int), np.linspace(0.1, 0.9, 5))
    assert math.isnan(m["auroc"]) and math.isnan(m["fnr"]) and math.isnan(m["recall"])
    assert m["fpr"] == pytest.approx(3 / 5)
    m = binary_metrics(np.ones(3, dtype=int), np.array([0.2, 0.6, 0.9]))
    assert math.isnan(m["auroc"]) and math.isnan(m["fpr"]) and m["fnr"] == pytest.approx(1 / 3)
    m = binary_metrics(np.array([0, 1]), np.array([0.1, 0.2]), threshold=0.9)
    assert math.isnan(m["precision"])  # nothing predicted positive


@pytest.mark.parametrize(
    ("y", "p", "match"),
    [
        ([], [], "empty"),
        ([0, 1], [0.5], "must match"),
        ([0, 2], [0.5, 0.5], "0 or 1"),
        ([0, 1], [0.5, 1.5], r"\[0, 1\]"),
        ([0, 1], [0.5, np.nan], r"\[0, 1\]"),
    ],
)
def test_bad_inputs_raise(y, p, match):
    with pytest.raises(ValueError, match=match):
        binary_metrics(np.array(y), np.array(p, dtype=float))


def _ece_loop(y, p, n_bins=15):
    """Independent reference: Guo et al.'s loop over (lo, hi] bins of top-label confidence."""
    conf = np.maximum(p, 1 - p)
    correct = ((p >= 0.5).astype(int) == y).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return total


def test_ece_matches_reference_loop_and_reliability_curve():
    rng = np.random.default_rng(1)
    y = (rng.random(5000) < 0.4).astype(int)
    p = np.clip(rng.beta(2, 2, 5000) * 0.5 + 0.5 * y * rng.random(5000), 0, 1)
    assert ece(y, p) == pytest.approx(_ece_loop(y, p), abs=1e-12)
    assert ece(y, p, n_bins=10) == pytest.approx(_ece_loop(y, p, 10), abs=1e-12)
    rc = reliability_curve(y, p)
    assert rc.count.sum() == 5000
    assert np.all(rc.bin_lower >= 7 / 15 - 1e-12)  # top-label confidence >= 0.5
    assert np.all((rc.confidence > rc.bin_lower) & (rc.confidence <= rc.bin_upper + 1e-12))


def test_ece_is_near_zero_for_calibrated_probabilities():
    rng = np.random.default_rng(2)
    p = rng.random(200_000)
    y = (rng.random(p.size) < p).astype(int)
    assert ece(y, p) < 0.01
    assert ece(y, np.clip(p * 0.5 + 0.5 * (p > 0.5), 0, 1)) > 0.1  # overconfident


def test_fnr_fpr_curve_matches_sklearn_roc_curve():
    rng = np.random.default_rng(3)
    y = (rng.random(500) < 0.3).astype(int)
    p = np.round(rng.random(500), 2)  # with ties
    thresholds, fnr, fpr = fnr_fpr_curve(y, p)
    sk_fpr, sk_tpr, sk_thr = roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(thresholds[::-1], sk_thr[1:])
    np.testing.assert_allclose(fnr[::-1], 1 - sk_tpr[1:])
    np.testing.assert_allclose(fpr[::-1], sk_fpr[1:])
    assert np.all(np.diff(fnr) >= 0) and np.all(np.diff(fpr) <= 0)


def test_fnr_fpr_curve_hand_case():
    thresholds, fnr, fpr = fnr_fpr_curve(Y4, P4)
    np.testing.assert_allclose(thresholds, [0.15, 0.35, 0.65, 0.85])
    np.testing.assert_allclose(fnr, [0, 0, 0.5, 0.5])
    np.testing.assert_allclose(fpr, [1, 0.5, 0.5, 0])


# ----------------------------------------------------------------------------------------------------
# Selective metrics. Losses in confidence order: 0, 1, 0, 1, 0.

YS = np.array([1, 1, 0, 0, 1])
PREDS = np.array([1, 0, 0, 1, 1])
CONF = np.array([0.9, 0.8, 0.7, 0.6, 0.5])


def test_risk_coverage_curve_hand_case():
    cov, risk, thr = risk_coverage_curve(YS, PREDS, CONF)
    np.testing.assert_allclose(cov, [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(risk, [0, 1 / 2, 1 / 3, 1 / 2, 2 / 5])
    np.testing.assert_allclose(thr, CONF)
    gcov, grisk, _ = generalized_risk_coverage_curve(YS, PREDS, CONF)
    np.testing.assert_allclose(gcov, cov)
    np.testing.assert_allclose(grisk, [0, 0.2, 0.2, 0.4, 0.4])


def test_aurc_eaurc_augrc_hand_case():
    # trapezoids over (0,0) (.2,0) (.4,.5) (.6,1/3) (.8,.5) (1,.4)
    assert aurc(YS, PREDS, CONF) == pytest.approx(0.1 * (0.5 + 5 / 6 + 5 / 6 + 0.9))
    # oracle: losses 0,0,0,1,1 -> risks 0,0,0,1/4,2/5 -> 0.1 * (0.25 + 0.65)
    assert e_aurc(YS, PREDS, CONF) == pytest.approx(0.1 * (0.5 + 5 / 6 + 5 / 6 + 0.9) - 0.09)
    assert augrc(YS, PREDS, CONF) == pytest.approx(0.1 * (0.2 + 0.4 + 0.6 + 0.8))


def test_ties_are_accepted_together_and_order_free():
    conf = np.array([0.9, 0.8, 0.8, 0.6, 0.5])
    cov, risk, thr = risk_coverage_curve(YS, PREDS, conf)
    np.testing.assert_allclose(cov, [0.2, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(risk, [0, 1 / 3, 1 / 2, 2 / 5])
    swapped = [0, 2, 1, 3, 4]
    assert aurc(YS[swapped], PREDS[swapped], conf[swapped]) == pytest.approx(aurc(YS, PREDS, conf))
    assert augrc(YS[swapped], PREDS[swapped], conf[swapped]) == pytest.approx(augrc(YS, PREDS, conf))


def test_augrc_reference_values_for_perfect_and_random_rankings():
    rng = np.random.default_rng(4)
    n, err = 20_000, 0.2
    y = np.zeros(n, dtype=int)
    pred = (rng.random(n) < err).astype(int)
    e = pred.mean()
    perfect = -pred + 1e-6 * rng.random(n)  # correct samples first
    assert augrc(y, pred, perfect) == pytest.approx(e**2 / 2, abs=1e-4)
    assert e_aurc(y, pred, perfect) == pytest.approx(0.0, abs=1e-3)
    assert augrc(y, pred, rng.random(n)) == pytest.approx(e / 2, abs=5e-3)
    assert aurc(y, pred, rng.random(n)) == pytest.approx(e, abs=1e-2)


def test_risk_at_coverage_and_coverage_at_risk():
    assert risk_at_coverage(YS, PREDS, CONF, 0.5) == pytest.approx(1 / 3)  # next point: coverage 0.6
    assert risk_at_coverage(YS, PREDS, CONF, 0.6) == pytest.approx(1 / 3)
    assert risk_at_coverage(YS, PREDS, CONF, 1.0) == pytest.approx(0.4)
    assert coverage_at_risk(YS, PREDS, CONF, 0.35) == pytest.approx(0.6)
    assert coverage_at_risk(YS, PREDS, CONF, 0.0) == pytest.approx(0.2)
    assert coverage_at_risk(YS, PREDS, CONF, 0.5) == pytest.approx(1.0)
    assert coverage_at_risk(np.array([1]), np.array([0]), np.array([0.5]), 0.1) == 0.0
    with pytest.raises(ValueError):
        risk_at_coverage(YS, PREDS, CONF, 0.0)


def test_selective_fnr():
    y = np.array([1, 1, 1, 0, 1])
    pred = np.array([1, 0, 0, 0, 0])
    accepted = np.array([True, True, False, True, False])
    assert selective_fnr(y, pred, accepted) == pytest.approx(0.5)
    assert math.isnan(selective_fnr(y, pred, np.zeros(5, dtype=bool)))


def test_selective_inputs_validated():
    with pytest.raises(ValueError, match="empty"):
        aurc(np.array([]), np.array([]), np.array([]))
    with pytest.raises(ValueError, match="one length"):
        aurc(YS, PREDS, CONF[:3])
