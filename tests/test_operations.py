"""Operations flows under the Prefect test server, on procedural images with EfficientNet-Lite0 (its
packaged ImageNet weights against a random init: a real, large quality gap), every retrain driven by a
team settings file (tests/common.py's): retrain's promotion rule with a first champion, a clearly better,
an equal and a clearly worse challenger; a retrain with no new data that trains and logs nothing; the
settings each run records; rollback, history and the re-promote no-op through the CLI and the flow, with
the team's floor; promote's refusals; evaluate-bundle; sources that land (`stage1 ingest`'s payload) read
with the configured ones and remembered by the nightly run. All on one module fixture, `scenario` (five
retrains): the tests that need no run are in test_promotion.py and test_deployments.py."""

from __future__ import annotations

import json

import pytest

from stage1core.baselines import BaselineConfig
from stage1core.comparison import ComparisonConfig, MetricFloor
from stage1core.sources import SourceConfig
from stage1core.splits import SplitConfig
from tests.common import EXPERIMENT, MODEL, PROMOTION, artifacts_of, settings_file

# the setting: floors lowered so that a random-init model can be champion at all
LOW_FLOOR = MetricFloor(min_mcc=-1.0, min_auroc=0.0)
LOW_FLOOR_ARGS = ["--min-mcc", "-1", "--min-auroc", "0"]
# tests.common.PROMOTION as the rule it reads as
RULE = ComparisonConfig(n_bootstrap=500, min_test_per_class=15, fnr_margin=0.5, floor=LOW_FLOOR)


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
    assert comp["fnr_increase"]["high"] < RULE.fnr_margin
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

