"""The model card states the active decision rule, which probability it reads, and its guarantee."""

import numpy as np
import pytest

from stage1core.backbone import BackboneSpec
from stage1core.card import calibrated_at, model_card
from stage1core.guarantees import GuaranteeConfig
from stage1core.policy import PolicyConfig, fit_policy

SPEC = BackboneSpec(name="tf_efficientnet_lite0", weights_kind="package", weights_file=None, weights_sha256="ab" * 32,
                    pooling="avg", model_kwargs={}, seed=0, input_size=None, fingerprint="cd" * 32)
HEAD = {"kind": "linear", "in_dim": 8, "best_epoch": 0, "epochs_run": 1, "chosen": "linear C=0.1 view=all",
        "n_candidates": 13, "criterion": "one standard error rule"}
DATA = {"data_fingerprint": "e" * 64, "split_fingerprint": "f" * 64, "n_samples": 400, "duplicates": 0,
        "quarantined": 0}
COUNTS = {"train": {"0": 100, "1": 100, "total": 200}, "test": {"0": 50, "1": 50, "total": 100}}


def fitted(policy: str, calibrator: str = "temperature"):
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 200)
    logits = np.stack([np.zeros(400), (2 * y - 1) * 1.5 + rng.normal(size=400)], axis=1)
    gate = rng.normal(size=400) + 1.0
    config = PolicyConfig(policy=policy, calibrator=calibrator, scrc_alpha=0.2, scrc_delta=0.2, scrc_xi=0.3,
                          scrc_grid_size=2)
    return fit_policy(logits, y, gate, guarantee=GuaranteeConfig(alpha=0.1, delta=0.1), config=config).files()


def card(policy, calibrator="temperature", baselines=None):
    files = fitted(policy, calibrator)
    return files, model_card(name="b", spec=SPEC, backbone_mode="frozen", data=DATA, counts=COUNTS,
                             metrics={"coverage": 0.7, "selective_fnr": 0.05}, policy_files=files, head=HEAD,
                             baselines=baselines)


def test_threshold_policy_states_the_guarantee_on_the_raw_probability_and_the_calibrated_cut():
    files, text = card("threshold")
    t = files["thresholds.json"]["threshold"]
    assert f"roadwork iff p_raw >= {t:.6f}" in text and "P(FNR <= 0.1) >= 1 - 0.1" in text
    cut = calibrated_at(files, t)
    assert f"p(roadwork) >= {cut:.6f}" in text and cut != pytest.approx(t)
    assert "linear C=0.1 view=all" in text and "13 candidates" in text


def test_gate_policy_says_it_has_no_guarantee_and_does_not_claim_the_threshold_rule():
    files, text = card("gate")
    assert "**No statistical guarantee**" in text and "abstain" in text
    assert "roadwork iff p_raw >= " + f"{files['thresholds.json']['threshold']:.6f}" not in text
    assert "P(FNR <=" not in text


def test_scrc_policy_states_its_own_guarantee():
    files, text = card("scrc")
    scrc = files["scrcparams.json"]
    assert f"acceptance rate is >= {scrc['xi']}" in text and f"<= {scrc['alpha']}" in text
    assert "not applied" in text


def test_without_a_calibrator_the_reported_probability_is_the_raw_one():
    _, text = card("threshold", calibrator="none")
    assert "reports the head's raw probability" in text and "the same rule reads" not in text


def test_baselines_table_and_loud_verdict():
    judged = {"head": {"accuracy_at_0.5": 0.8, "mcc_at_0.5": 0.6, "auroc": 0.9, "brier": 0.1},
              "baselines": {"logistic": {"accuracy_at_0.5": 0.9, "mcc_at_0.5": 0.8, "auroc": 0.95, "brier": 0.08,
                                         "chosen": "C=0.006"}},
              "comparison": {"loses": True, "verdict": "head loses to logistic on test accuracy_at_0.5"}}
    _, text = card("threshold", baselines=judged)
    assert "| logistic | 0.9000 | 0.8000 |" in text and "WARNING: head loses to logistic" in text
