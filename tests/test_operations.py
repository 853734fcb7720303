"""Operations flows under the Prefect test server, on procedural images with EfficientNet-Lite0 (its
packaged ImageNet weights against a random init: a real, large quality gap), every retrain driven by a
team settings file: retrain's promotion rule with a first champion, a clearly better, an equal and a
clearly worse challenger; a retrain with no new data that trains and logs nothing; the settings each
run records; rollback, history and the re-promote no-op through the CLI and the flow, with the team's
floor; promote's refusals; evaluate-bundle; sources that land (`stage1 ingest`'s payload) read with the
configured ones and remembered by the nightly run. Without Prefect or MLflow: the rule on synthetic
predictions, the promotion history, one floor and rule for the settings, the CLI, the flows and the
deployments. And the deployments, their forms and `stage1 ingest`."""

from __future__ import annotations

import dataclasses
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
# here (the default asks 200), fewer resamples, and the low floor; as a team writes it in [promotion]
PROMOTION = {"n_bootstrap": 500, "min_test_per_class": 15, "floor": {"min_mcc": -1.0, "min_auroc": 0.0}}
RULE = ComparisonConfig(n_bootstrap=500, min_test_per_class=15, floor=LOW_FLOOR)


def team_settings(*folders, pretrained: bool = True, **over):
    """The team settings of these tests: EfficientNet-Lite0, pretrained or random-init, on `folders`."""
    from stage1core.settings import TeamSettings

    base = {
        "model_name": MODEL, "experiment": EXPERIMENT,
        "sources": tuple(SourceConfig(path=str(f), kind="folder", name=f.name) for f in folders),
        "splits": SPLITS,
        "backbone": BackboneConfig(name="tf_efficientnet_lite0", pooling="avg",
                                   weights=DEMO_PACKAGE_WEIGHTS if pretrained else RANDOM_WEIGHTS),
        "features": FeatureConfig(batch_size=32, num_workers=0),
        "train": TrainConfig(epochs=4, batch_size=32),
        "guarantee": GuaranteeConfig(alpha=0.2, delta=0.2),
        "promotion": PROMOTION,
        # the rule is tested here; the baseline gate has its own test below
        "baselines": BaselineConfig(margin=0.9),
    }
    base.update(over)
    return TeamSettings(**base)


def settings_file(path, *folders, **over) -> str:
    from stage1core.settings import write_settings

    return str(write_settings(team_settings(*folders, **over), path, force=True))


def demo_images(tmp_path_factory, name: str, n_images: int, seed: int):
    """Procedural street scenes, small files (the backbone sees 224 px either way)."""
    from stage1core.demo import DemoConfig, generate_demo_dataset

    out = tmp_path_factory.mktemp(name)
    generate_demo_dataset(out, DemoConfig(n_images=n_images, seed=seed, n_large=0, png_fraction=0.1,
                                          exif_fraction=0.0, min_size=160, max_size=320))
    return out


@pytest.fixture(scope="module")
def street(tmp_path_factory):
    return demo_images(tmp_path_factory, "street", 180, seed=5)


@pytest.fixture(scope="module")
def new_images(tmp_path_factory):
    """A second batch of images that 'landed' after the first training runs."""
    return demo_images(tmp_path_factory, "landed", 40, seed=11)


def mlflow_client():
    from tasks.tracking import client

    return client()


def n_runs() -> int:
    mc = mlflow_client()
    return len(mc.search_runs([mc.get_experiment_by_name(EXPERIMENT).experiment_id], max_results=1000))


def champion() -> str:
    return str(mlflow_client().get_model_version_by_alias(MODEL, "champion").version)


@pytest.fixture(scope="module")
def scenario(prefect_server, street, tmp_path_factory):
    """Five retrains on the same images, each from its team settings file: random-init (first champion),
    pretrained (clearly better), pretrained again (no new data), pretrained with another baseline margin
    (a new bundle, equal predictions), random-init again (clearly worse; trained before, so judged again
    without training)."""
    from flows.retrain import retrain
    from stage1core.settings import landed_record

    landed_record().unlink(missing_ok=True)  # nothing landed yet: the configured source only
    folder = tmp_path_factory.mktemp("settings")
    out, files, champions, runs = {}, {}, [], []
    for name, over in (("first", {"pretrained": False}), ("better", {}), ("again", {}),
                       ("equal", {"baselines": BaselineConfig(margin=0.8)}), ("worse", {"pretrained": False})):
        files[name] = settings_file(folder / f"{name}.toml", street, **over)
        before = n_runs() if name != "first" else 0
        out[name] = retrain(settings_file=files[name], trigger="test")
        runs.append(n_runs() - before)
        champions.append(champion())
    out["champions"], out["new_runs"], out["files"] = champions, runs, files
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
def test_each_retrain_reads_its_settings_file_and_records_them(scenario, street):
    from stage1core.settings import comparison_config, load_settings

    files, mc = scenario["files"], mlflow_client()
    assert comparison_config(load_settings(files["better"])) == RULE  # [promotion] holds the rule's own fields
    better = scenario["better"]
    assert better["settings"] == files["better"] and better["sources"] == [street.name]
    run = mc.get_run(better["train"]["mlflow_run_id"])
    assert run.data.tags["settings.origin"] == files["better"]
    assert [s["name"] for s in json.loads(run.data.params["sources"])] == [street.name]
    saved = mc.download_artifacts(better["train"]["mlflow_run_id"], "settings/team_settings.json")
    assert json.load(open(saved))["promotion"] == PROMOTION
    fingerprints = {name: load_settings(path).fingerprint for name, path in files.items()}
    v1, v2, v3 = (mc.get_model_version(MODEL, v) for v in ("1", "2", "3"))
    assert v2.tags["settings.fingerprint"] == run.data.tags["settings.fingerprint"] == fingerprints["better"]
    assert v3.tags["settings.fingerprint"] == fingerprints["equal"] != fingerprints["better"]
    # v1 was judged again by the `worse` run without training: it keeps the settings that trained it
    assert v1.tags["settings.origin"] == files["first"] and fingerprints["worse"] == fingerprints["first"]
    for name in ("better", "again"):  # the settings in force are shown on every run, a no-op's too
        assert "team-settings" in artifacts_of(scenario[name]["flow_run_id"])


@pytest.mark.slow
def test_rollback_history_and_the_re_promote_no_op(scenario, monkeypatch, capsys):
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

    # from here the CLI takes the model and the floor from the team settings, as a team runs it
    monkeypatch.setenv("STAGE1_SETTINGS", scenario["files"]["better"])
    # moving the alias to the version that holds it: nothing changes, and it says so
    tags = dict(mc.get_model_version(MODEL, "1").tags)
    assert cli.main(["promote", "1", "--reason", "again"]) == 0
    assert "v1 is already @champion" in capsys.readouterr().out
    assert dict(mc.get_model_version(MODEL, "1").tags) == tags and len(read_history(MODEL)) == 5

    # v1 was the first champion: there is nothing further back
    assert cli.main(["rollback", "--reason", "x"]) == 2
    assert "nothing to roll back to" in capsys.readouterr().err

    # retrain does not bring back the version a person rolled back (nothing new: judged again, no run)
    runs = n_runs()
    again = retrain(settings_file=scenario["files"]["better"])
    assert not again["promoted"] and champion() == "1" and n_runs() == runs
    assert "rolled back by alice" in again["report"]["reason"]

    assert cli.main(["promote", "2", "--reason", "field issue fixed upstream", "--by", "bob", "--model", MODEL,
                     *LOW_FLOOR_ARGS]) == 0
    v2 = mc.get_model_version(MODEL, "2")
    assert champion() == "2" and v2.tags["champion.previous_version"] == "1" and "champion.replaced_by" not in v2.tags

    capsys.readouterr()
    assert cli.main(["history"]) == 0
    text = capsys.readouterr().out
    assert "7 entries" in text and "alice" in text and "FNR complaints from the field" in text
    assert cli.main(["history", "--model", MODEL, "--json", "--limit", "3"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [(e["action"], e["version"], e["by"]) for e in entries] == [
        ("rollback", "1", "alice"), ("keep", "1", "retrain"), ("promote", "2", "bob")]
    saved = mc.download_artifacts(v2.run_id, "registry/promotion_history.json")
    assert len(json.load(open(saved))["entries"]) == 7

    # from the UI: the promote flow with version `previous`, its model and floor from the settings file;
    # v2 replaced v1 (bob), so it goes to v1 again
    from flows.promote import promote

    moved = promote(version="previous", reason="drill", settings_file=scenario["files"]["better"])
    assert champion() == "1" and moved["action"] == "rollback" and moved["previous_version"] == "2"
    assert moved["model_name"] == MODEL
    assert cli.main(["promote", "2", "--reason", "drill over"]) == 0


@pytest.mark.slow
def test_promote_refuses_below_the_floor_or_a_corrupt_bundle(scenario, tmp_path):
    from flows.promote import promote
    from stage1core.bundle import BundleError

    mc = mlflow_client()
    mcc = float(mc.get_model_version(MODEL, "3").tags["test_mcc"])
    with pytest.raises(ValueError, match="below the floor"):
        promote(version="models:/stage1-ops-test/3", reason="x", model_name=MODEL,
                floor=MetricFloor(min_mcc=min(1.0, mcc + 1e-3), min_auroc=0.0))
    # no floor given: the team's, from its settings file
    strict = settings_file(tmp_path / "strict.toml", promotion={"floor": {"min_mcc": min(1.0, mcc + 1e-3)}})
    with pytest.raises(ValueError, match=f"below the floor {min(1.0, mcc + 1e-3)}"):
        promote(version="3", reason="x", settings_file=strict)
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
    # model name, sources and splits from the team settings, as the deployment runs it
    out = evaluate_bundle(model="2", settings_file=scenario["files"]["better"], experiment="ops-test-eval")
    bundle_metrics = json.loads((Path(better["train"]["bundle_path"]) / "metrics.json").read_text())
    assert out["split_manifest"] == better["train"]["split_manifest"]
    assert out["metrics"]["n"] == bundle_metrics["n"]
    assert out["metrics"]["mcc"] == pytest.approx(bundle_metrics["mcc"], abs=1e-9)
    assert out["metrics"]["auroc"] == pytest.approx(bundle_metrics["auroc"], abs=1e-9)
    assert "last_evaluation" in mlflow_client().get_model_version(MODEL, "2").tags
    # all = every image of the sources: train and a train_only source included. (Another salt: a manifest
    # made with the training split config would pin the landed images to train for the next retrain.)
    source = SourceConfig(path=str(street), kind="folder", name=street.name)
    extra = SourceConfig(path=str(new_images), kind="folder", name="extra", role="train_only")
    every = evaluate_bundle(model=better["train"]["bundle_path"], sources=[source, extra], split="all",
                            splits=SplitConfig(train=0.4, val=0.1, calib=0.2, test=0.3, salt="evaluate-all"),
                            model_name=MODEL, experiment="ops-test-eval")
    _, parts, _ = read_split_manifest(every["split_manifest"])
    assert every["metrics"]["n"] == sum(len(v) for v in parts.values()) == 180 + 40
    assert every["bundle"]["version"] == ""


@pytest.mark.slow
def test_retrain_reads_the_configured_sources_plus_what_landed_and_keeps_reading_it(scenario, street, new_images):
    from flows.retrain import retrain
    from stage1core.settings import landed_record, landed_sources
    from stage1core.splits import read_split_manifest

    path = scenario["files"]["better"]
    assert landed_sources() == ()
    payload = [{"path": str(new_images), "name": "batch-2", "role": "all", "kind": "folder"}]  # `stage1 ingest`'s
    try:
        landed = retrain(landed=payload, settings_file=path, trigger="event test")
        assert landed["sources"] == [street.name, "batch-2"]  # configured + landed
        run = mlflow_client().get_run(landed["train"]["mlflow_run_id"])
        assert [s["name"] for s in json.loads(run.data.params["sources"])] == [street.name, "batch-2"]
        _, old, _ = read_split_manifest(scenario["better"]["train"]["split_manifest"])
        _, new, _ = read_split_manifest(landed["train"]["split_manifest"])
        old_test, new_test = {s.sample_id for s in old["test"]}, {s.sample_id for s in new["test"]}
        assert old_test < new_test  # the champion's test images are all still test images, plus new ones
        assert landed["report"]["n_embedded"] == landed["train"]["features"]["n_computed"] == 40
        assert landed["report"]["comparison"]["n_test"] == len(new_test)
        assert landed["report"]["decision"] in ("promote", "keep") and landed["report"]["checks"]
        assert [s.path for s in landed_sources()] == [str(new_images)]

        # the nightly run (no event) still reads what landed; nothing new since: a no-op, no MLflow run
        runs = n_runs()
        nightly = retrain(settings_file=path, trigger="schedule")
        assert nightly["sources"] == [street.name, "batch-2"]
        assert nightly["no_op"] and nightly["challenger_version"] == landed["challenger_version"]
        assert n_runs() == runs
    finally:
        landed_record().unlink(missing_ok=True)


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


# deployments/prefect.yaml and `stage1 serve`

def test_every_deployment_loads_and_its_parameters_fit_the_flow(tmp_path, monkeypatch):
    import inspect

    from prefect.flows import load_flow_from_entrypoint

    from deployments.serve import WORK_POOLS, load_project, rendered_specs

    monkeypatch.setenv("STAGE1_SETTINGS", settings_file(tmp_path / "team.toml", tmp_path / "natix"))
    specs = {s["name"]: s for s in rendered_specs()}  # what `prefect deploy` and `stage1 serve` register
    assert set(specs) == {"train-pipeline", "retrain", "promote", "evaluate-bundle"}
    for name, spec in specs.items():
        flow = load_flow_from_entrypoint(spec["entrypoint"])
        assert flow.name == name
        params = spec.get("parameters") or {}
        assert set(params) <= set(inspect.signature(flow.fn).parameters), name
        required_at_run = {"promote": {"version": "3", "reason": "reviewed in MLflow"}}.get(name, {})
        validated = flow.validate_parameters({**params, **required_at_run})  # what Prefect does at run start
        if name == "train-pipeline":  # the form opens with the team settings
            assert validated["sources"][0].path == str(tmp_path / "natix")
            assert validated["backbone"] == team_settings().backbone and validated["registry"].model_name == MODEL
        assert spec["work_pool"]["name"] in WORK_POOLS and "stage1" in spec["tags"]
        assert spec["work_pool"]["name"] == ("cpu" if name == "promote" else "gpu")
    # no team values in prefect.yaml itself: retrain, promote and evaluate-bundle read the settings at run time
    raw = {s["name"]: s for s in load_project()["deployments"]}
    assert raw["retrain"]["parameters"] == {"trigger": "schedule"}
    assert "floor" not in raw["promote"]["parameters"] and "sources" not in raw["evaluate-bundle"]["parameters"]
    assert WORK_POOLS == {"cpu": "process", "gpu": "process"}


def test_process_pools_get_this_hosts_state_tracking_and_settings(monkeypatch, tmp_path):
    from deployments.serve import rendered_specs

    monkeypatch.setenv("STAGE1_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:15000")
    monkeypatch.setenv("STAGE1_SETTINGS", settings_file(tmp_path / "team.toml", tmp_path / "natix"))
    for spec in rendered_specs():
        # the docker job variables of the compose setup (docker/prefect.yaml) are nowhere here
        assert spec["work_pool"]["job_variables"] == {"env": {
            "STAGE1_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": "http://127.0.0.1:15000",
            "STAGE1_SETTINGS": str(tmp_path / "team.toml")}}, spec["name"]


def test_retrain_is_scheduled_and_triggered_by_data_landed_events():
    from prefect.events import DeploymentEventTrigger

    from deployments.serve import build_deployments

    deployments = {d.name: d for d in build_deployments()}
    retrain = deployments["retrain"]
    assert retrain.schedules[0].schedule.cron == "0 2 * * *"
    (trigger,) = retrain.triggers
    assert isinstance(trigger, DeploymentEventTrigger) and trigger.expect == {"stage1.data.landed"}
    assert "{{ event.id }}" in trigger.parameters["trigger"]
    # what landed reaches the run as structured parameters (a single expression keeps its JSON type)
    assert trigger.parameters["landed"] == "{{ event.payload.landed }}"
    assert deployments["train-pipeline"].concurrency_limit == 1
    assert not deployments["promote"].schedules and not deployments["promote"].triggers


@pytest.mark.slow
def test_ingest_emits_the_data_landed_event_with_what_landed(prefect_server, tiny_demo, monkeypatch, capsys):
    from deployments import cli
    from flows.retrain import retrain

    sent = []
    import prefect.events

    real = prefect.events.emit_event
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kw: sent.append(kw) or real(**kw))
    assert cli.main(["ingest", str(tiny_demo), "--source-name", "natix", "--note", "batch 7",
                     "--role", "train_only"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["event"] == "stage1.data.landed" and out["resource"] == "stage1.source.natix"
    # 120 images: labels.csv and demo.json beside them are not counted
    assert out["n_images"] == 120 and sent[0]["payload"]["n_images"] == 120
    assert sent[0]["payload"]["note"] == "batch 7"
    landed = sent[0]["payload"]["landed"]
    assert landed == [{"path": str(tiny_demo), "name": "natix", "role": "train_only", "kind": "folder"}]
    (source,) = retrain.validate_parameters({"landed": landed})["landed"]  # the trigger hands it over as is
    assert isinstance(source, SourceConfig) and source.role == "train_only" and source.name == "natix"
    assert cli.main(["ingest", str(tiny_demo / "missing")]) == 2
    assert cli.main(["ingest", str(tiny_demo / "roadwork")]) == 2  # not a source layout: said now, not at 02:00
    assert "nothing was announced" in capsys.readouterr().err


# the run forms: small where it matters, every field described, closed sets as enums

def _schema(flow):
    from prefect.utilities.callables import parameter_schema

    return parameter_schema(flow.fn).model_dump()


def test_the_retrain_form_holds_only_what_changes_per_run():
    from flows.retrain import retrain

    schema = _schema(retrain)
    assert list(schema["properties"]) == ["landed", "auto_promote", "settings_file", "trigger"]
    assert all(p.get("description") for p in schema["properties"].values())
    assert set(schema["definitions"]) == {"SourceConfig"}


def test_every_form_field_has_a_description_and_closed_sets_are_enums():
    from flows.evaluate_bundle import evaluate_bundle
    from flows.promote import promote
    from flows.retrain import retrain
    from flows.train_pipeline import train_pipeline

    missing = []
    for flow in (train_pipeline, retrain, promote, evaluate_bundle):
        schema = _schema(flow)
        missing += [f"{flow.name}.{k}" for k, v in schema["properties"].items() if not v.get("description")]
        for name, definition in schema["definitions"].items():
            missing += [f"{name}.{k}" for k, v in definition["properties"].items() if not v.get("description")]
    assert missing == []
    defs = _schema(train_pipeline)["definitions"]

    def enum(cls, field):
        prop = defs[cls]["properties"][field]
        return prop.get("enum") or next(p["enum"] for p in prop.get("anyOf", []) if "enum" in p)

    assert enum("SourceConfig", "kind") == ["auto", "folder", "csv", "json", "parquet"]
    assert enum("SourceConfig", "role") == ["all", "train_only"]
    assert enum("BackboneConfig", "weights") == ["pretrained", "random", "efficientnet-lite0-package", "file"]
    assert enum("FinetuneConfig", "precision") == ["fp32", "bf16"]
    assert enum("FinetuneConfig", "optimizer") == ["fsam", "adamw"]
    assert enum("AdapterConfig", "method") == ["lora", "dora"]
    assert _schema(evaluate_bundle)["properties"]["split"]["enum"] == ["test", "calib", "val", "train", "all"]
