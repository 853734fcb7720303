"""The local Prefect server that `stage1` starts when `PREFECT_API_URL` is unset.

Prefect would start the same server itself (uvicorn on Prefect's app, SQLite under `PREFECT_HOME`).
Starting it here instead gives what a deployment needs: the server boots while the command imports
torch, timm and MLflow (start-up overlaps, docs/benchmarks.md), it dies with the `stage1` process
even on kill -9 (parent-death signal), it runs in the Prefect home with a clean import path (a stray
`inspect.py` in the working directory is never imported), start-ups on one home are serialised (two
first runs cannot race the database migrations), a loaded machine gets a generous start-up timeout,
and a failure is one sentence that says what to do, with the server's log on disk.

No prefect import here: the server is a child process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path

from tasks.processes import die_with_parent

DEFAULT_STARTUP_TIMEOUT_S = 180.0


class ServerStartError(RuntimeError):
    """The local Prefect server did not come up; the message says why, what to do and where the log is."""


def _free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def startup_timeout_s() -> float:
    value = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    try:
        return float(value) if value else DEFAULT_STARTUP_TIMEOUT_S
    except ValueError:
        return DEFAULT_STARTUP_TIMEOUT_S


class LocalPrefectServer:
    """One uvicorn process serving Prefect's API on a free loopback port, for the life of this process."""

    def __init__(self, prefect_home: str | Path, *, locks: str | Path):
        self.home = Path(prefect_home)
        self.lock_path = Path(locks) / "prefect-server.lock"
        self.log_path = self.home / "server.log"
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._lock = None
        self._log = None
        self._spawned_at = 0.0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> str:
        """Spawn the server (without waiting for it) and return its API URL.

        Holds a lock on the home until the server answers: a second `stage1` on the same home waits
        instead of running Prefect's database migrations at the same time.
        """
        from filelock import FileLock, Timeout

        self.home.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.lock_path))
        try:
            self._lock.acquire(timeout=startup_timeout_s())
        except Timeout:
            raise ServerStartError(
                f"another stage1 process has been starting the local Prefect server in {self.home} for more than "
                f"{startup_timeout_s():.0f} s; wait for it, or set PREFECT_API_URL to a running server") from None
        self._spawn()
        return self.api_url

    def _spawn(self) -> None:
        self.port = _free_port()
        env = {**os.environ, "PYTHONSAFEPATH": "1", "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n--- stage1 pid {os.getpid()} starts the server on port {self.port}\n".encode())
        self._log.flush()
        self._spawned_at = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-P", "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            cwd=self.home, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the server answers its health check, at most `timeout_s` after it was started
        (the command's imports overlap that time); raise ServerStartError saying what to do."""
        assert self.process is not None, "start() first"
        timeout_s = startup_timeout_s() if timeout_s is None else timeout_s
        restarts = 0
        try:
            while True:
                if time.monotonic() > self._spawned_at + timeout_s:
                    self.stop()
                    raise ServerStartError(
                        f"the local Prefect server did not answer within {timeout_s:.0f} s (a busy machine starts it "
                        f"slowly); raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start one with "
                        f"`prefect server start` and set PREFECT_API_URL; server log: {self.log_path}")
                if self._answers():
                    return
                code = self.process.poll()
                if code is not None:
                    if restarts < 2 and "address already in use" in self._log_tail().lower():
                        restarts += 1  # another process took the port between our probe and uvicorn's bind
                        self._spawn()
                        continue
                    raise ServerStartError(
                        f"the local Prefect server exited with code {code} while starting ({self._log_tail(1)}); "
                        f"see {self.log_path}, or set PREFECT_API_URL to a running Prefect server")
                time.sleep(0.2)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - 16384))
                text = fh.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:]) if text else "no output"

    def stop(self, grace_s: float = 5.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after `grace_s`); safe to call twice."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
