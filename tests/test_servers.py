"""Real servers: `prefect server start` and `mlflow server` on loopback ports with SQLite under a tmp
dir, a process work pool, deployments from deployments/prefect.yaml (`prefect deploy`), a worker that
executes `train-pipeline` on tiny data, the `stage1.data.landed` trigger starting `retrain`; then
checks the flow run in the Prefect API and the registered version in the MLflow server.

Everything runs in subprocesses with their own environment (the test session's Prefect settings are
never touched); every wait is bounded (by tests.common.HANG_TIMEOUT_S: a bound on a hang, generous enough for
a loaded machine, never a speed requirement) and the servers are always stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import httpx
import pytest
import yaml

from tests.common import HANG_TIMEOUT_S, TINY_EVA

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "stage1-servers-test"
# one API call to a server on a loaded machine (retried waits use 5 s per try inside wait_until)
HTTP_TIMEOUT_S = 60


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exe(name: str) -> str:
    return str(BIN / name)


class Processes:
    """Started subprocesses, each in its own session, stopped (TERM, then KILL) on exit."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 20) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def __exit__(self, *exc) -> None:
        # SIGTERM to every group first, then wait: each server's graceful shutdown takes seconds, so
        # stopping them one after another would add those up
        live = [proc for _, proc in reversed(self.procs) if proc.poll() is None]
        for proc in live:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        for proc in live:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)

    def __enter__(self):
        return self

    def tail(self, name: str, n: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""


def wait_until(check, *, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(every)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s ({last})")


def run(cmd: list[str], env: dict[str, str], timeout: float = HANG_TIMEOUT_S) -> str:
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("servers")
    pport, mport = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({
        "STAGE1_HOME": str(tmp / "home"), "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{pport}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp / "home" / "prefect" / "results"),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mport}", "HF_HUB_OFFLINE": "1", "GIT_PYTHON_REFRESH": "quiet",
        # the package may not be installed in the interpreter running the tests (it is in make's .venv)
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    })
    with Processes(tmp) as procs:
        procs.start("prefect-server", [exe("prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                       str(pport), "--no-ui"], env)
        procs.start("mlflow-server", [exe("mlflow"), "server", "--host", "127.0.0.1", "--port", str(mport),
                                      "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                                      "--artifacts-destination", str(tmp / "mlflow-artifacts"), "--workers", "1"], env)
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{pport}/api/health", timeout=5).status_code == 200,
                   timeout=HANG_TIMEOUT_S, what=f"prefect server\n{procs.tail('prefect-server')}")
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{mport}/health", timeout=5).status_code == 200,
                   timeout=HANG_TIMEOUT_S, what=f"mlflow server\n{procs.tail('mlflow-server')}")
        yield {"env": env, "api": env["PREFECT_API_URL"], "mlflow": env["MLFLOW_TRACKING_URI"], "procs": procs,
               "tmp": tmp}


def tiny_parameters(data: Path, *, experiment: str = "servers-test", model_name: str = MODEL) -> dict:
    """tests/test_flow.py's tiny run as JSON parameters: random-init tiny Eva, tiny demo data, 4 epochs."""
    return {
        "sources": [{"path": str(data), "kind": "folder", "name": "tiny"}],
        "splits": {"train": 0.45, "val": 0.15, "calib": 0.25, "test": 0.15},
        "backbone": {"name": "vit_small_patch16_dinov3", "weights": "random", "pooling": "cls+avg",
                     "model_kwargs": dict(TINY_EVA), "input_size": 32},
        "features": {"batch_size": 32, "num_workers": 0},
        "train": {"epochs": 4, "batch_size": 32},
        "guarantee": {"alpha": 0.2, "delta": 0.2},
        "registry": {"experiment": experiment, "model_name": model_name},
    }


def flow_run(api: str, run_id: str) -> dict:
    return httpx.get(f"{api}/flow_runs/{run_id}", timeout=HTTP_TIMEOUT_S).raise_for_status().json()


def runs_of(api: str, deployment_id: str) -> list[dict]:
    body = {"deployments": {"id": {"any_": [deployment_id]}}}
    return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=HTTP_TIMEOUT_S).raise_for_status().json()


def test_worker_runs_the_deployed_pipeline_and_an_event_triggers_retrain(servers, tiny_demo):
    from mlflow.tracking import MlflowClient

    env, api, procs = servers["env"], servers["api"], servers["procs"]
    observed: dict = {}
    run([exe("prefect"), "work-pool", "create", "ci-process", "--type", "process"], env)
    # the gpu pool of prefect.yaml is docker type and its job env names the compose hosts: deploy the same
    # file with only those site-specific job variables swapped for these servers (and --pool ci-process)
    project = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    for spec in project["deployments"]:
        spec["work_pool"] = {"name": "ci-process", "job_variables": {"env": {
            k: env[k] for k in ("STAGE1_HOME", "MLFLOW_TRACKING_URI", "PYTHONPATH")}}}
    local_yaml = servers["tmp"] / "prefect.yaml"
    local_yaml.write_text(yaml.safe_dump(project))
    started = time.monotonic()
    run([exe("prefect"), "--no-prompt", "deploy", "--prefect-file", str(local_yaml), "--name", "train-pipeline",
         "--name", "retrain"], env)
    observed["deploy_seconds"] = round(time.monotonic() - started, 1)
    deployments = {d["name"]: d
                   for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=HTTP_TIMEOUT_S).json()}
    assert set(deployments) == {"train-pipeline", "retrain"}
    assert deployments["retrain"]["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    observed["deployments"] = {n: {"work_pool": d["work_pool_name"], "entrypoint": d["entrypoint"],
                                   "tags": d["tags"]} for n, d in deployments.items()}

    created = httpx.post(f"{api}/deployments/{deployments['train-pipeline']['id']}/create_flow_run",
                         json={"parameters": tiny_parameters(tiny_demo)},
                         timeout=HTTP_TIMEOUT_S).raise_for_status().json()
    run_id = created["id"]
    started = time.monotonic()
    observed["states"] = [flow_run(api, run_id)["state"]["name"]]
    worker = procs.start("worker", [exe("prefect"), "worker", "start", "--pool", "ci-process", "--type", "process",
                                    "--run-once", "--limit", "1"], env)

    def finished():
        state = flow_run(api, run_id)["state"]
        if state["name"] not in observed["states"]:
            observed["states"].append(state["name"])
        return state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and state

    state = wait_until(finished, timeout=HANG_TIMEOUT_S, every=0.5,
                       what=f"flow run {run_id}\n{procs.tail('worker')}")
    assert state["type"] == "COMPLETED", procs.tail("worker")
    observed["run_seconds"] = round(time.monotonic() - started, 1)
    try:
        worker.wait(HANG_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        procs.stop(worker)

    def task_states():
        # the server records task runs from the worker's events asynchronously: a completed flow run's
        # task runs may still be missing or stateless for a moment (longer on a loaded machine)
        tasks = httpx.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}},
                           timeout=HTTP_TIMEOUT_S).raise_for_status().json()
        states = {f"{t['name'].rsplit('-', 1)[0]}: {(t.get('state') or {}).get('name')}" for t in tasks}
        return {"extract_features: Completed", "register_bundle: Completed"} <= states and sorted(states)

    observed["task_states"] = wait_until(task_states, timeout=HANG_TIMEOUT_S, every=0.5,
                                         what=f"task runs of {run_id}")

    mc = MlflowClient(tracking_uri=servers["mlflow"])
    version = mc.get_model_version_by_alias(MODEL, "challenger")
    assert version.tags["prefect_flow_run_id"] == run_id
    mlflow_run = mc.get_run(version.run_id)
    assert mlflow_run.info.status == "FINISHED" and "test/mcc" in mlflow_run.data.metrics
    assert {a.path for a in mc.list_artifacts(version.run_id, "bundle")} >= {"bundle/manifest.json"}
    observed["registry"] = {"model": MODEL, "version": str(version.version), "aliases": list(version.aliases),
                            "tags": {k: version.tags[k] for k in ("prefect_flow_run_id", "test_mcc", "test_auroc",
                                                                   "bundle_fingerprint", "policy")
                                     if k in version.tags},
                            "mlflow_run_status": mlflow_run.info.status}

    # the event trigger: `stage1 ingest` emits stage1.data.landed, the server schedules a retrain run
    out = run([sys.executable, "-m", "deployments.cli", "ingest", str(tiny_demo), "--source-name", "tiny"], env)
    event = json.loads(out.strip().splitlines()[-1])
    # the nightly schedule's runs (trigger "schedule") may be listed too, depending on the time of day
    triggered = wait_until(lambda: [r for r in runs_of(api, deployments["retrain"]["id"])
                                    if r["parameters"].get("trigger") != "schedule"], timeout=HANG_TIMEOUT_S, every=1,
                           what="a retrain run from the stage1.data.landed trigger")
    observed["trigger"] = {"event": event, "retrain_run": {"state": triggered[0]["state"]["name"],
                                                           "parameters": {"trigger": triggered[0]["parameters"]
                                                                          .get("trigger")}}}
    assert event["id"] in triggered[0]["parameters"]["trigger"]
    httpx.post(f"{api}/flow_runs/{triggered[0]['id']}/set_state",  # not executed here: cancel it
               json={"state": {"type": "CANCELLED", "name": "Cancelled"}, "force": True}, timeout=HTTP_TIMEOUT_S)
    report = os.environ.get("STAGE1_SERVERS_REPORT")
    if report:
        Path(report).write_text(json.dumps(observed, indent=2))
    print(json.dumps(observed, indent=2))
