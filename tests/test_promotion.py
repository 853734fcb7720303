"""The promotion rule without Prefect or MLflow: the rule on synthetic predictions, paired differences,
coverage at an FNR, the floor and the baseline gate, one floor and one rule for the settings, the CLI, the
flows and the deployments, the promotion history, the `all` split evaluate-bundle reads and model
references. The rule through `retrain` itself is in test_operations.py."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from stage1core.comparison import (
    ComparisonConfig,
    MetricFloor,
    baseline_problems,
    check_floor,
    compare_predictions,
    coverage_at_fnr,
    decide,
    floor_report,
    paired_differences,
)
from stage1core.guarantees import GuaranteeConfig, fnr_threshold
from stage1core.history import (
    MAX_ENTRY_CHARS,
    encode_entry,
    entries_from_tags,
    rollback_target,
    rolled_back_from,
)
from stage1core.splits import samples_of
from tasks.registry import parse_model_ref
from tests.common import MODEL, settings_file


def scores(rng, y, separation, shared, rho=0.5):
    """Binormal scores through a sigmoid: positives shifted by `separation`; `shared` noise makes two
    models' errors agree."""
    return 1 / (1 + np.exp(-(separation * y + np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.standard_normal(y.size))))


def judge(challenger_sep: float, champion_sep: float, *, same: bool = False, n: int = 300, seed: int = 0):
    """Fit both thresholds on a calib draw for FNR <= 0.05, compare on a test draw, decide by the default rule."""
    rng = np.random.default_rng(seed)
    guarantee = GuaranteeConfig(alpha=0.05, delta=0.05)
    y = np.r_[np.ones(n), np.zeros(n)]
    drawn = []
    for _ in ("calib", "test"):
        shared = rng.standard_normal(y.size)
        champ = scores(rng, y, champion_sep, shared)
        drawn.append((scores(rng, y, challenger_sep, shared) if not same else champ.copy(), champ))
    (cal_a, cal_b), (test_a, test_b) = drawn
    config = ComparisonConfig(n_bootstrap=1000)
    comp = compare_predictions(labels=y, challenger=test_a, challenger_threshold=fnr_threshold(cal_a[y == 1], guarantee)
                               .threshold, champion=test_b, champion_threshold=fnr_threshold(cal_b[y == 1], guarantee)
                               .threshold, alpha=0.05, config=config)
    return comp, decide(comp, config, floor_problems=[], n_test_pos=n, n_test_neg=n, alpha=0.05)


def test_the_rule_promotes_a_clearly_better_challenger_only():
    comp, better = judge(3.0, 1.5)
    assert better.promote and comp["mcc_gain"]["low"] > 0 and comp["auroc_gain"]["low"] > 0
    comp, worse = judge(1.5, 3.0)
    assert not worse.promote and comp["mcc_gain"]["high"] < 0
    assert "MCC gain" in worse.reason and "AUROC non-inferior" in worse.reason
    comp, same = judge(2.0, 2.0, same=True)
    assert not same.promote and comp["mcc_gain"] == {"estimate": 0.0, "low": 0.0, "high": 0.0, "confidence": 0.95}
    for seed in range(3):  # equally good models with their own errors: the bounds straddle 0
        comp, twin = judge(2.0, 2.0, seed=seed)
        assert not twin.promote and comp["mcc_gain"]["low"] < 0 < comp["mcc_gain"]["high"]


def test_the_rule_refuses_noise_a_drop_in_auroc_or_fnr_and_small_test_splits():
    config = ComparisonConfig()

    def comp(mcc, auroc=(0.0, -0.01, 0.01), fnr=(0.0, -0.01, 0.01)):
        return {k: dict(zip(("estimate", "low", "high"), v, strict=True))
                for k, v in (("mcc_gain", mcc), ("auroc_gain", auroc), ("fnr_increase", fnr))}

    def verdict(c, *, n=500, problems=(), **kw):
        return decide(c, config, floor_problems=list(problems), n_test_pos=n, n_test_neg=n, alpha=0.02, **kw)

    # the report: "+0.0256 [-0.3443, +0.3703] meets the margin" on 34 images was a promotion
    noisy = verdict(comp((0.0256, -0.3443, 0.3703)), n=17)
    assert not noisy.promote and "lower bound -0.3443 <= +0.0000" in noisy.reason and "test size" in noisy.reason
    assert verdict(comp((0.05, 0.01, 0.09))).promote
    auroc_drop = verdict(comp((0.05, 0.01, 0.09), auroc=(-0.03, -0.05, -0.01)))
    assert not auroc_drop.promote and "AUROC non-inferior" in auroc_drop.reason
    fnr_rise = verdict(comp((0.05, 0.01, 0.09), fnr=(0.01, -0.005, 0.025)))  # margin None: alpha = 0.02
    assert not fnr_rise.promote and "FNR non-inferior" in fnr_rise.reason
    assert not verdict(comp((0.05, 0.01, 0.09)), n=199).promote  # default: 200 test images per class
    assert not verdict(comp((0.05, 0.01, 0.09)), problems=["test MCC 0.1 is below the floor 0.2"]).promote
    blocked = verdict(comp((0.05, 0.01, 0.09)), blocked="v2 was rolled back by alice")
    assert not blocked.promote and "rolled back by alice" in blocked.reason
    # a non-inferiority margin on MCC: a fresher model at most 0.05 worse may replace the champion
    fresher = comp((-0.01, -0.04, 0.02))
    assert not verdict(fresher).promote
    assert decide(fresher, ComparisonConfig(min_mcc_gain=-0.05), floor_problems=[], n_test_pos=500,
                  n_test_neg=500, alpha=0.02).promote
    # no champion yet: the floor and the test size decide
    assert verdict(None).promote and not verdict(None, n=10).promote


def test_paired_differences_match_the_metrics_and_share_resamples():
    from sklearn.metrics import matthews_corrcoef, roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    a, b = rng.random(300) + 0.4 * y, rng.random(300) + 0.2 * y
    d = paired_differences(y, a, 0.6, b, 0.5, n_bootstrap=500)
    assert d["mcc_gain"]["estimate"] == pytest.approx(
        matthews_corrcoef(y, a >= 0.6) - matthews_corrcoef(y, b >= 0.5))
    assert d["auroc_gain"]["estimate"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    fnr = lambda s, t: np.mean(s[y == 1] < t)  # noqa: E731
    assert d["fnr_increase"]["estimate"] == pytest.approx(fnr(a, 0.6) - fnr(b, 0.5))
    for stats in d.values():
        assert stats["low"] <= stats["estimate"] <= stats["high"]
    assert paired_differences(y, a, 0.6, b, 0.5, n_bootstrap=500) == d  # seeded: a rerun gives the same bounds


def test_coverage_at_fnr():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.95, 0.9, 0.8, 0.45, 0.05, 0.1, 0.3, 0.55])
    # one positive (0.45) is missed at t=0.5; it is the least confident, so deferring it leaves FNR 0
    assert coverage_at_fnr(y, p, 0.5, 0.0) == pytest.approx(7 / 8)
    assert coverage_at_fnr(y, p, 0.5, 0.25) == 1.0
    assert coverage_at_fnr(y, np.where(y == 1, 0.45, 0.0), 0.5, 0.0) == pytest.approx(0.5)  # negatives only


def test_floor():
    assert check_floor({"mcc": 0.5, "auroc": 0.9, "fnr": 0.01}, MetricFloor(min_mcc=0.4), alpha=0.02) == []
    assert len(check_floor({"mcc": 0.5, "auroc": None, "fnr": 0.05}, MetricFloor(), alpha=0.02)) == 2


def test_a_head_that_loses_to_a_baseline_is_never_promoted(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "metrics.json").write_text(json.dumps({"mcc": 0.9, "auroc": 0.99, "fnr": 0.01}))
    (bundle / "thresholds.json").write_text(json.dumps({"alpha": 0.02}))
    assert baseline_problems(bundle) == []  # bundles from before baselines existed
    verdict = "head loses to logistic on test mcc_at_0.5: 0.6000 vs 0.7000 (margin 0.02)"
    for loses in (False, True):
        (bundle / "baselines.json").write_text(json.dumps({"comparison": {"loses": loses, "verdict": verdict}}))
        _, problems = floor_report(bundle, MetricFloor())
        assert problems == ([verdict] if loses else [])
        decision = decide(None, ComparisonConfig(), floor_problems=problems, n_test_pos=500, n_test_neg=500,
                          alpha=0.02)
        assert decision.promote is not loses and (verdict in decision.reason) is loses


def test_one_floor_and_one_rule_for_the_settings_the_cli_the_flows_and_the_deployments(monkeypatch, tmp_path):
    import flows.promote
    from deployments import cli
    from deployments.serve import load_project
    from stage1core.settings import SettingsError, comparison_config, demo_settings, load_settings, metric_floor

    # no settings file: stage1core.comparison's defaults are the rule and the floor
    assert comparison_config(demo_settings()) == ComparisonConfig() and metric_floor(demo_settings()) == MetricFloor()
    assert ComparisonConfig().floor == MetricFloor()
    # `stage1 settings init` writes every field of the rule at its default: what a team reads is what applies
    monkeypatch.setenv("STAGE1_SETTINGS", str(tmp_path / "settings.toml"))
    for preset in ("demo", "product"):
        assert cli.main(["settings", "init", "--preset", preset, "--force"]) == 0
        written = load_settings()
        # (a field whose default is None, e.g. fnr_margin, is written as an "(unset)" comment: TOML has no null)
        assert set(written.promotion) == {f.name for f in dataclasses.fields(ComparisonConfig)
                                          if getattr(ComparisonConfig(), f.name) is not None}
        text = (tmp_path / "settings.toml").read_text()
        assert all(f"# {f.name} = (unset)" in text for f in dataclasses.fields(ComparisonConfig)
                   if getattr(ComparisonConfig(), f.name) is None)
        assert comparison_config(written) == ComparisonConfig()
    # `stage1 promote` and `stage1 rollback` take the settings' model and floor; a flag replaces only its field
    asked = []
    monkeypatch.setattr(flows.promote, "promote", lambda **kw: asked.append(kw) or {
        "model_name": "m", "alias": "champion", "version": "3", "previous_version": "2", "action": "promote",
        "requested_by": "r"})
    assert cli.main(["promote", "3", "--reason", "r"]) == 0
    assert cli.main(["rollback", "--to", "2", "--reason", "r"]) == 0
    assert [(kw["model_name"], kw["floor"]) for kw in asked] == [("stage1-roadwork", MetricFloor())] * 2
    assert asked[1]["version"] == "2" and asked[1]["rollback"]
    settings_file(tmp_path / "settings.toml", promotion={"floor": {"min_mcc": 0.3}})
    assert cli.main(["promote", "3", "--reason", "r", "--min-auroc", "0.6"]) == 0
    assert asked[2]["model_name"] == MODEL and asked[2]["floor"] == MetricFloor(min_mcc=0.3, min_auroc=0.6)
    # [promotion] keys are ComparisonConfig's fields: an older rule's key or a bad value fails when read
    for text, message in (("[promotion]\nrequire_significant = true\n",
                           r"\[promotion\]: unknown key\(s\) \['require_significant'\]; ComparisonConfig has"),
                          ("[promotion]\nfloor = {min_auroc = 2.0}\n", r"\[promotion\].floor: MetricFloor.min_auroc"),
                          ("[promotion]\nmin_mcc_gain = 2.0\n", r"\[promotion\]: ComparisonConfig.min_mcc_gain")):
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(SettingsError, match=message):
            load_settings(tmp_path / "bad.toml")
    # the deployments set no rule and no floor of their own: the runs read the settings
    raw = {s["name"]: s for s in load_project()["deployments"]}
    for name in ("retrain", "promote"):
        assert not {"comparison", "floor", "promotion"} & set(raw[name].get("parameters") or {}), name


def test_history_entries_rollback_targets_and_size():
    def move(action, version, before, by="x"):
        return {"action": action, "alias": "champion", "version": version, "from_version": before, "by": by}

    tags = {f"promotion_history.2025010{i}T000000000000Z": json.dumps(e) for i, e in enumerate([
        move("promote", "1", None), move("promote", "2", "1"), move("promote", "3", "2"),
        {"action": "keep", "version": "3", "from_version": "3", "challenger": "4"},
        move("rollback", "2", "3", by="alice")])}
    tags["unrelated"] = "x"
    entries = entries_from_tags(tags)
    assert [e["n"] for e in entries] == [1, 2, 3, 4, 5] and entries[-1]["by"] == "alice"
    # a rollback walks back along promotions, never undoing the previous rollback
    assert rollback_target(entries, "2")[0] == "1"
    assert rollback_target(entries, "1") == (
        None, "v1 was the first @champion (history entry 1): nothing to roll back to")
    assert rollback_target([], "5", fallback="4")[0] == "4"  # promoted before the history existed
    assert rolled_back_from(entries, "3")["by"] == "alice" and rolled_back_from(entries, "2") is None
    long = encode_entry({"reason": "r" * 10_000, "figures": {"mcc_gain": [0.1, 0.05, 0.15]}})
    assert len(long) <= MAX_ENTRY_CHARS and json.loads(long)["figures"]["mcc_gain"] == [0.1, 0.05, 0.15]


def test_samples_of_all_is_every_image():
    from stage1core.sources import Sample

    def sample(i, role="all"):
        return Sample(sample_id=str(i), source="s", label=i % 2, locator=f"/x/{i}", role=role)

    parts = {"train": [sample(0), sample(1, "train_only")], "val": [sample(2)], "calib": [sample(3)],
             "test": [sample(4), sample(5)]}
    assert [s.sample_id for s in samples_of(parts, "all")] == ["0", "1", "2", "3", "4", "5"]
    assert [s.sample_id for s in samples_of(parts, "train")] == ["0"]
    with pytest.raises(ValueError, match="split must be one of"):
        samples_of(parts, "everything")


def test_model_references():
    assert parse_model_ref("models:/m@champion", "d") == ("m", None, "champion")
    assert parse_model_ref("models:/m/3", "d") == ("m", "3", None)
    assert parse_model_ref("7", "d") == ("d", "7", None)
    assert parse_model_ref("@challenger", "d") == ("d", None, "challenger")
    with pytest.raises(ValueError, match="models:/<name>/<version>"):
        parse_model_ref("models:/m", "d")

