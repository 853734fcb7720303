"""Runs in flight, recorded on disk, so that a run killed with its process is closed by the next one.

A process killed with SIGKILL (or by the kernel's OOM killer, or a power cut) cannot mark its MLflow
run or its Prefect flow run as ended: both would stay RUNNING forever. Each run therefore writes
`$STAGE1_HOME/runs/<mlflow run id>.json` (pid and its start time, host, tracking URI, Prefect flow
run) when it starts and removes it when it ends. The next run on the same home closes every recorded
run whose process is gone: the MLflow run becomes KILLED and the flow run Crashed, each with a note.
A run that is stopped by SIGINT/SIGTERM ends its own runs (MLflow KILLED, flow run Cancelled), through
the flow's error handling or, wherever the signal lands, its `on_crashed` hook.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from stage1core.home import home_path
from stage1core.storage import atomic_write_json

from .processes import process_alive, this_process

log = logging.getLogger(__name__)


def _ledger() -> Path:
    return home_path("runs")


def prefect_api_identity() -> str:
    """Which Prefect database a flow run id belongs to: the API URL of a real server, or the local
    (ephemeral) server's home, whose port changes with every process."""
    if os.environ.get("STAGE1_LOCAL_PREFECT_SERVER") or not os.environ.get("PREFECT_API_URL"):
        return f"local:{os.environ.get('PREFECT_HOME', '')}"
    return os.environ["PREFECT_API_URL"]


def record_run_start(*, mlflow_run_id: str, tracking_uri: str, flow_run_id: str | None) -> Path:
    entry = {**this_process(), "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri,
             "flow_run_id": flow_run_id, "prefect_api": prefect_api_identity(), "started": time.time()}
    path = _ledger() / f"{mlflow_run_id}.json"
    atomic_write_json(path, entry)
    return path


def record_run_end(mlflow_run_id: str) -> None:
    try:
        (_ledger() / f"{mlflow_run_id}.json").unlink()
    except FileNotFoundError:
        pass


def abandoned_runs() -> list[dict[str, Any]]:
    """Recorded runs of this machine whose process no longer exists."""
    out = []
    host = socket.gethostname()
    for path in sorted(_ledger().glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if entry.get("host") != host or process_alive(int(entry.get("pid", 0)), entry.get("pid_start")):
            continue
        out.append({**entry, "_path": str(path)})
    return out


def close_abandoned_runs(mlflow_client: Any, tracking_uri: str, *, closed_by: str) -> list[str]:
    """Mark the runs of dead processes as ended: MLflow KILLED, Prefect Crashed. Returns the MLflow run
    ids closed. Best effort: a run that cannot be reached now stays recorded for the next attempt."""
    from mlflow.exceptions import MlflowException

    closed = []
    for entry in abandoned_runs():
        if entry.get("tracking_uri") != tracking_uri:
            continue  # another tracking store: whoever uses it closes it
        note = (f"process {entry['pid']} on {entry['host']} died without ending this run; closed by "
                f"{closed_by} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
        try:
            try:
                run = mlflow_client.get_run(entry["mlflow_run_id"])
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                run = None
            if run is not None and run.info.status in ("RUNNING", "SCHEDULED"):
                mlflow_client.set_tag(entry["mlflow_run_id"], "stage1.closed", note)
                mlflow_client.set_terminated(entry["mlflow_run_id"], status="KILLED")
                closed.append(entry["mlflow_run_id"])
            if entry.get("flow_run_id") and entry.get("prefect_api") == prefect_api_identity():
                crash_flow_run(entry["flow_run_id"], note)
        except Exception as exc:  # noqa: BLE001  (an unreachable record must not stop this run)
            log.warning("could not close the abandoned run %s yet: %s", entry["mlflow_run_id"], exc)
            continue
        try:
            os.unlink(entry["_path"])
        except FileNotFoundError:
            pass
    return closed


def crash_flow_run(flow_run_id: str, message: str) -> None:
    """Set a flow run that is not in a final state to Crashed."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        try:
            flow_run = client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            return
        if flow_run.state is None or not flow_run.state.is_final():
            client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)


def in_flight(flow_run_id: str) -> list[dict[str, Any]]:
    """The runs this process recorded for a flow run and has not ended."""
    out = []
    for path in sorted(_ledger().glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if entry.get("flow_run_id") == flow_run_id and entry.get("pid") == os.getpid():
            out.append(entry)
    return out


def end_crashed_run(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect `on_crashed` hook. The MLflow run still open for this flow run is ended (a signal can land
    anywhere, also between a task's end and the flow's own error handling): KILLED when the run was
    stopped by SIGINT/SIGTERM, FAILED otherwise. A stopped run was asked to stop, it did not crash: its
    flow run is recorded as Cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    from .tracking import close_run

    message = (state.message or "") if state is not None else ""
    stopped = "interrupt signal" in message or "termination signal" in message
    for entry in in_flight(str(flow_run.id)):
        close_run(entry["mlflow_run_id"], KeyboardInterrupt() if stopped else RuntimeError(message))
    if stopped:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, Cancelled(message=f"stopped by a signal: {message}"), force=True)
