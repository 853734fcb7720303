"""The deployments (deployments/prefect.yaml and `stage1 serve`): every one loads and fits its flow, the
process pools get this host's settings, retrain's schedule and data-landed trigger; `stage1 ingest`'s
event; the run forms."""

from __future__ import annotations

import json

import pytest

from stage1core.sources import SourceConfig
from tests.common import MODEL, settings_file, team_settings


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
