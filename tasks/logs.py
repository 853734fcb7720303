"""The logger of the task or flow run in progress, or a module logger outside a run."""

from __future__ import annotations

import logging


def run_logger(fallback: str) -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger (its lines reach the UI) inside a flow or task run; outside one (a task
    called as `.fn()`, e.g. in tests) the standard logger named `fallback`."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(fallback)
