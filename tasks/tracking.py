"""MLflow tracking: one run per flow run, per-epoch and final metrics, the bundle as artifacts and
as a registered pyfunc model version with tags and an alias.

MLflow's active run is thread-local and Prefect runs tasks in worker threads, so every function here
takes the `run_id` explicitly and uses `MlflowClient`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow.tracking import MlflowClient
from prefect import task

from stage1core.bundle import BundleInfo, read_manifest
from stage1core.home import home_path, mlflow_artifact_root, mlflow_tracking_uri
from stage1core.settings import TeamSettings
from tasks.logs import run_logger

from .runs import close_abandoned_runs, record_run_end, record_run_start
from .servers import ServerUnreachable, check_server  # noqa: F401  (re-exported)

# the registered model of a team that names none (stage1core.settings.TeamSettings.model_name)
MODEL_NAME = TeamSettings().model_name
_initialised: set[str] = set()
_init_guard = threading.Lock()


def client() -> MlflowClient:
    uri = mlflow_tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri in _initialised:
        return MlflowClient(tracking_uri=uri)
    with _init_guard, _database_setup_lock(uri):
        # building the stores (the client builds its tracking store at once) creates and migrates a fresh
        # database: once, under the lock; the stores are cached per URI for the life of the process
        mc = MlflowClient(tracking_uri=uri)
        mc._get_registry_client().store  # noqa: B018
        _initialised.add(uri)
    return mc


def _database_setup_lock(uri: str):
    """An OS file lock beside a SQLite database: two first runs on a fresh home must not both run
    MLflow's migrations (alembic "Online migration expected to match one row", "duplicate column").
    Servers set up their own database: no lock."""
    from filelock import FileLock

    parsed = urlparse(uri)
    if parsed.scheme != "sqlite" or uri in ("sqlite://", "sqlite:///:memory:"):
        return contextlib.nullcontext()
    db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else Path(parsed.path)
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".setup.lock")


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
    """Create the flow run's MLflow run and record it as in flight (tasks/runs.py); first, close the
    runs that processes killed on this machine left RUNNING."""
    check_tracking_server()  # the flow's first task: an unreachable server fails before any image is read
    mc = client()
    uri = mlflow_tracking_uri()
    closed = close_abandoned_runs(mc, uri, closed_by=f"run {run_name}")
    if closed:
        run_logger(__name__).warning("closed %d MLflow run(s) left RUNNING by a killed process: %s", len(closed),
                          ", ".join(closed))
    exp_id = ensure_experiment(experiment)
    run = mc.create_run(exp_id, run_name=run_name, tags=tags)
    record_run_start(mlflow_run_id=run.info.run_id, tracking_uri=uri, flow_run_id=tags.get("prefect.flow_run_id"))
    return {"run_id": run.info.run_id, "experiment_id": exp_id, "url": run_url(exp_id, run.info.run_id)}


@task(name="log_quarantine")
def log_quarantine(run_id: str, quarantine: dict[str, Any]) -> None:
    """The run's quarantine counts as metrics, and its report (when anything was quarantined) as an
    artifact with its path as a tag."""
    import time

    from mlflow.entities import Metric

    mc = client()
    now = int(time.time() * 1000)
    mc.log_batch(run_id, metrics=[Metric(f"quarantine/{k}", float(quarantine[k]), now, 0)
                                  for k in ("scan", "decode", "quarantined", "rows") if k in quarantine])
    if quarantine.get("path"):
        mc.log_artifact(run_id, quarantine["path"], artifact_path="quarantine")
        mc.set_tag(run_id, "quarantine.report", quarantine["path"])


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
    """The version registered for this bundle, or None. A version without the `bundle_fingerprint` tag
    (registered by a process killed before it tagged it) is recognised by its MLflow run's tag."""
    mc = client()
    try:
        versions = mc.search_model_versions(f"name = '{model_name}'")
    except mlflow.exceptions.MlflowException:
        return None
    for version in versions:
        if version.tags.get("bundle_fingerprint") == bundle_fingerprint:
            return version
    for version in sorted(versions, key=lambda v: int(v.version)):
        if "bundle_fingerprint" not in version.tags and _run_bundle_fingerprint(mc, version) == bundle_fingerprint:
            return version
    return None


def _run_bundle_fingerprint(mc: MlflowClient, version) -> str | None:
    run_id = version.run_id
    if not run_id and getattr(version, "model_id", None):
        try:
            run_id = mc.get_logged_model(version.model_id).source_run_id
        except mlflow.exceptions.MlflowException:
            return None
    if not run_id:
        return None
    try:
        return mc.get_run(run_id).data.tags.get("bundle_fingerprint")
    except mlflow.exceptions.MlflowException:
        return None


def _registration_lock(model_name: str):
    """One registration of a model at a time on this home (two runs of one bundle must not both create
    a version); a server-backed registry shared by several machines is not covered."""
    from filelock import FileLock

    from stage1core.fingerprint import sha256_bytes

    return FileLock(str(home_path("locks", create=True) / f"register-{sha256_bytes(model_name.encode())[:16]}.lock"))


@task(name="register_bundle")
def register_bundle(run_id: str, bundle: BundleInfo, *, model_name: str, alias: str,
                    tags: dict[str, str], description: str) -> dict[str, str]:
    """Log the bundle as a pyfunc model and register it, then point `alias` at it.

    Idempotent and crash-consistent: a version is created with its tags and description in one call,
    so no process kill leaves an untagged version; a bundle already registered keeps its version, and
    whatever a killed run did not finish (tags, description, alias) is completed.
    """
    logger = run_logger(__name__)
    mc = client()
    manifest = read_manifest(bundle.path)
    mv_tags = {"bundle_fingerprint": bundle.fingerprint, "policy": manifest["policy"],
               "backbone_fingerprint": manifest["backbone_fingerprint"],
               "backbone_random_init": str(manifest.get("backbone_random_init", False)).lower(), **tags}
    with _registration_lock(model_name):
        existing = find_version(model_name, bundle.fingerprint)
        if existing is not None:
            version = str(existing.version)
            missing = {k: str(v) for k, v in mv_tags.items() if k not in existing.tags}
            # the tags of the run that registered it stay; only what a killed run left out is added
            for key, value in missing.items():
                mc.set_model_version_tag(model_name, version, key, value)
            if not existing.description:
                mc.update_model_version(model_name, version, description=description)
            done = "completed (" + ", ".join(sorted(missing)) + ")" if missing else "kept"
            logger.info("bundle %s is already registered as %s version %s: %s", bundle.fingerprint[:12], model_name,
                        version, done)
        else:
            version = _create_version(run_id, bundle, model_name=model_name, tags=mv_tags, description=description)
        mc.set_registered_model_alias(model_name, alias, version)
    mc.set_tag(run_id, "model_version", f"{model_name}/{version}")
    return {"model_name": model_name, "version": str(version), "alias": alias}


def _create_version(run_id: str, bundle: BundleInfo, *, model_name: str, tags: dict[str, str],
                    description: str) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    import stage1core

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
                              "scikit-learn", "scipy", "matplotlib", "pyarrow", "tqdm", "cryptography"],
            # the pyfunc refuses a bundle whose fingerprint is not the registered one
            model_config={"bundle_fingerprint": bundle.fingerprint},
        )
    mc = client()
    # leaving `start_run` marked the run FINISHED; the flow is not: a kill from here on must leave it
    # RUNNING, for the next run to close (tasks/runs.py)
    mc.update_run(run_id, status="RUNNING")
    try:
        mc.create_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    mv = mc.create_model_version(model_name, source=info.model_uri, run_id=run_id,
                                 tags={k: str(v) for k, v in tags.items()}, description=description,
                                 model_id=info.model_id)
    return str(mv.version)


def close_run(run_id: str, error: BaseException) -> None:
    """End the MLflow run of a flow that failed or was stopped (FAILED; KILLED for Ctrl-C or SIGTERM)
    and drop its in-flight record; a quarantine report named by the error goes along as an artifact.
    Not a task: it runs while the flow is being torn down, with a short deadline so that a server that
    stopped answering cannot hold the exit."""
    status = "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) or \
        type(error).__name__ == "TerminationSignal" else "FAILED"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    try:
        mc = client()
        report = getattr(error, "report", "")
        if report and Path(report).is_file():
            mc.log_artifact(run_id, report, artifact_path="quarantine")
            mc.set_tag(run_id, "quarantine.report", report)
        mc.set_terminated(run_id, status=status)
        record_run_end(run_id)
    except Exception as exc:  # noqa: BLE001  (the original error matters more; the ledger closes it later)
        import logging

        logging.getLogger(__name__).warning("could not mark MLflow run %s %s: %s", run_id, status, exc)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@task(name="end_mlflow_run")
def end_mlflow_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)
    record_run_end(run_id)
