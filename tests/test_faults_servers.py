"""Unreachable and hung MLflow and Prefect servers: fail fast naming the setting, bounded deadlines,
concurrent first use of a fresh MLflow store, a Prefect server too slow to start. docs/reliability.md maps
each fault to its test."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.common import HANG_TIMEOUT_S
from tests.faults import (
    ROOT,
    cli_env,
    closed_port,
    run_stage1,
    session_processes,
    start_stage1,
    text,
    wait_for,
)


def test_unreachable_mlflow_server_fails_fast_naming_the_setting(monkeypatch):
    from tasks.tracking import ServerUnreachable, start_mlflow_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    started = time.perf_counter()
    with pytest.raises(ServerUnreachable, match="MLFLOW_TRACKING_URI=http://127.0.0.1"):
        start_mlflow_run.fn("stage1", "run", {})
    # one refused connection takes milliseconds, MLflow's retries with backoff take minutes; the bound
    # sits between them with headroom for a loaded machine
    assert time.perf_counter() - started < 30.0


@pytest.mark.parametrize("setting", ["MLFLOW_TRACKING_URI", "PREFECT_API_URL"])
def test_cli_fails_fast_naming_the_unreachable_setting(setting, tmp_path, tiny_demo):
    env = {**os.environ, "STAGE1_HOME": str(tmp_path / "home"), setting: f"http://127.0.0.1:{closed_port()}/api"}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "deployments.cli", "train", "--source", str(tiny_demo)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    assert out.returncode == 2, out.stderr
    assert f"stage1: error: {setting}=http://127.0.0.1" in out.stderr and "unreachable" in out.stderr
    assert "Traceback" not in out.stderr
    # interpreter start plus one refused connection (0.3 s alone, seconds on a loaded machine), not the
    # clients' retries with backoff (a minute or more)
    assert elapsed < 30.0
    assert not (tmp_path / "home" / "features").exists()  # failed before any work


class HungServer:
    """A loopback server that accepts connections and never answers (a hung MLflow or Prefect)."""

    def __init__(self):
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def hung_server():
    server = HungServer()
    yield server
    server.close()


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["MLFLOW_TRACKING_URI", "PREFECT_API_URL"])
def test_a_server_that_accepts_and_never_answers_is_named_within_a_minute(setting, hung_server, tmp_path, tiny_demo):
    url = f"http://127.0.0.1:{hung_server.port}" + ("/api" if setting == "PREFECT_API_URL" else "")
    started = time.monotonic()
    proc = run_stage1(["train", "--source", str(tiny_demo)], cli_env(tmp_path / "home", **{setting: url}), tmp_path,
                      timeout=120)
    elapsed = time.monotonic() - started
    out, err = text(proc)
    what = "MLflow server" if setting == "MLFLOW_TRACKING_URI" else "Prefect server"
    assert proc.returncode == 2, out + err
    assert f"stage1: error: {what} at {url} does not answer (waited 10 s" in err
    assert "Traceback" not in out + err
    assert elapsed < 60
    assert not (tmp_path / "home" / "features").exists()


@pytest.mark.slow
def test_closing_a_run_on_a_server_that_stopped_answering_is_bounded(hung_server, monkeypatch,
                                                                    keep_mlflow_tracking_uri):
    """The flow's failure path ends its MLflow run with a short deadline: a hung server cannot hold the exit."""
    from tasks import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{hung_server.port}")
    monkeypatch.setattr(tracking, "_initialised", {f"http://127.0.0.1:{hung_server.port}"})
    started = time.monotonic()
    tracking.close_run("0" * 32, KeyboardInterrupt())  # logs a warning, never raises
    assert time.monotonic() - started < 20


def test_mlflow_and_prefect_calls_have_product_deadlines():
    from stage1core.home import configure_environment

    saved = dict(os.environ)
    try:
        for key in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "PREFECT_API_REQUEST_TIMEOUT",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "PYTHONSAFEPATH"):
            os.environ.pop(key, None)
        configure_environment()
        timeout = int(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"])
        retries = int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
        backoff = int(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
        # worst case of one MLflow call: every attempt times out, plus the backoff between them
        assert (retries + 1) * timeout + sum(backoff * 2**i for i in range(retries)) < 60
        assert int(os.environ["PREFECT_API_REQUEST_TIMEOUT"]) <= 60
        assert int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) >= 120
        assert os.environ["PYTHONSAFEPATH"] == "1"
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _first_mlflow_use(uri: str, home: str, ready, go, out) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["STAGE1_HOME"] = home
    try:
        from tasks.tracking import client, ensure_experiment

        ready.put(os.getpid())
        go.wait(300)
        client()
        ensure_experiment("race")
        out.put("ok")
    except BaseException as exc:  # noqa: BLE001
        out.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.slow
def test_concurrent_first_runs_set_up_the_mlflow_database_once(tmp_path):
    """Four processes open a fresh SQLite tracking store at the same instant (MLflow's migrations raced:
    alembic "Online migration expected to match one row", "duplicate column name")."""
    spawn = multiprocessing.get_context("spawn")
    ready, go, out = spawn.Queue(), spawn.Event(), spawn.Queue()
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    procs = [spawn.Process(target=_first_mlflow_use, args=(uri, str(tmp_path / "home"), ready, go, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    for _ in procs:  # all imported: then they open the store at the same instant
        ready.get(timeout=HANG_TIMEOUT_S)
    go.set()
    results = [out.get(timeout=HANG_TIMEOUT_S) for _ in procs]
    for p in procs:
        p.join(60)
    assert results == ["ok"] * 4, results


@pytest.mark.slow
def test_a_prefect_server_that_cannot_start_in_time_is_one_clear_line(tmp_path, tiny_demo):
    """Row 8 (a loaded machine): the start-up timeout is lowered to 1 s so that the server cannot make it."""
    proc = start_stage1(["train", "--source", str(tiny_demo)],
                        cli_env(tmp_path / "home", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1"), tmp_path,
                        tmp_path / "log")
    code = proc.wait(timeout=HANG_TIMEOUT_S)
    log = (tmp_path / "log").read_text(errors="replace")
    assert code == 2, log
    assert "stage1: error: the local Prefect server did not answer within 1 s" in log
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in log and "Traceback" not in log
    wait_for(lambda: not session_processes(proc.pid), timeout=120, what="the server to be stopped")
