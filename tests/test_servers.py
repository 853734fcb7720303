"""Real servers: `prefect server start` and `mlflow server` on loopback ports with SQLite under a tmp
dir, and a team install done as docs/operations.md says: a team settings file, `stage1 serve
--setup-only` (process pools), `prefect deploy --prefect-file deployments/prefect.yaml --all` as is,
a process worker on the `gpu` pool; then train-pipeline from the form's defaults (the team settings),
and `stage1 ingest <new folder>` -> retrain on the configured source plus that folder -> a registered,
judged version. Also: stopping `stage1 serve` with SIGTERM leaves the schedule active.

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


def server_env(tmp: Path, *, prefect_port: int, mlflow_port: int, log_level: str = "INFO") -> dict[str, str]:
    """This process's environment less its Prefect and MLflow settings, pointed at a Prefect and an MLflow
    server on these ports, with all state under `tmp`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({
        "STAGE1_HOME": str(tmp / "home"), "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": log_level,
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp / "home" / "prefect" / "results"),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}", "HF_HUB_OFFLINE": "1", "GIT_PYTHON_REFRESH": "quiet",
        # the package may not be installed in the interpreter running the tests (it is in make's .venv)
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    })
    return env


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
    env = server_env(tmp, prefect_port=pport, mlflow_port=mport)
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


def write_team_settings(env: dict[str, str], data: Path) -> Path:
    """The team settings of this install: tiny data, a random-init tiny Eva, a loose guarantee."""
    from stage1core.backbone import BackboneConfig
    from stage1core.features import FeatureConfig
    from stage1core.guarantees import GuaranteeConfig
    from stage1core.settings import TeamSettings, write_settings
    from stage1core.sources import SourceConfig
    from stage1core.splits import SplitConfig
    from stage1core.train import TrainConfig

    settings = TeamSettings(
        model_name=MODEL, experiment="servers-test",
        sources=(SourceConfig(path=str(data), kind="folder", name="tiny"),),
        splits=SplitConfig(train=0.45, val=0.15, calib=0.25, test=0.15),
        backbone=BackboneConfig(name="vit_small_patch16_dinov3", weights="random", pooling="cls+avg",
                                model_kwargs=dict(TINY_EVA), input_size=32),
        features=FeatureConfig(batch_size=32, num_workers=0),
        train=TrainConfig(epochs=4, batch_size=32),
        guarantee=GuaranteeConfig(alpha=0.2, delta=0.2),
        promotion={"n_bootstrap": 500, "floor": {"min_mcc": -1.0, "min_auroc": 0.0}},
    )
    return write_settings(settings, Path(env["STAGE1_HOME"]) / "settings.toml", force=True)


def champion_version(mc) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return mc.get_model_version_by_alias(MODEL, "champion").version
    except MlflowException:
        return None


def flow_run(api: str, run_id: str) -> dict:
    return httpx.get(f"{api}/flow_runs/{run_id}", timeout=HTTP_TIMEOUT_S).raise_for_status().json()


def runs_of(api: str, deployment_id: str) -> list[dict]:
    body = {"deployments": {"id": {"any_": [deployment_id]}}}
    return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=HTTP_TIMEOUT_S).raise_for_status().json()


def deployments_of(api: str) -> dict[str, dict]:
    return {d["name"]: d for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=HTTP_TIMEOUT_S).json()}


def wait_for_run(api: str, run_id: str, procs: Processes, observed: list[str], timeout: float = HANG_TIMEOUT_S) -> dict:
    def finished():
        state = flow_run(api, run_id)["state"]
        if state["name"] not in observed:
            observed.append(state["name"])
        return state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and state

    state = wait_until(finished, timeout=timeout, every=0.5, what=f"flow run {run_id}\n{procs.tail('worker')}")
    assert state["type"] == "COMPLETED", procs.tail("worker", 8000)
    return state


def test_stopping_serve_leaves_the_deployments_and_the_schedule_active(servers, tiny_demo):
    """SIGTERM (systemctl stop, Ctrl-C) must not pause the nightly retrain, as Prefect's serve does by default."""
    env, api, procs = servers["env"], servers["api"], servers["procs"]
    write_team_settings(env, tiny_demo)
    serve = procs.start("serve", [sys.executable, "-m", "deployments.cli", "serve", "retrain"], env)

    def served():
        d = deployments_of(api).get("retrain")
        return d if d and d["schedules"] and "Your deployments are being served" in procs.tail("serve") else None

    before = wait_until(served, timeout=HANG_TIMEOUT_S, what=f"stage1 serve\n{procs.tail('serve')}")
    assert not before["paused"] and before["schedules"][0]["active"]
    os.killpg(serve.pid, signal.SIGTERM)
    serve.wait(60)
    after = deployments_of(api)["retrain"]
    assert not after["paused"], f"SIGTERM paused the deployment:\n{procs.tail('serve')}"
    assert after["schedules"][0]["active"] and after["schedules"][0]["schedule"]["cron"] == "0 2 * * *"


def test_a_team_install_deploys_trains_and_retrains_on_what_landed(servers, tiny_demo, tmp_path):
    from mlflow.tracking import MlflowClient

    from stage1core.demo import DemoConfig, generate_demo_dataset

    env, api, procs = servers["env"], servers["api"], servers["procs"]
    observed: dict = {}
    settings = write_team_settings(env, tiny_demo)
    observed["setup"] = json.loads(run([sys.executable, "-m", "deployments.cli", "serve", "--setup-only"], env))
    assert observed["setup"]["gpu"].endswith("(process)") and observed["setup"]["cpu"].endswith("(process)")
    started = time.monotonic()
    run([exe("prefect"), "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all"], env,
        timeout=HANG_TIMEOUT_S)
    observed["deploy_seconds"] = round(time.monotonic() - started, 1)
    deployments = deployments_of(api)
    assert set(deployments) == {"train-pipeline", "retrain", "promote", "evaluate-bundle"}
    assert deployments["retrain"]["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    # a process pool runs with this host's state and tracking server, not the compose setup's
    for name, d in deployments.items():
        assert d["work_pool_name"] == ("cpu" if name == "promote" else "gpu")
        assert d["job_variables"] == {"env": {"STAGE1_HOME": env["STAGE1_HOME"],
                                              "MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]}}, name
    # the train-pipeline form opens with the team settings
    form = deployments["train-pipeline"]["parameters"]
    assert form["sources"][0]["path"] == str(tiny_demo) and form["registry"]["model_name"] == MODEL
    observed["deployments"] = {n: {"work_pool": d["work_pool_name"], "job_variables": d["job_variables"],
                                   "parameters": sorted(d["parameters"])} for n, d in deployments.items()}

    worker = procs.start("worker", [exe("prefect"), "worker", "start", "--pool", "gpu", "--type", "process",
                                    "--limit", "1"], env)
    created = httpx.post(f"{api}/deployments/{deployments['train-pipeline']['id']}/create_flow_run",
                         json={}, timeout=HTTP_TIMEOUT_S).raise_for_status().json()  # the form as it opens
    started = time.monotonic()
    observed["train_states"] = [flow_run(api, created["id"])["state"]["name"]]
    wait_for_run(api, created["id"], procs, observed["train_states"])
    observed["train_seconds"] = round(time.monotonic() - started, 1)
    mc = MlflowClient(tracking_uri=servers["mlflow"])
    first = mc.get_model_version_by_alias(MODEL, "challenger")
    assert first.tags["prefect_flow_run_id"] == created["id"]
    assert {a.path for a in mc.list_artifacts(first.run_id, "bundle")} >= {"bundle/manifest.json"}

    # new images land in a new folder: `stage1 ingest` -> event -> retrain on tiny + the new folder
    landed = tmp_path / "batch-2"
    generate_demo_dataset(landed, DemoConfig(n_images=40, seed=11, n_large=0, png_fraction=0.1, exif_fraction=0.0))
    out = run([sys.executable, "-m", "deployments.cli", "ingest", str(landed), "--source-name", "batch-2"], env)
    event = json.loads(out.strip().splitlines()[-1])
    assert event["n_images"] == 40 and event["landed"]["path"] == str(landed)

    def from_the_event():  # the schedule has also created the coming nights' runs
        return [r for r in runs_of(api, deployments["retrain"]["id"])
                if r["parameters"].get("trigger", "").startswith("event")]

    (retrain_run,) = wait_until(from_the_event, timeout=HANG_TIMEOUT_S, every=1,
                                what="a retrain run from the stage1.data.landed trigger")
    assert event["id"] in retrain_run["parameters"]["trigger"]
    assert retrain_run["parameters"]["landed"] == [{"path": str(landed), "name": "batch-2", "role": "all",
                                                    "kind": "folder"}]
    started = time.monotonic()
    observed["retrain_states"] = [retrain_run["state"]["name"]]
    wait_for_run(api, retrain_run["id"], procs, observed["retrain_states"])
    observed["retrain_seconds"] = round(time.monotonic() - started, 1)

    challenger = mc.get_model_version_by_alias(MODEL, "challenger")
    assert challenger.version != first.version
    trained = mc.get_run(challenger.run_id)
    sources = json.loads(trained.data.params["sources"])
    assert [(s["name"], s["path"]) for s in sources] == [("tiny", str(tiny_demo)), ("batch-2", str(landed))]
    assert trained.data.tags["settings.origin"] == str(settings)
    assert challenger.tags["retrain.decision"] in ("promote", "keep") and challenger.tags["retrain.reason"]
    observed["registry"] = {"model": MODEL, "first": first.version, "challenger": challenger.version,
                            "decision": challenger.tags["retrain.decision"],
                            "reason": challenger.tags["retrain.reason"],
                            # none when the rule kept no version (a tiny random-init model may lose to
                            # the baselines, and retrain never promotes such a version)
                            "champion": champion_version(mc),
                            "sources": [s["name"] for s in sources]}
    observed["trigger"] = {"event": event, "retrain_parameters": retrain_run["parameters"]}
    procs.stop(worker)
    report = os.environ.get("STAGE1_SERVERS_REPORT")
    if report:
        Path(report).write_text(json.dumps(observed, indent=2))
    print(json.dumps(observed, indent=2))
