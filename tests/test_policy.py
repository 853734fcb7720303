import numpy as np
import pytest

from stage1core.guarantees import GuaranteeConfig
from stage1core.policy import FittedPolicy, PolicyConfig, fit_policy, softmax_positive
from stage1core.schemas import validate_json

GUARANTEE = GuaranteeConfig(alpha=0.05, delta=0.1)
SCHEMAS = {"thresholds.json": "thresholds", "policy.json": "policy", "calibration.json": "calibration",
           "gateparams.json": "gateparams", "scrcparams.json": "scrcparams"}


def synthetic(n, seed):
    """Overconfident logits whose reliability is announced by an informative gate logit."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    easy = rng.random(n) < 0.7
    margin = np.where(easy, 3.0, 0.4) * (2 * y - 1) + rng.normal(0, 1.0, n)
    logits = np.stack([-margin, margin], axis=1) * 1.5  # scaled up: miscalibrated
    gate = np.where(easy, 2.0, -2.0) + rng.normal(0, 0.7, n)
    return logits, y, gate


@pytest.mark.parametrize("policy", ["threshold", "gate", "scrc"])
def test_policy_files_round_trip_and_validate(policy):
    logits, y, gate = synthetic(3000, 0)
    config = PolicyConfig(policy=policy, calibrator="temperature", gate_min_confidence=0.85)
    fitted = fit_policy(logits, y, gate, guarantee=GUARANTEE, config=config)
    files = fitted.files()
    for name, doc in files.items():
        validate_json(doc, SCHEMAS[name], source=name)
    again = FittedPolicy.from_files(files)
    tl, ty, tg = synthetic(2000, 1)
    a, b = fitted.apply(tl, tg), again.apply(tl, tg)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_threshold_policy_never_abstains_and_keeps_fnr():
    logits, y, gate = synthetic(3000, 0)
    fitted = fit_policy(logits, y, None, guarantee=GUARANTEE, config=PolicyConfig())
    tl, ty, _ = synthetic(20000, 1)
    out = fitted.apply(tl)
    assert out["accepted"].all()
    np.testing.assert_array_equal(out["decision"], (softmax_positive(tl) >= fitted.threshold.threshold).astype(int))
    fnr = np.mean(out["decision"][ty == 1] == 0)
    assert fnr <= GUARANTEE.alpha + 0.01


def test_temperature_calibration_lowers_nll_on_held_out_data():
    from stage1core.metrics import binary_metrics

    logits, y, _ = synthetic(3000, 0)
    fitted = fit_policy(logits, y, None, guarantee=GUARANTEE, config=PolicyConfig(calibrator="temperature"))
    tl, ty, _ = synthetic(5000, 2)
    out = fitted.apply(tl)
    assert binary_metrics(ty, out["p"])["nll"] < binary_metrics(ty, out["p_raw"])["nll"] - 0.02


def test_gate_policy_abstains_on_the_unreliable_samples():
    logits, y, gate = synthetic(3000, 0)
    tl, ty, tg = synthetic(5000, 1)
    coverages, accuracies = [], []
    for level in (0.6, 0.8, 0.95):
        fitted = fit_policy(logits, y, gate, guarantee=GUARANTEE,
                            config=PolicyConfig(policy="gate", gate_min_confidence=level))
        out = fitted.apply(tl, tg)
        acc = out["accepted"]
        coverages.append(acc.mean())
        accuracies.append(np.mean(out["decision"][acc] == ty[acc]))
        assert (out["decision"][~acc] == -1).all() and (out["set"][~acc] == -1).all()
    assert coverages[0] > coverages[1] >= coverages[2] and coverages[2] > 0.3
    all_acc = np.mean((softmax_positive(tl) >= 0.5) == ty)  # the argmax classifier without abstaining
    assert accuracies[-1] > all_acc + 0.05
    out = fitted.apply(tl, tg)
    acc = out["accepted"]
    np.testing.assert_array_equal(out["decision"][acc], (softmax_positive(tl) >= 0.5).astype(int)[acc])


def test_scrc_policy_meets_coverage_and_selective_fnr_on_fresh_data():
    logits, y, gate = synthetic(4000, 0)
    config = PolicyConfig(policy="scrc", scrc_alpha=0.05, scrc_delta=0.1, scrc_xi=0.6, scrc_score="gate")
    fitted = fit_policy(logits, y, gate, guarantee=GUARANTEE, config=config)
    tl, ty, tg = synthetic(50000, 3)
    out = fitted.apply(tl, tg)
    acc = out["accepted"]
    assert acc.mean() >= 0.6
    pos = acc & (ty == 1)
    assert np.mean(out["set"][pos] == 0) <= 0.05
    assert set(np.unique(out["set"][acc])) <= {0, 1, 2}
    assert ((out["set"] >= 1) == (out["decision"] == 1))[acc].all()


def test_policies_that_need_a_gate_refuse_a_plain_head():
    logits, y, _ = synthetic(500, 0)
    with pytest.raises(ValueError, match="selective head"):
        fit_policy(logits, y, None, guarantee=GUARANTEE, config=PolicyConfig(policy="gate"))
    with pytest.raises(ValueError, match="policy must be one of"):
        PolicyConfig(policy="vote")
