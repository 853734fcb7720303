"""The documented Postgres setup (docs/operations.md): a throwaway PostgreSQL cluster from Debian's
`postgresql` package, `prefect server start` with PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://...
and `mlflow server --backend-store-uri postgresql://...` on loopback ports; the tiny `train_pipeline` runs
against both in a subprocess, then the flow run is checked in the Prefect API and the registered version
in the MLflow server, and both rows are read back from Postgres itself (so nothing fell back to SQLite).

Postgres refuses to run as root: as root the cluster runs as the `postgres` user (runuser) in a tmp dir it
owns. Every wait is bounded; the servers (process groups) and the cluster (pg_ctl stop) are always stopped.
Skipped only when the PostgreSQL server binaries are absent (`.ci/run` installs them from Debian).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.common import HANG_TIMEOUT_S, tiny_run_parameters
from tests.test_servers import HTTP_TIMEOUT_S, ROOT, Processes, exe, free_port, server_env, wait_until

pytestmark = pytest.mark.slow
MODEL = "stage1-postgres-test"
INITDB = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
PG_BIN = Path(INITDB[-1]).parent if INITDB else None


def as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def pg(cmd: list[str], timeout: float = HANG_TIMEOUT_S) -> str:
    done = subprocess.run(as_postgres(cmd), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


@contextmanager
def postgres_cluster():
    """initdb + pg_ctl start on a free loopback port (trust auth, user `postgres`), databases prefect and
    mlflow; yields the port; always pg_ctl stop (fast, then immediate) and removes the cluster."""
    tmp = Path(tempfile.mkdtemp(prefix="stage1-pg-"))  # short path: it also holds the unix socket
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres", "postgres")
    data, port = tmp / "data", free_port()
    try:
        pg([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        # pg_ctl -w waits up to -t seconds for the server to accept connections
        pg([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(tmp / "postgres.log"), "-w", "-t",
            str(HANG_TIMEOUT_S), "-o", f"-p {port} -k {tmp} -h 127.0.0.1 -c fsync=off", "start"],
           timeout=HANG_TIMEOUT_S + 30)
        for db in ("prefect", "mlflow"):
            pg([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db])
        yield port
    finally:
        for mode in ("fast", "immediate"):
            stop = subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", mode, "-w", "-t",
                                               "30", "stop"]), capture_output=True, timeout=60)
            if stop.returncode != 0 and (data / "postmaster.pid").exists():
                continue  # still running: try harder
            break
        shutil.rmtree(tmp, ignore_errors=True)


def healthy(procs: Processes, name: str, proc: subprocess.Popen, url: str) -> None:
    """Wait (bounded) for a 200 from url; fail at once, with the server's log, if the server exits."""
    def check():
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{procs.tail(name)}")
        return httpx.get(url, timeout=5).status_code == 200

    wait_until(check, timeout=HANG_TIMEOUT_S, every=0.5, what=f"{name}\n{procs.tail(name)}")


RUN_FLOW = """
import json, sys
from flows.train_pipeline import train_pipeline
result = train_pipeline(**json.loads(sys.argv[1]))
print("RESULT " + json.dumps({"flow_run_id": result["flow_run_id"], "registered": result["registered"]}))
"""


@pytest.mark.skipif(PG_BIN is None, reason="PostgreSQL server binaries absent (/usr/lib/postgresql/*/bin/initdb); "
                    "`.ci/run` installs Debian's postgresql package")
def test_train_pipeline_against_prefect_and_mlflow_servers_on_postgres(tiny_demo, tmp_path):
    import psycopg
    from mlflow.tracking import MlflowClient

    pport, mport = free_port(), free_port()
    env = server_env(tmp_path, prefect_port=pport, mlflow_port=mport, log_level="WARNING")
    with postgres_cluster() as port, Processes(tmp_path) as procs:
        dsn = f"postgresql://postgres@127.0.0.1:{port}"
        prefect = procs.start("prefect-server", [exe("prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                       str(pport), "--no-ui"],
                    {**env, "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://postgres@127.0.0.1:"
                                                                      f"{port}/prefect"})
        mlflow = procs.start("mlflow-server", [exe("mlflow"), "server", "--host", "127.0.0.1", "--port", str(mport),
                                      "--backend-store-uri", f"{dsn}/mlflow",
                                      "--artifacts-destination", str(tmp_path / "mlflow-artifacts"),
                                      "--workers", "1"], env)
        healthy(procs, "prefect-server", prefect, f"http://127.0.0.1:{pport}/api/health")
        healthy(procs, "mlflow-server", mlflow, f"http://127.0.0.1:{mport}/health")

        parameters = tiny_run_parameters(tiny_demo, experiment="postgres-test", model_name=MODEL)
        done = subprocess.run([sys.executable, "-c", RUN_FLOW, json.dumps(parameters)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
        assert done.returncode == 0, f"train_pipeline failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
        run_id, version = result["flow_run_id"], str(result["registered"]["version"])

        flow_run = httpx.get(f"{env['PREFECT_API_URL']}/flow_runs/{run_id}",
                             timeout=HTTP_TIMEOUT_S).raise_for_status().json()
        assert flow_run["state"]["type"] == "COMPLETED", flow_run["state"]
        mc = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        registered = mc.get_model_version(MODEL, version)
        assert registered.tags["prefect_flow_run_id"] == run_id
        assert mc.get_model_version_by_alias(MODEL, "challenger").version == registered.version
        assert mc.get_run(registered.run_id).info.status == "FINISHED"

        # the rows are in Postgres, not in some SQLite fallback
        with psycopg.connect(f"{dsn}/prefect") as conn:
            state = conn.execute("SELECT state_type FROM flow_run WHERE id = %s", (run_id,)).fetchone()
        assert state is not None and state[0] == "COMPLETED", state
        with psycopg.connect(f"{dsn}/mlflow") as conn:
            rows = conn.execute("SELECT version FROM model_versions WHERE name = %s", (MODEL,)).fetchall()
        assert [str(v) for (v,) in rows] == [version]
