"""End to end: train_pipeline on tiny demo data with a tiny random-init DINOv3 (Eva) backbone, under
a Prefect test server and a temporary MLflow store. The flow runs are marked slow; the parameter form is not."""

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from stage1core.backbone import BackboneConfig
from stage1core.features import FeatureConfig
from stage1core.guarantees import GuaranteeConfig
from stage1core.sources import SourceConfig
from stage1core.splits import SplitConfig
from stage1core.train import TrainConfig
from tests.common import HANG_TIMEOUT_S, TINY_EVA


def params(tiny_demo, **over):
    from flows.train_pipeline import RegistryConfig

    base = {
        "sources": [SourceConfig(path=str(tiny_demo), kind="folder", name="tiny")],
        "splits": SplitConfig(train=0.45, val=0.15, calib=0.25, test=0.15),
        "backbone": BackboneConfig(name="vit_small_patch16_dinov3", weights="random", pooling="cls+avg",
                                   model_kwargs=dict(TINY_EVA), input_size=32),
        "features": FeatureConfig(batch_size=32, num_workers=0),
        "train": TrainConfig(epochs=4, batch_size=32),
        "guarantee": GuaranteeConfig(alpha=0.2, delta=0.2),
        "registry": RegistryConfig(experiment="flow-test", model_name="stage1-flow-test"),
    }
    base.update(over)
    return base


def task_states(flow_run_id: str, expected: tuple[str, ...] = ()) -> dict[str, str]:
    """Final state name per task of a flow run.

    Prefect's server records task runs from the client's events asynchronously, so right after the flow
    returns a task run may still be missing or have no state (seen on a loaded machine): wait, bounded,
    until the `expected` tasks are there and every task run has a final state.
    """
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + HANG_TIMEOUT_S
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        states = {r.name.rsplit("-", 1)[0]: r.state for r in runs}
        if set(expected) <= set(states) and all(s is not None and s.is_final() for s in states.values()):
            return {name: state.name for name, state in states.items()}
        assert time.monotonic() < deadline, f"task runs of {flow_run_id} not recorded: {states}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def first_run(prefect_server, tiny_demo):
    from flows.train_pipeline import train_pipeline

    return train_pipeline(**params(tiny_demo))


@pytest.fixture(scope="module")
def file_backbone(tmp_path_factory) -> BackboneConfig:
    """The tiny Eva with its (random-init) weights in a file, as production DINOv3 weights are."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, **TINY_EVA)
    path = tmp_path_factory.mktemp("weights") / "tiny-eva.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return BackboneConfig(name="vit_small_patch16_dinov3", weights="file", weights_file=str(path), pooling="cls+avg",
                          model_kwargs=dict(TINY_EVA), input_size=32)


@contextmanager
def count_weight_hashes(weights_file: str):
    """The paths of `weights_file` hashed (stage1core.fingerprint.sha256_file, wherever it was imported)
    in this process while the block runs."""
    import sys

    from stage1core import fingerprint as fingerprints

    original, hashed = fingerprints.sha256_file, []

    def counting(path, *args, **kwargs):
        if Path(path).resolve() == Path(weights_file).resolve():
            hashed.append(str(path))
        return original(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        for name, module in list(sys.modules.items()):
            ours = name.split(".")[0] in ("stage1core", "tasks", "flows")
            if ours and getattr(module, "sha256_file", None) is original:
                mp.setattr(module, "sha256_file", counting)
        yield hashed


@pytest.mark.slow
def test_the_backbone_weights_are_hashed_once_per_run(prefect_server, tiny_demo, file_backbone):
    """resolve_backbone hashes the weights file; the cache keys, the feature precision, the feature store
    and the export take the resolved spec. A second (fully cached) run hashes the file again, once: the file
    behind a path can change between runs."""
    from flows.train_pipeline import RegistryConfig, train_pipeline

    # features.precision "auto" is part of the features' cache key: deciding it needs the spec too
    run = params(tiny_demo, backbone=file_backbone,
                 registry=RegistryConfig(experiment="flow-test", model_name="stage1-flow-test", register=False,
                                         bundle_name="weights-file"))
    for attempt in ("first", "cached"):
        with count_weight_hashes(file_backbone.weights_file) as hashed:
            result = train_pipeline(**run)
        assert hashed == [file_backbone.weights_file], attempt
    states = task_states(result["flow_run_id"], expected=("resolve_backbone", "extract_features", "export_bundle"))
    assert states["resolve_backbone"] == "Completed" and states["extract_features"] == "Cached"
    manifest = json.loads((Path(result["bundle_path"]) / "backbone.json").read_text())
    assert manifest["weights_kind"] == "file" and manifest["weights_file"] == file_backbone.weights_file


@pytest.mark.slow
def test_pipeline_registers_a_valid_bundle(first_run, tiny_demo):
    import mlflow
    from mlflow.tracking import MlflowClient

    from stage1core.bundle import load_bundle, read_manifest
    from stage1core.splits import read_split_manifest

    result = first_run
    manifest = read_manifest(result["bundle_path"])
    assert manifest["backbone_random_init"] is True and manifest["policy"] == "threshold"
    thr = result["thresholds"]
    assert thr["violation_bound"] <= 0.2 and thr["n_positives"] >= 8

    client = MlflowClient()
    version = client.get_model_version_by_alias("stage1-flow-test", "challenger")
    assert str(version.version) == result["registered"]["version"] == "1"
    assert version.tags["bundle_fingerprint"] == result["bundle_fingerprint"]
    assert version.tags["prefect_flow_run_id"] == result["flow_run_id"]
    assert "roadwork classifier bundle" in version.description
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"] == result["flow_run_id"]
    assert run.data.tags["data_fingerprint"] == manifest["inputs"]["data_fingerprint"]
    assert "test/mcc" in run.data.metrics and run.data.params["backbone.name"] == "vit_small_patch16_dinov3"
    history = client.get_metric_history(result["mlflow_run_id"], "train/val_brier")
    epochs = json.loads((Path(result["bundle_path"]) / "head.json").read_text())["history"]  # of the chosen head
    assert sorted(m.step for m in history) == [row["epoch"] for row in epochs]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([r["val_brier"] for r in epochs])
    artifacts = {a.path for a in client.list_artifacts(result["mlflow_run_id"], "bundle")}
    assert "bundle/manifest.json" in artifacts and "bundle/head.safetensors" in artifacts

    # the Predictor reproduces the bundle's test predictions from the raw image files
    preds = json.loads((Path(result["bundle_path"]) / "test_predictions.json").read_text())
    _, splits, _ = read_split_manifest(result["split_manifest"])
    locator = {s.sample_id: s.locator for s in splits["test"]}
    predictor = load_bundle(result["bundle_path"], device="cpu")
    p = predictor.predict_proba([locator[sid] for sid in preds["sample_ids"]])
    np.testing.assert_allclose(p, preds["p_roadwork"], atol=1e-5)

    # the registered pyfunc serves the same numbers from base64 JPEG input
    import base64

    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/stage1-flow-test@challenger")
    sid = preds["sample_ids"][0]
    frame = pd.DataFrame({"image": [base64.b64encode(open(locator[sid], "rb").read()).decode()]})
    out = model.predict(frame)
    assert out["p_roadwork"][0] == pytest.approx(preds["p_roadwork"][0], abs=1e-5)


@pytest.mark.slow
def test_run_shows_head_selection_and_baselines_everywhere(first_run):
    from mlflow.tracking import MlflowClient

    result = first_run
    bundle = Path(result["bundle_path"])
    head_meta = json.loads((bundle / "head.json").read_text())
    grid = head_meta["grid"]
    # cls+avg features: linear and mlp heads on each of the three views
    assert {(r["kind"], r["view"]) for r in grid} == {(k, v) for k in ("linear", "mlp") for v in ("all", "cls", "avg")}
    chosen = [r for r in grid if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["kind"] == result["head"]["kind"] == head_meta["kind"]
    assert result["head"]["n_candidates"] == len(grid)

    judged = json.loads((bundle / "baselines.json").read_text())
    assert set(judged["baselines"]) == {"logistic", "knn"}
    assert judged["head"]["accuracy_at_0.5"] == pytest.approx(result["metrics"]["accuracy_at_0.5"])
    card = (bundle / "model_card.md").read_text()
    assert result["head"]["chosen"] in card and "## Head vs baselines" in card
    assert "| logistic |" in card and "| knn |" in card
    assert head_meta["criterion"] in card and "standard errors of the best wins" in head_meta["criterion"]

    client = MlflowClient()
    run = client.get_run(result["mlflow_run_id"])
    for name in ("logistic", "knn"):
        for key in ("accuracy_at_0.5", "mcc_at_0.5", "auroc"):
            assert run.data.metrics[f"baseline/{name}/{key}"] == pytest.approx(judged["baselines"][name][key])
    assert "selection/grid.json" in {a.path for a in client.list_artifacts(result["mlflow_run_id"], "selection")}
    version = client.get_model_version("stage1-flow-test", result["registered"]["version"])
    expected = "loses_to_baseline" if judged["comparison"]["loses"] else "ok"
    assert version.tags["quality"] == run.data.tags["quality"] == expected
    assert version.tags["selection.chosen"] == result["head"]["chosen"]
    assert version.tags["baseline.logistic.mcc_at_0.5"] == f"{judged['baselines']['logistic']['mcc_at_0.5']:.4f}"

    from tests.common import artifacts_of

    artifacts = artifacts_of(result["flow_run_id"])
    assert {"head-vs-baselines", "head-selection", "run-summary"} <= set(artifacts)
    assert "Head selection" in artifacts["run-summary"].data and "| logistic |" in artifacts["run-summary"].data


@pytest.mark.slow
def test_second_run_is_served_from_cache(first_run, tiny_demo):
    from flows.train_pipeline import train_pipeline

    second = train_pipeline(**params(tiny_demo))
    cached = ("extract_features", "fit_head", "calibrate", "evaluate_test", "score_baselines", "export_bundle")
    states = task_states(second["flow_run_id"], expected=(*cached, "build_splits"))
    for name in cached:
        assert states[name] == "Cached", (name, states)
    assert states["build_splits"] == "Completed"
    assert second["bundle_fingerprint"] == first_run["bundle_fingerprint"]
    assert second["registered"]["version"] == first_run["registered"]["version"]  # no duplicate version
    assert second["metrics"] == first_run["metrics"]


@pytest.mark.slow
def test_deleted_outputs_are_recomputed_not_served_stale(first_run, tiny_demo):
    import shutil

    from flows.train_pipeline import train_pipeline

    shutil.rmtree(first_run["bundle_path"])
    third = train_pipeline(**params(tiny_demo))
    states = task_states(third["flow_run_id"], expected=("export_bundle", "fit_head"))
    assert states["export_bundle"] == "Completed" and states["fit_head"] == "Cached"
    assert third["bundle_path"] == first_run["bundle_path"]
    from stage1core.bundle import read_manifest

    read_manifest(third["bundle_path"])


@pytest.mark.slow
def test_the_registered_version_refuses_a_bundle_forged_in_the_artifact_store(first_run):
    """Edit the registered bundle's threshold where MLflow keeps it and re-hash every file and the manifest:
    integrity checks pass, but the fingerprint is no longer the one recorded at registration."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from stage1core.fingerprint import fingerprint, sha256_file

    client = MlflowClient()
    version = client.get_model_version("stage1-flow-test", first_run["registered"]["version"])
    location = client.get_logged_model(version.model_id or version.source.removeprefix("models:/")).artifact_location
    (manifest_path,) = Path(location.removeprefix("file://")).rglob("manifest.json")
    bundle = manifest_path.parent
    saved = {p: p.read_bytes() for p in (bundle / "thresholds.json", manifest_path)}
    try:
        thresholds = json.loads((bundle / "thresholds.json").read_text())
        thresholds["threshold"] = 0.0  # everything becomes roadwork
        (bundle / "thresholds.json").write_text(json.dumps(thresholds))
        manifest = json.loads(manifest_path.read_text())
        manifest["files"] = {rel: sha256_file(bundle / rel) for rel in manifest["files"]}
        manifest["fingerprint"] = fingerprint("bundle", manifest["format_version"], manifest["name"],
                                              manifest["policy"], manifest["backbone_fingerprint"], manifest["files"],
                                              manifest["inputs"])
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(Exception, match="is not the registered"):
            mlflow.pyfunc.load_model(f"models:/stage1-flow-test/{version.version}")
    finally:
        for path, data in saved.items():
            path.write_bytes(data)
    mlflow.pyfunc.load_model(f"models:/stage1-flow-test/{version.version}")  # the genuine bundle loads


@pytest.mark.slow
def test_too_few_calib_positives_fails_with_the_needed_number(prefect_server, tiny_demo):
    from flows.train_pipeline import train_pipeline
    from stage1core.guarantees import InsufficientCalibrationData

    with pytest.raises(InsufficientCalibrationData, match="149"):
        train_pipeline(**params(tiny_demo, guarantee=GuaranteeConfig(alpha=0.02, delta=0.05)))


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["gate", "scrc"])
def test_selective_head_with_each_policy(prefect_server, tiny_demo, policy):
    from flows.train_pipeline import RegistryConfig, train_pipeline
    from stage1core.bundle import load_bundle, read_manifest
    from stage1core.heads import HeadConfig
    from stage1core.policy import PolicyConfig
    from stage1core.splits import read_split_manifest

    config = PolicyConfig(policy=policy, calibrator="dirichlet", gate_min_confidence=0.3, scrc_alpha=0.4,
                          scrc_delta=0.4, scrc_xi=0.3, scrc_score="gate", scrc_grid_size=2)
    result = train_pipeline(**params(
        tiny_demo, head=HeadConfig(kind="selective", target_coverage=0.7), policy=config,
        registry=RegistryConfig(experiment="flow-test", model_name="stage1-flow-test", register=False,
                                bundle_name=f"policy-{policy}"),
    ))
    manifest = read_manifest(result["bundle_path"])
    assert manifest["policy"] == policy
    expected = {"thresholds.json", "policy.json", "calibration.json", "gateparams.json"}
    if policy == "scrc":
        expected.add("scrcparams.json")
    assert expected <= set(manifest["files"])
    m = result["metrics"]
    assert m["policy"] == policy and 0.0 < m["coverage"] <= 1.0 and m["calibrator"] == "dirichlet"
    assert {"selective/gate/aurc", "calibration/raw/ece", "calibration/dirichlet/nll"} <= set(m)
    assert {"plots/reliability.png", "plots/risk_coverage.png"} <= set(manifest["files"])

    preds = json.loads((Path(result["bundle_path"]) / "test_predictions.json").read_text())
    _, splits, _ = read_split_manifest(result["split_manifest"])
    locator = {s.sample_id: s.locator for s in splits["test"]}
    out = load_bundle(result["bundle_path"], device="cpu").predict([locator[s] for s in preds["sample_ids"]])
    assert [-1 if r["abstain"] else r["decision"] for r in out] == preds["decision"]
    assert all((r["prediction_set"] == []) == r["abstain"] for r in out)
    assert np.mean([not r["abstain"] for r in out]) == pytest.approx(m["coverage"])


def test_parameters_render_as_a_typed_form_and_validate():
    from prefect.utilities.callables import parameter_schema

    from flows.train_pipeline import train_pipeline

    schema = parameter_schema(train_pipeline.fn).model_dump()
    assert {"sources", "splits", "backbone", "features", "head", "train", "selection", "baselines", "guarantee",
            "policy", "registry"} <= set(schema["properties"])
    assert schema["definitions"]["SelectionConfig"]["properties"]["enabled"]["default"] is True
    assert schema["definitions"]["HeadConfig"]["properties"]["kind"]["enum"] == ["auto", "mlp", "linear", "selective"]
    backbone = schema["definitions"]["BackboneConfig"]["properties"]
    assert backbone["pooling"]["enum"] == ["cls", "avg", "cls+avg"]
    assert schema["definitions"]["GuaranteeConfig"]["properties"]["alpha"]["default"] == 0.02
    values = train_pipeline.validate_parameters(
        {"backbone": {"name": "tf_efficientnet_lite0", "weights": "random", "pooling": "avg"},
         "sources": [{"path": "/data/labels.csv", "role": "train_only"}]})
    assert isinstance(values["backbone"], BackboneConfig) and values["backbone"].pooling == "avg"
    assert isinstance(values["sources"][0], SourceConfig) and values["sources"][0].role == "train_only"
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError):
        train_pipeline.validate_parameters({"backbone": {"pooling": "max"}})


def test_every_train_pipeline_parameter_comes_from_the_team_settings():
    """retrain and the deployment's form take train_pipeline's parameters from one function: a parameter
    added to the flow and not to it fails here, and the product defaults agree on both sides."""
    import inspect

    from deployments.steps import train_pipeline_parameters
    from flows.train_pipeline import parameters_from_settings, train_pipeline
    from stage1core.settings import TeamSettings, demo_settings

    signature = inspect.signature(train_pipeline.fn).parameters
    assert parameters_from_settings(TeamSettings()) == {name: p.default for name, p in signature.items()}
    settings = demo_settings()
    chosen = [SourceConfig(path="/data/natix", kind="parquet")]
    assert parameters_from_settings(settings, chosen)["sources"] == chosen
    # the form's defaults (JSON) validate into the same parameters retrain passes
    assert train_pipeline.validate_parameters(train_pipeline_parameters(settings)) == parameters_from_settings(settings)


@pytest.mark.slow
def test_contradicting_parameters_fail_before_any_work(prefect_server, tiny_demo):
    from mlflow.tracking import MlflowClient

    from flows.train_pipeline import RegistryConfig, train_pipeline
    from stage1core.finetune import FinetuneConfig
    from stage1core.modes import BackboneModeError
    from stage1core.peft import AdapterConfig

    registry = RegistryConfig(experiment="flow-test-refused", model_name="stage1-flow-test", register=False)
    with pytest.raises(BackboneModeError, match="backbone_mode 'lora' and finetune.adapter.method 'dora' disagree"):
        train_pipeline(**params(tiny_demo, backbone_mode="lora", registry=registry))
    lora = FinetuneConfig(adapter=AdapterConfig(method="lora"))
    with pytest.raises(BackboneModeError, match=r"would be ignored: train.epochs = 4 \(default 40\); "
                                                r"train.batch_size = 32 \(default 128\)"):
        train_pipeline(**params(tiny_demo, backbone_mode="lora", finetune=lora, registry=registry))
    assert MlflowClient().get_experiment_by_name("flow-test-refused") is None  # no MLflow run was started


@pytest.mark.slow
@pytest.mark.parametrize("merge", [False, True])
def test_dora_backbone_mode_shares_the_rest_of_the_pipeline(prefect_server, tiny_demo, file_backbone, merge):
    from flows.train_pipeline import RegistryConfig, train_pipeline
    from stage1core.bundle import load_bundle, read_manifest
    from stage1core.finetune import FinetuneConfig
    from stage1core.heads import HeadConfig
    from stage1core.peft import AdapterConfig
    from stage1core.splits import read_split_manifest

    finetune = FinetuneConfig(
        adapter=AdapterConfig(method="dora", rank=4, alpha=8, last_n_blocks=1), optimizer="fsam", lr=5e-3,
        head_lr=5e-3, epochs=1, max_steps=4, batch_size=8, warmup_steps=1, checkpoint_every=100, num_workers=0,
    )
    run = params(tiny_demo, head=HeadConfig(kind="mlp", hidden=16), backbone_mode="dora", finetune=finetune,
                 merge_adapters=merge, backbone=file_backbone,
                 registry=RegistryConfig(experiment="flow-test", model_name="stage1-flow-test", register=False,
                                         bundle_name=f"dora-merge-{merge}"))
    del run["train"]  # the head trains with the backbone: a TrainConfig would be refused, not ignored
    with count_weight_hashes(file_backbone.weights_file) as hashed:
        result = train_pipeline(**run)
    # hashed once, by resolve_backbone; fine-tuning (in a child), the adapted features and the merged export
    # take the resolved spec
    assert hashed == [file_backbone.weights_file]
    manifest = read_manifest(result["bundle_path"])
    adapter = json.loads((Path(result["bundle_path"]) / "adapter.json").read_text())
    assert adapter["adapter"]["method"] == "dora"
    assert ("backbone.safetensors" in manifest["files"]) == merge
    assert ("adapter.safetensors" in manifest["files"]) == (not merge)
    ran = ("resolve_backbone", "fit_backbone", "extract_adapted_features", "calibrate", "evaluate_test",
           "export_bundle", "extract_features", "score_baselines")
    states = task_states(result["flow_run_id"], expected=ran)
    assert "fit_head" not in states
    # the baselines probe the frozen backbone: its features are extracted (cached) for them
    assert {states["extract_features"], states["score_baselines"]} <= {"Completed", "Cached"}
    assert set(json.loads((Path(result["bundle_path"]) / "baselines.json").read_text())["baselines"]) == {
        "logistic", "knn"}

    preds = json.loads((Path(result["bundle_path"]) / "test_predictions.json").read_text())
    _, splits, _ = read_split_manifest(result["split_manifest"])
    locator = {s.sample_id: s.locator for s in splits["test"]}
    p = load_bundle(result["bundle_path"], device="cpu").predict_proba([locator[s] for s in preds["sample_ids"]])
    np.testing.assert_allclose(p, preds["p_roadwork"], atol=1e-5)
