"""MLflow tracking: one run per flow run, per-epoch and final metrics, the bundle as artifacts and
as a registered pyfunc model version with tags and an alias.

MLflow's active run is thread-local and Prefect runs tasks in worker threads, so every function here
takes the `run_id` explicitly and uses `MlflowClient`.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task

from stage1core.bundle import BundleInfo, read_manifest
from stage1core.home import home_path, mlflow_artifact_root, mlflow_tracking_uri

from .servers import ServerUnreachable, check_server  # noqa: F401  (re-exported)

MODEL_NAME = "stage1-roadwork"


def client() -> MlflowClient:
    uri = mlflow_tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def check_tracking_server(timeout_s: float = 3.0) -> None:
    """Raise ServerUnreachable naming MLFLOW_TRACKING_URI when its http(s) server does not answer."""
    check_server(mlflow_tracking_uri(), setting="MLFLOW_TRACKING_URI", timeout_s=timeout_s)


def _is_local_store(uri: str) -> bool:
    return urlparse(uri).scheme in ("sqlite", "file", "")


def ensure_experiment(name: str) -> str:
    mc = client()
    found = mc.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # with a local store, keep artifacts under $STAGE1_HOME (MLflow's default is ./mlruns in the cwd)
    location = f"{mlflow_artifact_root()}/{name}" if _is_local_store(mlflow_tracking_uri()) else None
    return mc.create_experiment(name, artifact_location=location)


def ui_base_url() -> str:
    uri = mlflow_tracking_uri()
    if urlparse(uri).scheme in ("http", "https"):
        return uri.rstrip("/")
    return os.environ.get("STAGE1_MLFLOW_UI_URL", "http://127.0.0.1:5000")


def run_url(experiment_id: str, run_id: str) -> str:
    return f"{ui_base_url()}/#/experiments/{experiment_id}/runs/{run_id}"


@task(name="start_mlflow_run")
def start_mlflow_run(experiment: str, run_name: str, tags: dict[str, str]) -> dict[str, str]:
    check_tracking_server()  # the flow's first task: an unreachable server fails before any image is read
    mc = client()
    exp_id = ensure_experiment(experiment)
    run = mc.create_run(exp_id, run_name=run_name, tags=tags)
    return {"run_id": run.info.run_id, "experiment_id": exp_id, "url": run_url(exp_id, run.info.run_id)}


def _flatten(prefix: str, obj: Any, out: dict[str, str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(obj) if isinstance(obj, (list, tuple)) else str(obj)


@task(name="log_params")
def log_params(run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    flat: dict[str, str] = {}
    _flatten("", params, flat)
    client().log_batch(run_id, params=[Param(k, v[:6000]) for k, v in sorted(flat.items())])


@task(name="log_training_history")
def log_training_history(run_id: str, head_dir: str) -> None:
    """Per-epoch metrics of the head, from the history saved beside its weights (so a cached head
    logs the same curves as a fresh one)."""
    import time

    from mlflow.entities import Metric

    history = json.loads((Path(head_dir) / "head.json").read_text())["history"]
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"train/{k}", float(v), now, int(row["epoch"]))
        for row in history for k, v in row.items() if k not in ("epoch", "step")
    ]
    client().log_batch(run_id, metrics=metrics)


@task(name="log_results")
def log_results(run_id: str, metrics: dict[str, Any], bundle: BundleInfo) -> None:
    """Final test metrics, the plots, and the whole bundle directory as artifacts."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    mc = client()
    mc.log_batch(run_id, metrics=[
        Metric(f"test/{k}", float(v), now, 0) for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ])
    mc.log_artifacts(run_id, bundle.path, artifact_path="bundle")
    for png in sorted(Path(bundle.path).glob("plots/*.png")):
        mc.log_artifact(run_id, str(png), artifact_path="plots")


@task(name="log_baselines_and_selection")
def log_baselines_and_selection(run_id: str, head: Any, judged: dict[str, Any] | None) -> dict[str, str]:
    """The head grid as a table artifact (selection/grid.json) with the choice as tags, the baselines
    as `baseline/<name>/<metric>` metrics beside the head's `test/...` ones, and the verdict as tags.
    Returns the tags that also go on the registered model version."""
    import time

    from mlflow.entities import Metric

    mc = client()
    tags = {"selection.chosen": head.chosen or head.kind, "selection.candidates": str(head.n_candidates)}
    grid_file = Path(head.path) / "head.json"
    grid = json.loads(grid_file.read_text()).get("grid", []) if grid_file.exists() else []
    if grid:
        columns = sorted({k for row in grid for k in row})
        mc.log_table(run_id, data={c: [row.get(c) for row in grid] for c in columns},
                     artifact_file="selection/grid.json")
    if judged:
        now = int(time.time() * 1000)
        metrics = [Metric(f"baseline/{name}/{key}", float(value), now, 0)
                   for name, m in judged["baselines"].items() for key, value in m.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)]
        for key, gap in judged["comparison"]["gaps"].items():
            metrics.append(Metric(f"baseline/gap_to_best/{key}", gap["gap"], now, 0))
        mc.log_batch(run_id, metrics=metrics)
        loses = judged["comparison"]["loses"]
        tags.update({"quality": "loses_to_baseline" if loses else "ok",
                     "baseline.verdict": judged["comparison"]["verdict"][:4000],
                     "baseline.margin": str(judged["comparison"]["margin"])})
        for name, m in judged["baselines"].items():
            for key in ("accuracy_at_0.5", "mcc_at_0.5"):
                tags[f"baseline.{name}.{key}"] = f"{m[key]:.4f}"
        for key in ("accuracy_at_0.5", "mcc_at_0.5"):
            tags[f"head.{key}"] = f"{judged['head'][key]:.4f}"
    for key, value in tags.items():
        mc.set_tag(run_id, key, value)
    return tags


def _input_example() -> Any:
    import io

    import pandas as pd
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buf, format="JPEG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]})


def find_version(model_name: str, bundle_fingerprint: str):
    mc = client()
    try:
        versions = mc.search_model_versions(f"name = '{model_name}'")
    except mlflow.exceptions.MlflowException:
        return None
    for version in versions:
        if version.tags.get("bundle_fingerprint") == bundle_fingerprint:
            return version
    return None


@task(name="register_bundle")
def register_bundle(run_id: str, bundle: BundleInfo, *, model_name: str, alias: str,
                    tags: dict[str, str], description: str) -> dict[str, str]:
    """Log the bundle as a pyfunc model and register it (idempotent: a bundle already registered
    keeps its version), then point `alias` at it."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    import stage1core

    logger = get_run_logger()
    mc = client()
    manifest = read_manifest(bundle.path)
    existing = find_version(model_name, bundle.fingerprint)
    if existing is not None:
        version = existing.version
        logger.info("bundle %s is already registered as %s version %s", bundle.fingerprint[:12], model_name, version)
    else:
        signature = ModelSignature(
            inputs=Schema([ColSpec("string", "image")]),
            outputs=Schema([ColSpec("double", "p_roadwork"), ColSpec("long", "decision")]),
        )
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={"bundle": bundle.path},
                code_paths=[str(Path(stage1core.__file__).parent)],
                signature=signature,
                input_example=_input_example(),
                pip_requirements=["torch", "timm", "safetensors", "jsonschema", "pillow", "numpy", "pandas",
                                  "scikit-learn", "scipy", "matplotlib", "pyarrow", "tqdm"],
                registered_model_name=model_name,
            )
        version = str(info.registered_model_version)
        mv_tags = {"bundle_fingerprint": bundle.fingerprint, "policy": manifest["policy"],
                   "backbone_fingerprint": manifest["backbone_fingerprint"],
                   "backbone_random_init": str(manifest.get("backbone_random_init", False)).lower(), **tags}
        for key, value in mv_tags.items():
            mc.set_model_version_tag(model_name, version, key, str(value))
        mc.update_model_version(model_name, version, description=description)
    mc.set_registered_model_alias(model_name, alias, version)
    mc.set_tag(run_id, "model_version", f"{model_name}/{version}")
    return {"model_name": model_name, "version": str(version), "alias": alias}


@task(name="end_mlflow_run")
def end_mlflow_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


def tracking_summary() -> dict[str, str]:
    return {"tracking_uri": mlflow_tracking_uri(), "artifacts": str(home_path("mlflow") / "artifacts")}
