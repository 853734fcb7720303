"""Test-split evaluation of a fitted policy: the numbers match a direct count, the plots draw the test
data and land on disk as non-blank PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stage1core import plots
from stage1core.evaluation import evaluate_policy
from stage1core.guarantees import GuaranteeConfig
from stage1core.policy import PolicyConfig, fit_policy, softmax_positive

GUARANTEE = GuaranteeConfig(alpha=0.05, delta=0.1)
PLOTS = ("fnr_fpr.png", "reliability.png", "risk_coverage.png")
PLOTS_DRAWN_BY = ("plot_fnr_fpr", "plot_reliability", "plot_risk_coverage")


def synthetic(n, seed):
    """Overconfident logits; the gate logit says which samples are easy."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    easy = rng.random(n) < 0.7
    margin = np.where(easy, 3.0, 0.4) * (2 * y - 1) + rng.normal(0, 1.0, n)
    logits = np.stack([-margin, margin], axis=1) * 1.5
    gate = np.where(easy, 2.0, -2.0) + rng.normal(0, 0.7, n)
    return logits, y, gate


@pytest.fixture
def drawn(monkeypatch):
    """What evaluate_policy hands each plot function: {function name: (args, kwargs)}; they still draw."""
    calls = {}
    for name in PLOTS_DRAWN_BY:
        real = getattr(plots, name)

        def recording(*args, _real=real, _name=name, **kwargs):
            calls[_name] = (args, kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(plots, name, recording)
    return calls


def decoded(path) -> np.ndarray:
    """The PNG at `path` as RGB, checked to be a figure-sized image with something drawn on it."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        rgb = np.asarray(image.convert("RGB"))
    height, width, _ = rgb.shape
    assert 300 <= width <= 2000 and 200 <= height <= 2000, (width, height)
    ink = np.any(rgb < 235, axis=2).mean()  # axes, text and curves on a white figure
    assert 0.01 < ink < 0.6, ink
    return rgb


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
        decoded(tmp_path / name)


def test_the_plots_draw_the_test_data_and_change_with_it(tmp_path, drawn):
    calib_logits, calib_y, _ = synthetic(3000, 0)
    fitted = fit_policy(calib_logits, calib_y, None, guarantee=GUARANTEE, config=PolicyConfig())
    logits, y, _ = synthetic(2000, 1)
    evaluate_policy(fitted, {"logits": logits}, y, tmp_path / "a", calib_logits=calib_logits, calib_y=calib_y)

    p = softmax_positive(logits)
    (y_drawn, p_drawn, path), marks = drawn["plot_fnr_fpr"]
    np.testing.assert_array_equal(y_drawn, y)
    np.testing.assert_allclose(p_drawn, p)
    assert path == tmp_path / "a" / "fnr_fpr.png"
    assert marks == {"threshold": fitted.threshold.threshold, "alpha": GUARANTEE.alpha}
    (y_drawn, curves, path), _ = drawn["plot_reliability"]
    np.testing.assert_array_equal(y_drawn, y)
    assert list(curves) == ["raw", "temperature", "dirichlet"] and path == tmp_path / "a" / "reliability.png"
    np.testing.assert_allclose(curves["raw"], p)
    assert not np.allclose(curves["temperature"], p)  # calibrated: the overconfident logits scaled down
    (rc_curves, path), _ = drawn["plot_risk_coverage"]
    assert list(rc_curves) == ["maxprob", "calibrated"] and path == tmp_path / "a" / "risk_coverage.png"
    coverage, risk = rc_curves["maxprob"]
    assert coverage.max() == pytest.approx(1.0)
    assert risk[np.argmax(coverage)] == pytest.approx(np.mean((p >= 0.5) != y))  # all accepted: the error rate

    # other test data (a third of the labels flipped): every figure comes out different
    flipped = np.where(np.arange(y.size) % 3 == 0, 1 - y, y)
    evaluate_policy(fitted, {"logits": logits}, flipped, tmp_path / "b", calib_logits=calib_logits,
                    calib_y=calib_y)
    for name in PLOTS:
        a, b = decoded(tmp_path / "a" / name), decoded(tmp_path / "b" / name)
        changed = a.shape != b.shape or np.any(a != b, axis=2).mean() > 0.002
        assert changed, name


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
    for name in PLOTS:
        decoded(tmp_path / name)


def test_bundle_metrics_judge_p_raw_at_the_threshold_and_count_abstentions():
    from stage1core.evaluation import bundle_metrics

    y = np.array([1, 1, 1, 0, 0, 0])
    outputs = {"p_raw": np.array([0.9, 0.4, 0.7, 0.2, 0.6, 0.1]),
               "p": np.array([0.95, 0.55, 0.8, 0.1, 0.45, 0.05]),  # calibrated: no error at 0.5
               "decision": np.array([1, -1, 0, 0, -1, 0])}  # two abstentions, one missed roadwork decided
    m = bundle_metrics(y, outputs, threshold=0.5, alpha=0.1, policy="scrc")
    assert (m["n"], m["n_pos"], m["threshold"], m["policy"]) == (6, 3, 0.5, "scrc")
    assert m["fnr"] == pytest.approx(1 / 3) and m["fpr"] == pytest.approx(1 / 3)  # p_raw, not p
    assert m["coverage"] == pytest.approx(4 / 6)
    assert m["selective_fnr"] == pytest.approx(1 / 2)  # of the 2 decided roadwork images, 1 said no
    # undefined values are None (JSON-able), not NaN
    only_negatives = bundle_metrics(np.zeros(3, int), {k: v[3:] for k, v in outputs.items()}, threshold=0.5,
                                    alpha=0.1, policy="threshold")
    assert only_negatives["auroc"] is None and only_negatives["fnr"] is None
    assert only_negatives["selective_fnr"] is None
