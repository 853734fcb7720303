"""Operations flows under the Prefect test server, on procedural images with EfficientNet-Lite0 (its
packaged ImageNet weights against a random init: a real, large quality gap): retrain's promotion
rule with a first champion, a clearly better, an equal and a clearly worse challenger; a retrain
with no new data that trains and logs nothing; rollback, history and the re-promote no-op through
the CLI; promote's refusals; evaluate-bundle; and the rule on synthetic predictions, without Prefect
or MLflow."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stage1core.backbone import DEMO_PACKAGE_WEIGHTS, RANDOM_WEIGHTS, BackboneConfig
from stage1core.baselines import BaselineConfig
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
from stage1core.features import FeatureConfig
from stage1core.guarantees import GuaranteeConfig, fnr_threshold
from stage1core.history import (
    MAX_ENTRY_CHARS,
    encode_entry,
    entries_from_tags,
    rollback_target,
    rolled_back_from,
)
from stage1core.sources import SourceConfig
from stage1core.splits import SplitConfig, samples_of
from stage1core.train import TrainConfig
from tasks.registry import parse_model_ref

MODEL = "stage1-ops-test"
EXPERIMENT = "ops-test"
SPLITS = SplitConfig(train=0.4, val=0.1, calib=0.2, test=0.3)
# the setting: floors lowered so that a random-init model can be champion at all
LOW_FLOOR = MetricFloor(min_mcc=-1.0, min_auroc=0.0)
LOW_FLOOR_ARGS = ["--min-mcc", "-1", "--min-auroc", "0"]
# the default rule (MCC lower bound > 0, AUROC and FNR non-inferior), except: ~25 test images per class
# here (the default asks 200), fewer resamples, and the low floor
RULE = ComparisonConfig(n_bootstrap=500, min_test_per_class=15, floor=LOW_FLOOR)


def params(*folders, pretrained: bool = True, **over):
    from flows.train_pipeline import RegistryConfig

    base = {
        "sources": [SourceConfig(path=str(f), kind="folder", name=f.name) for f in folders],
        "splits": SPLITS,
        "backbone": BackboneConfig(name="tf_efficientnet_lite0", pooling="avg",
                                   weights=DEMO_PACKAGE_WEIGHTS if pretrained else RANDOM_WEIGHTS),
        "features": FeatureConfig(batch_size=32, num_workers=0),
        "train": TrainConfig(epochs=4, batch_size=32),
        "guarantee": GuaranteeConfig(alpha=0.2, delta=0.2),
        "registry": RegistryConfig(experiment=EXPERIMENT, model_name=MODEL),
        "comparison": RULE,
        # the rule is tested here; the baseline gate has its own test below
        "baselines": BaselineConfig(margin=0.9),
    }
    base.update(over)
    return base


@pytest.fixture(scope="module")
def street(tmp_path_factory):
    """Procedural street scenes, small files (the backbone sees 224 px either way)."""
    from stage1core.demo import DemoConfig, generate_demo_dataset

    out = tmp_path_factory.mktemp("street")
    generate_demo_dataset(out, DemoConfig(n_images=180, seed=5, n_large=0, png_fraction=0.1, exif_fraction=0.0,
                                          min_size=160, max_size=320))
    return out


@pytest.fixture(scope="module")
def new_images(tmp_path_factory):
    """A second batch of images that 'landed' after the first training runs."""
    from stage1core.demo import DemoConfig, generate_demo_dataset

    out = tmp_path_factory.mktemp("landed")
    generate_demo_dataset(out, DemoConfig(n_images=40, seed=11, n_large=0, png_fraction=0.1, exif_fraction=0.0,
                                          min_size=160, max_size=320))
    return out


def mlflow_client():
    from tasks.tracking import client

    return client()


def n_runs() -> int:
    mc = mlflow_client()
    return len(mc.search_runs([mc.get_experiment_by_name(EXPERIMENT).experiment_id], max_results=1000))


def champion() -> str:
    return str(mlflow_client().get_model_version_by_alias(MODEL, "champion").version)


@pytest.fixture(scope="module")
def scenario(prefect_server, street):
    """Five retrains on the same images: random-init (first champion), pretrained (clearly better),
    pretrained again (no new data), pretrained under another bundle name (equal predictions),
    random-init again (clearly worse; trained before, so judged again without training)."""
    from flows.retrain import retrain
    from flows.train_pipeline import RegistryConfig

    out, champions, runs = {}, [], []
    for name, over in (("first", {"pretrained": False}), ("better", {}), ("again", {}),
                       ("equal", {"registry": RegistryConfig(experiment=EXPERIMENT, model_name=MODEL,
                                                             bundle_name="stage1-roadwork-twin")}),
                       ("worse", {"pretrained": False})):
        before = n_runs() if name != "first" else 0
        out[name] = retrain(**params(street, **over))
        runs.append(n_runs() - before)
        champions.append(champion())
    out["champions"], out["new_runs"] = champions, runs
    return out


@pytest.mark.slow
def test_the_first_retrain_becomes_champion(scenario):
    first = scenario["first"]
    assert first["promoted"] and first["report"]["decision"] == "promote" and first["report"]["comparison"] is None
    assert "no champion yet" in first["report"]["reason"]
    v1 = mlflow_client().get_model_version(MODEL, "1")
    assert v1.tags["champion.promoted_by"] == "retrain" and v1.tags["champion.previous_version"] == "none"
    assert "roadwork classifier bundle" in v1.description  # the model card stays first


@pytest.mark.slow
def test_a_clearly_better_challenger_is_promoted_with_its_figures(scenario):
    better = scenario["better"]
    report = better["report"]
    assert scenario["champions"][:2] == ["1", "2"] and better["promoted"] and report["decision"] == "promote"
    comp = report["comparison"]
    assert comp["mcc_gain"]["low"] > 0 and comp["auroc_gain"]["low"] > -RULE.auroc_margin
    assert comp["fnr_increase"]["high"] < 0.2  # fnr_margin None: the guarantee's alpha
    assert comp["mcc_gain"]["estimate"] == pytest.approx(comp["challenger"]["mcc"] - comp["champion"]["mcc"])
    assert all(c["passed"] for c in report["checks"]) and report["reason"].startswith("MCC gain: +")
    mc = mlflow_client()
    v2, v1 = mc.get_model_version(MODEL, "2"), mc.get_model_version(MODEL, "1")
    assert v2.tags["champion.previous_version"] == "1" and v1.tags["champion.replaced_by"] == "2"
    assert v2.tags["retrain.decision"] == "promote" and "lower bound" in v2.tags["retrain.policy"]
    assert "**PROMOTED** to `champion`" in v2.description and "FNR non-inferior" in v2.description
    saved = mc.download_artifacts(better["train"]["mlflow_run_id"], "comparison/report.json")
    assert json.load(open(saved))["decision"] == "promote"
    metrics = mc.get_run(better["train"]["mlflow_run_id"]).data.metrics
    assert {"compare/mcc_gain", "compare/mcc_gain_low", "compare/auroc_gain_low", "compare/fnr_increase_high"} <= set(
        metrics)


@pytest.mark.slow
def test_a_retrain_with_no_new_data_trains_and_logs_nothing(scenario):
    again = scenario["again"]
    assert again["no_op"] and again["train"] is None and again["report"]["decision"] == "no-op"
    assert scenario["new_runs"][2] == 0  # no MLflow run added
    assert again["challenger_version"] == "2" and scenario["champions"][2] == "2"
    assert "same data and settings and is the champion" in again["report"]["reason"]
    assert "nothing to do" in artifacts_of(again["flow_run_id"])["champion-challenger"].data


@pytest.mark.slow
def test_an_equal_challenger_keeps_the_champion(scenario):
    equal = scenario["equal"]
    report = equal["report"]
    assert equal["challenger_version"] == "3" and not equal["promoted"] and scenario["champions"][3] == "2"
    comp = report["comparison"]
    assert comp["challenger"]["mcc"] == pytest.approx(comp["champion"]["mcc"], abs=1e-9)
    assert comp["mcc_gain"]["low"] <= 0 and report["reason"].startswith("MCC gain: ")
    assert mlflow_client().get_model_version(MODEL, "3").tags["retrain.decision"] == "keep"


@pytest.mark.slow
def test_a_clearly_worse_challenger_is_judged_again_without_training_and_kept(scenario):
    worse = scenario["worse"]
    report = worse["report"]
    # the case: a random-init challenger against the pretrained champion
    assert worse["challenger_version"] == "1" and worse["train"] is None and scenario["new_runs"][4] == 0
    assert not worse["promoted"] and scenario["champions"][4] == "2"
    assert report["comparison"]["auroc_gain"]["estimate"] < -0.1
    assert "AUROC non-inferior" in report["reason"] and report["reused_run_id"]
    assert not next(c for c in report["checks"] if c["check"] == "MCC gain")["passed"]


def artifacts_of(flow_run_id: str) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key: a for a in found}


@pytest.mark.slow
def test_rollback_history_and_the_re_promote_no_op(scenario, street, capsys):
    from deployments import cli
    from flows.retrain import retrain
    from tasks.registry import read_history

    mc = mlflow_client()
    before = read_history(MODEL)
    assert [e["action"] for e in before] == ["promote", "promote", "keep", "keep"]
    assert [e.get("challenger") for e in before] == ["1", "2", "3", "1"]
    assert before[1]["figures"]["mcc_gain"][1] > 0  # the comparison figures travel with the entry

    assert cli.main(["rollback", "--reason", "FNR complaints from the field", "--by", "alice", "--model", MODEL,
                     *LOW_FLOOR_ARGS]) == 0
    assert "v2 -> v1 (rollback by alice)" in capsys.readouterr().out
    v1, v2 = mc.get_model_version(MODEL, "1"), mc.get_model_version(MODEL, "2")
    assert champion() == "1" and v1.tags["champion.previous_version"] == "2"
    assert "champion.replaced_by" not in v1.tags  # it holds the alias again: no stale record
    assert v2.tags["champion.replaced_by"] == "1" and v1.tags["champion.promoted_action"] == "rollback"
    entry = read_history(MODEL)[-1]
    assert (entry["action"], entry["version"], entry["from_version"], entry["by"]) == ("rollback", "1", "2", "alice")
    assert v1.tags[entry["key"]] == v2.tags[entry["key"]] == mc.get_registered_model(MODEL).tags[entry["key"]]

    # moving the alias to the version that holds it: nothing changes, and it says so
    tags = dict(mc.get_model_version(MODEL, "1").tags)
    assert cli.main(["promote", "1", "--reason", "again", "--model", MODEL, *LOW_FLOOR_ARGS]) == 0
    assert "v1 is already @champion" in capsys.readouterr().out
    assert dict(mc.get_model_version(MODEL, "1").tags) == tags and len(read_history(MODEL)) == 5

    # v1 was the first champion: there is nothing further back
    assert cli.main(["rollback", "--reason", "x", "--model", MODEL, *LOW_FLOOR_ARGS]) == 2
    assert "nothing to roll back to" in capsys.readouterr().err

    # retrain does not bring back the version a person rolled back (nothing new: judged again, no run)
    runs = n_runs()
    again = retrain(**params(street))
    assert not again["promoted"] and champion() == "1" and n_runs() == runs
    assert "rolled back by alice" in again["report"]["reason"]

    assert cli.main(["promote", "2", "--reason", "field issue fixed upstream", "--by", "bob", "--model", MODEL,
                     *LOW_FLOOR_ARGS]) == 0
    v2 = mc.get_model_version(MODEL, "2")
    assert champion() == "2" and v2.tags["champion.previous_version"] == "1" and "champion.replaced_by" not in v2.tags

    capsys.readouterr()
    assert cli.main(["history", "--model", MODEL]) == 0
    text = capsys.readouterr().out
    assert "7 entries" in text and "alice" in text and "FNR complaints from the field" in text
    assert cli.main(["history", "--model", MODEL, "--json", "--limit", "3"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [(e["action"], e["version"], e["by"]) for e in entries] == [
        ("rollback", "1", "alice"), ("keep", "1", "retrain"), ("promote", "2", "bob")]
    saved = mc.download_artifacts(v2.run_id, "registry/promotion_history.json")
    assert len(json.load(open(saved))["entries"]) == 7

    # from the UI: the promote flow with version `previous`; v2 replaced v1 (bob), so it goes to v1 again
    from flows.promote import promote

    moved = promote(version="previous", reason="drill", model_name=MODEL, floor=LOW_FLOOR)
    assert champion() == "1" and moved["action"] == "rollback" and moved["previous_version"] == "2"
    assert cli.main(["promote", "2", "--reason", "drill over", "--model", MODEL, *LOW_FLOOR_ARGS]) == 0


@pytest.mark.slow
def test_promote_refuses_below_the_floor_or_a_corrupt_bundle(scenario):
    from flows.promote import promote
    from stage1core.bundle import BundleError

    mc = mlflow_client()
    mcc = float(mc.get_model_version(MODEL, "3").tags["test_mcc"])
    with pytest.raises(ValueError, match="below the floor"):
        promote(version="models:/stage1-ops-test/3", reason="x", model_name=MODEL,
                floor=MetricFloor(min_mcc=min(1.0, mcc + 1e-3), min_auroc=0.0))
    # a version whose bundle does not match its recorded fingerprint is refused (downloaded and checked)
    good = mc.get_model_version(MODEL, "3").tags["bundle_fingerprint"]
    mc.set_model_version_tag(MODEL, "3", "bundle_fingerprint", "0" * 64)
    try:
        with pytest.raises(BundleError, match="refusing to promote"):
            promote(version="3", reason="x", model_name=MODEL, floor=LOW_FLOOR)
    finally:
        mc.set_model_version_tag(MODEL, "3", "bundle_fingerprint", good)
    assert champion() == "2"


@pytest.mark.slow
def test_evaluate_bundle_reproduces_the_test_metrics_and_all_means_every_image(scenario, street, new_images):
    from pathlib import Path

    from flows.evaluate_bundle import evaluate_bundle
    from stage1core.splits import read_split_manifest

    better = scenario["better"]
    source = SourceConfig(path=str(street), kind="folder", name=street.name)
    out = evaluate_bundle(model=f"models:/{MODEL}/2", sources=[source], splits=SPLITS, model_name=MODEL,
                          experiment="ops-test-eval")
    bundle_metrics = json.loads((Path(better["train"]["bundle_path"]) / "metrics.json").read_text())
    assert out["metrics"]["n"] == bundle_metrics["n"]
    assert out["metrics"]["mcc"] == pytest.approx(bundle_metrics["mcc"], abs=1e-9)
    assert out["metrics"]["auroc"] == pytest.approx(bundle_metrics["auroc"], abs=1e-9)
    assert "last_evaluation" in mlflow_client().get_model_version(MODEL, "2").tags
    # all = every image of the sources: train and a train_only source included. (Another salt: a manifest
    # made with the training split config would pin the landed images to train for the next retrain.)
    extra = SourceConfig(path=str(new_images), kind="folder", name="extra", role="train_only")
    every = evaluate_bundle(model=better["train"]["bundle_path"], sources=[source, extra], split="all",
                            splits=SplitConfig(train=0.4, val=0.1, calib=0.2, test=0.3, salt="evaluate-all"),
                            experiment="ops-test-eval")
    _, parts, _ = read_split_manifest(every["split_manifest"])
    assert every["metrics"]["n"] == sum(len(v) for v in parts.values()) == 180 + 40
    assert every["bundle"]["version"] == ""


@pytest.mark.slow
def test_new_images_are_embedded_incrementally_and_judged_on_a_superset_test_split(scenario, street, new_images):
    from flows.retrain import retrain
    from stage1core.splits import read_split_manifest

    landed = retrain(**params(street, new_images))
    _, old, _ = read_split_manifest(scenario["better"]["train"]["split_manifest"])
    _, new, _ = read_split_manifest(landed["train"]["split_manifest"])
    old_test, new_test = {s.sample_id for s in old["test"]}, {s.sample_id for s in new["test"]}
    assert old_test < new_test  # the champion's test images are all still test images, plus new ones
    assert landed["report"]["n_embedded"] == landed["train"]["features"]["n_computed"] == 40
    assert landed["report"]["comparison"]["n_test"] == len(new_test)
    assert landed["report"]["decision"] in ("promote", "keep") and landed["report"]["checks"]


# the rule on predictions, without Prefect or MLflow


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


def test_one_floor_and_one_rule_for_the_cli_the_flows_and_the_deployments(monkeypatch):
    import inspect

    import flows.promote
    from deployments import cli
    from deployments.serve import deployment_specs
    from flows.retrain import retrain

    assert inspect.signature(flows.promote.promote.fn).parameters["floor"].default == MetricFloor()
    assert inspect.signature(retrain.fn).parameters["comparison"].default == ComparisonConfig()
    assert ComparisonConfig().floor == MetricFloor()
    asked = []
    monkeypatch.setattr(flows.promote, "promote", lambda **kw: asked.append(kw) or {
        "model_name": "m", "alias": "champion", "version": "3", "previous_version": "2", "action": "promote",
        "requested_by": "r"})
    assert cli.main(["promote", "3", "--reason", "r"]) == 0
    assert cli.main(["rollback", "--to", "2", "--reason", "r"]) == 0
    assert [kw["floor"] for kw in asked] == [MetricFloor(), MetricFloor()]
    assert asked[1]["version"] == "2" and asked[1]["rollback"]
    assert cli.main(["promote", "3", "--reason", "r", "--min-auroc", "0.6"]) == 0
    assert asked[2]["floor"] == MetricFloor(min_auroc=0.6)  # a flag replaces only its own field
    specs = {s["name"]: s for s in deployment_specs()}
    for name in ("retrain", "promote"):
        flow_params = specs[name].get("parameters") or {}
        assert "comparison" not in flow_params and "floor" not in flow_params, name  # the defaults above apply


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


# deployments/prefect.yaml and `stage1 serve`

def test_every_deployment_loads_and_its_parameters_fit_the_flow():
    import inspect

    from prefect.flows import load_flow_from_entrypoint

    from deployments.serve import WORK_POOLS, deployment_specs

    specs = {s["name"]: s for s in deployment_specs()}
    assert set(specs) == {"train-pipeline", "retrain", "promote", "evaluate-bundle"}
    for name, spec in specs.items():
        flow = load_flow_from_entrypoint(spec["entrypoint"])
        assert flow.name == name
        params = spec.get("parameters") or {}
        assert set(params) <= set(inspect.signature(flow.fn).parameters), name
        required_at_run = {"promote": {"version": "3", "reason": "reviewed in MLflow"}}.get(name, {})
        validated = flow.validate_parameters({**params, **required_at_run})  # what Prefect does at run start
        if name == "retrain":
            assert validated["sources"][0].kind == "parquet"
        assert spec["work_pool"]["name"] in WORK_POOLS and "stage1" in spec["tags"]
        if "gpu" in spec["tags"]:
            jobs = spec["work_pool"]["job_variables"]
            assert spec["work_pool"]["name"] == "gpu" and WORK_POOLS["gpu"] == "docker"
            assert jobs["container_create_kwargs"]["device_requests"][0]["capabilities"] == [["gpu"]]
    assert specs["promote"]["work_pool"]["name"] == "cpu" and WORK_POOLS["cpu"] == "process"


def test_retrain_is_scheduled_and_triggered_by_data_landed_events():
    from prefect.events import DeploymentEventTrigger

    from deployments.serve import build_deployments

    deployments = {d.name: d for d in build_deployments()}
    retrain = deployments["retrain"]
    assert retrain.schedules[0].schedule.cron == "0 2 * * *"
    (trigger,) = retrain.triggers
    assert isinstance(trigger, DeploymentEventTrigger) and trigger.expect == {"stage1.data.landed"}
    assert "{{ event.id }}" in trigger.parameters["trigger"]
    assert deployments["train-pipeline"].concurrency_limit == 1
    assert not deployments["promote"].schedules and not deployments["promote"].triggers


@pytest.mark.slow
def test_ingest_emits_the_data_landed_event(prefect_server, tiny_demo, monkeypatch, capsys):
    from deployments import cli

    sent = []
    import prefect.events

    real = prefect.events.emit_event
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kw: sent.append(kw) or real(**kw))
    assert cli.main(["ingest", str(tiny_demo), "--source-name", "natix", "--note", "batch 7"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["event"] == "stage1.data.landed" and out["resource"] == "stage1.source.natix"
    assert out["n_files"] >= 120 and sent[0]["payload"]["note"] == "batch 7"
    assert cli.main(["ingest", str(tiny_demo / "missing")]) == 2
