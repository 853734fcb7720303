"""Operations flows on tiny data under the Prefect test server: retrain with champion/challenger
promotion (first run, a refusal, a promotion) driven by team settings files and landed sources,
promote (rollback, floor and integrity refusals), evaluate-bundle; the deployments, their forms and
`stage1 ingest`; and the comparison statistics on their own."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stage1core.backbone import BackboneConfig
from stage1core.baselines import BaselineConfig
from stage1core.features import FeatureConfig
from stage1core.guarantees import GuaranteeConfig
from stage1core.sources import SourceConfig
from stage1core.splits import SplitConfig
from stage1core.train import TrainConfig
from tasks.registry import (
    ComparisonConfig,
    MetricFloor,
    baseline_problems,
    check_floor,
    coverage_at_fnr,
    decide,
    paired_mcc_difference,
    parse_model_ref,
)
from tests.conftest import TINY_EVA

MODEL = "stage1-ops-test"
SPLITS = SplitConfig(train=0.45, val=0.15, calib=0.25, test=0.15)


def team_settings(*folders, **over):
    """The team settings of these tests (a tiny random-init Eva on tiny data)."""
    from stage1core.settings import TeamSettings

    base = {
        "model_name": MODEL, "experiment": "ops-test",
        "sources": tuple(SourceConfig(path=str(f), kind="folder", name=f.name) for f in folders),
        "splits": SPLITS,
        "backbone": BackboneConfig(name="vit_small_patch16_dinov3", weights="random", pooling="cls+avg",
                                   model_kwargs=dict(TINY_EVA), input_size=32),
        "features": FeatureConfig(batch_size=32, num_workers=0),
        "train": TrainConfig(epochs=4, batch_size=32),
        "guarantee": GuaranteeConfig(alpha=0.2, delta=0.2),
        "promotion": {"n_bootstrap": 500},
        # the champion/challenger rules are tested here; on ~18 test images of random-init features a
        # head and a baseline differ by several images by chance, so the baseline gate (tested in
        # test_a_head_that_loses_to_a_baseline_is_never_promoted) is set out of the way
        "baselines": BaselineConfig(margin=0.9),
    }
    base.update(over)
    return TeamSettings(**base)


def settings_file(path, *folders, **over) -> str:
    from stage1core.settings import write_settings

    return str(write_settings(team_settings(*folders, **over), path, force=True))


@pytest.fixture(scope="module")
def new_images(tmp_path_factory):
    """A second batch of images that 'landed' after the first training run."""
    from stage1core.demo import DemoConfig, generate_demo_dataset

    out = tmp_path_factory.mktemp("landed")
    generate_demo_dataset(out, DemoConfig(n_images=40, seed=11, n_large=0, png_fraction=0.1, exif_fraction=0.0))
    return out


@pytest.fixture(scope="module")
def history(prefect_server, tiny_demo, new_images, tmp_path_factory):
    """Three retrain runs from a team settings file that configures tiny_demo: first ever (no champion);
    new images landed (as `stage1 ingest` announces them) with an unreachable margin (refusal); the
    nightly run with no event and a margin any challenger meets (it still reads the landed images:
    promotion after comparison)."""
    from flows.retrain import retrain
    from stage1core.settings import landed_record

    landed_record().unlink(missing_ok=True)
    folder = tmp_path_factory.mktemp("settings")
    champions = []

    def run(landed=None, **over):
        path = settings_file(folder / "settings.toml", tiny_demo, **over)
        result = retrain(landed=landed, settings_file=path, trigger="test")
        champions.append(str(mlflow_client().get_model_version_by_alias(MODEL, "champion").version))
        return result

    first = run()
    landed = [{"path": str(new_images), "name": "batch-2", "role": "all", "kind": "folder"}]  # the event's payload
    refused = run(landed, promotion={"n_bootstrap": 500, "min_mcc_gain": 2.0})
    promoted = run(promotion={"n_bootstrap": 500, "min_mcc_gain": -2.0})
    assert champions == ["1", "1", "2"]
    return first, refused, promoted


def mlflow_client():
    from tasks.tracking import client

    return client()


def artifacts_of(flow_run_id: str) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key: a for a in found}


def flow_run_id_of(result) -> str:
    return result["train"]["flow_run_id"]


def parent_run_id(result) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.read_flow_run(flow_run_id_of(result)).parent_task_run_id and
                   client.read_task_run(client.read_flow_run(flow_run_id_of(result)).parent_task_run_id).flow_run_id)


def test_first_retrain_promotes_without_a_champion(history):
    first, _, _ = history
    report = first["report"]
    assert first["promoted"] and report["decision"] == "promote" and report["comparison"] is None
    assert "no champion" in report["reason"]
    mc = mlflow_client()
    assert first["challenger_version"] == "1"
    champion = mc.get_model_version(MODEL, "1")
    assert champion.tags["champion.promoted_by"] == "retrain"
    assert champion.tags["retrain.decision"] == "promote" and champion.tags["champion.previous_version"] == "none"
    assert "Champion/challenger comparison" in champion.description
    assert "roadwork classifier bundle" in champion.description  # the model card stays first
    keys = artifacts_of(parent_run_id(first))
    assert {"champion-challenger", "champion-challenger-table"} <= set(keys)
    assert "PROMOTED" in keys["champion-challenger"].data


def test_new_data_is_embedded_incrementally_and_judged_on_a_superset_test_split(history):
    from stage1core.splits import read_split_manifest

    first, refused, _ = history
    _, old, _ = read_split_manifest(first["train"]["split_manifest"])
    _, new, _ = read_split_manifest(refused["train"]["split_manifest"])
    old_test = {s.sample_id for s in old["test"]}
    new_test = {s.sample_id for s in new["test"]}
    assert old_test < new_test  # the champion's test images are all still test images, plus new ones
    n_old = sum(len(v) for v in old.values())
    n_new = sum(len(v) for v in new.values())
    assert refused["report"]["n_embedded"] == refused["train"]["features"]["n_computed"] == n_new - n_old
    assert refused["report"]["comparison"]["n_test"] == len(new_test)


def test_retrain_reads_the_configured_sources_plus_what_landed_and_keeps_reading_it(history, tiny_demo):
    first, refused, promoted = history
    assert first["sources"] == [tiny_demo.name]
    assert refused["sources"] == [tiny_demo.name, "batch-2"]  # configured + landed (from the event)
    assert promoted["sources"] == [tiny_demo.name, "batch-2"]  # the next run without an event remembers it
    mc = mlflow_client()
    run = mc.get_run(refused["train"]["mlflow_run_id"])
    logged = json.loads(run.data.params["sources"])
    assert [s["name"] for s in logged] == [tiny_demo.name, "batch-2"]
    assert run.data.tags["settings.origin"].endswith("settings.toml")
    version = mc.get_model_version(MODEL, promoted["challenger_version"])  # the last run that registered it
    assert version.tags["settings.fingerprint"] == mc.get_run(promoted["train"]["mlflow_run_id"]).data.tags[
        "settings.fingerprint"] != run.data.tags["settings.fingerprint"]
    saved = mc.download_artifacts(refused["train"]["mlflow_run_id"], "settings/team_settings.json")
    assert json.load(open(saved))["promotion"]["min_mcc_gain"] == 2.0
    assert "team-settings" in artifacts_of(parent_run_id(refused))


def test_refusal_keeps_the_champion_and_says_why(history):
    _, refused, _ = history
    report = refused["report"]
    assert not refused["promoted"] and report["decision"] == "keep"
    assert "below the required margin" in report["reason"] and report["champion_version"] == "1"
    gain = report["comparison"]["mcc_gain"]
    assert gain["low"] <= gain["estimate"] <= gain["high"]
    comp = report["comparison"]
    assert gain["estimate"] == pytest.approx(comp["challenger"]["mcc"] - comp["champion"]["mcc"])
    mc = mlflow_client()
    # the version's tags hold its latest decision (the promotion below); its description keeps both
    v2 = mc.get_model_version(MODEL, refused["challenger_version"])
    assert "retrain.mcc_gain_interval" in v2.tags and "retrain.policy" in v2.tags
    assert "NOT PROMOTED" in v2.description and "**PROMOTED** to `champion`" in v2.description
    saved = mc.download_artifacts(refused["train"]["mlflow_run_id"], "comparison/report.json")
    assert json.load(open(saved))["decision"] == "keep"
    run_artifacts = {a.path for a in mc.list_artifacts(refused["train"]["mlflow_run_id"], "comparison")}
    assert "comparison/report.md" in run_artifacts
    assert "compare/mcc_gain" in mc.get_run(refused["train"]["mlflow_run_id"]).data.metrics
    table = artifacts_of(parent_run_id(refused))["champion-challenger-table"].data
    assert "MCC" in table and "coverage at FNR" in table


def test_a_winning_challenger_is_promoted_with_a_record(history):
    _, refused, promoted = history
    assert promoted["challenger_version"] == refused["challenger_version"] == "2"  # cached: same bundle
    assert promoted["promoted"] and promoted["report"]["comparison"] is not None
    mc = mlflow_client()
    assert str(mc.get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert mc.get_model_version(MODEL, "2").tags["champion.previous_version"] == "1"
    assert mc.get_model_version(MODEL, "1").tags["champion.replaced_by"] == "2"


def test_promote_rolls_back_and_refuses_below_the_floor_or_corrupt(history):
    from flows.promote import promote
    from stage1core.bundle import BundleError

    mc = mlflow_client()
    out = promote(version="1", reason="rollback drill", requested_by="alice", model_name=MODEL)
    assert out["previous_version"] == "2"
    v1 = mc.get_model_version_by_alias(MODEL, "champion")
    assert str(v1.version) == "1" and v1.tags["champion.promoted_by"] == "alice"
    assert v1.tags["champion.promoted_reason"] == "rollback drill"

    mcc = float(v1.tags["test_mcc"])
    if mcc < 1.0:
        with pytest.raises(ValueError, match="below the floor"):
            promote(version="models:/stage1-ops-test/1", reason="x", model_name=MODEL,
                    floor=MetricFloor(min_mcc=min(1.0, mcc + 1e-3)))

    # a version whose bundle does not match its recorded fingerprint is refused (downloaded and checked)
    good = mc.get_model_version(MODEL, "2").tags["bundle_fingerprint"]
    mc.set_model_version_tag(MODEL, "2", "bundle_fingerprint", "0" * 64)
    try:
        with pytest.raises(BundleError, match="refusing to promote"):
            promote(version="2", reason="x", model_name=MODEL)
    finally:
        mc.set_model_version_tag(MODEL, "2", "bundle_fingerprint", good)
    assert str(mc.get_model_version_by_alias(MODEL, "champion").version) == "1"


def test_evaluate_bundle_reproduces_the_registered_test_metrics(history, tiny_demo):
    from pathlib import Path

    from flows.evaluate_bundle import evaluate_bundle

    first, _, _ = history
    out = evaluate_bundle(model=f"models:/{MODEL}/1", sources=[SourceConfig(path=str(tiny_demo), kind="folder",
                                                                            name=tiny_demo.name)],
                          splits=SPLITS, model_name=MODEL, experiment="ops-test-eval")
    bundle_metrics = json.loads((Path(first["train"]["bundle_path"]) / "metrics.json").read_text())
    assert out["metrics"]["n"] == bundle_metrics["n"]
    assert out["metrics"]["mcc"] == pytest.approx(bundle_metrics["mcc"], abs=1e-9)
    assert out["metrics"]["auroc"] == pytest.approx(bundle_metrics["auroc"], abs=1e-9)
    assert "last_evaluation" in mlflow_client().get_model_version(MODEL, "1").tags
    by_path = evaluate_bundle(model=first["train"]["bundle_path"], sources=[SourceConfig(
        path=str(tiny_demo), kind="folder")], splits=SPLITS, split="all", experiment="ops-test-eval")
    assert by_path["metrics"]["n"] > out["metrics"]["n"] and by_path["bundle"]["version"] == ""


# the statistics, without Prefect or MLflow

def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400).astype(bool)
    good = np.where(rng.random(400) < 0.9, y, ~y)
    bad = np.where(rng.random(400) < 0.6, y, ~y)
    diff, low, high = paired_mcc_difference(y, good, bad, n_bootstrap=1000)
    assert 0 < low < diff < high  # a clearly better model: the interval excludes 0
    assert paired_mcc_difference(y, good, good) == (0.0, 0.0, 0.0)
    twin_a = np.where(rng.random(400) < 0.8, y, ~y)
    twin_b = np.where(rng.random(400) < 0.8, y, ~y)
    diff, low, high = paired_mcc_difference(y, twin_a, twin_b, n_bootstrap=1000)
    assert low < 0 < high  # equally good models: the interval straddles 0


def test_coverage_at_fnr():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.95, 0.9, 0.8, 0.45, 0.05, 0.1, 0.3, 0.55])
    # one positive (0.45) is missed at t=0.5; it is the least confident, so deferring it leaves FNR 0
    assert coverage_at_fnr(y, p, 0.5, 0.0) == pytest.approx(7 / 8)
    assert coverage_at_fnr(y, p, 0.5, 0.25) == 1.0
    assert coverage_at_fnr(y, np.where(y == 1, 0.45, 0.0), 0.5, 0.0) == pytest.approx(0.5)  # negatives only


def test_decision_rules():
    comp = {"mcc_gain": {"estimate": 0.03, "low": -0.01, "high": 0.07, "confidence": 0.95}}
    assert decide(None, ComparisonConfig(), floor_problems=[])[0]
    assert not decide(None, ComparisonConfig(), floor_problems=["test MCC 0.1 is below the floor 0.5"])[0]
    assert decide(comp, ComparisonConfig(min_mcc_gain=0.02), floor_problems=[])[0]
    promote, why = decide(comp, ComparisonConfig(min_mcc_gain=0.05), floor_problems=[])
    assert not promote and "below the required margin" in why
    promote, why = decide(comp, ComparisonConfig(min_mcc_gain=0.0, require_significant=True), floor_problems=[])
    assert not promote and "includes 0" in why
    assert check_floor({"mcc": 0.5, "auroc": 0.9, "fnr": 0.01}, MetricFloor(min_mcc=0.4), alpha=0.02) == []
    assert len(check_floor({"mcc": 0.5, "auroc": None, "fnr": 0.05}, MetricFloor(), alpha=0.02)) == 2


def test_a_head_that_loses_to_a_baseline_is_never_promoted(tmp_path):
    from tasks.registry import floor_report

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
        promote, why = decide(None, ComparisonConfig(), floor_problems=problems)
        assert promote is not loses and (verdict in why) is loses


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
            assert validated["backbone"].model_kwargs == TINY_EVA and validated["registry"].model_name == MODEL
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
