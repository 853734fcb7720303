"""Where all state lives: one directory, `$STAGE1_HOME` (default `~/.stage1`).

Every path the product writes (demo data, feature store, heads, bundles, MLflow, Prefect) is derived
here, so nothing depends on the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = "~/.stage1"


def stage1_home() -> Path:
    """The state root: `$STAGE1_HOME` if set, else `~/.stage1`; always absolute."""
    return Path(os.environ.get("STAGE1_HOME") or DEFAULT_HOME).expanduser().resolve()


def home_path(*parts: str, create: bool = True) -> Path:
    """A directory under the state root, created on demand."""
    path = stage1_home().joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def mlflow_tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI` if set, else SQLite under the home (never `./mlflow.db`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home_path('mlflow') / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    return (home_path("mlflow") / "artifacts").as_uri()


def configure_environment() -> dict[str, str]:
    """Default the environment of the orchestration layer to the home directory.

    Must run before prefect, timm or huggingface_hub are imported: Prefect reads its settings and
    huggingface_hub reads HF_HUB_OFFLINE at import time. Values already set by the user win.
    Returns what was set.
    """
    home = stage1_home()
    defaults = {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "prefect" / "results"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        # weights come from local files or an offline Hugging Face cache, never the network
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "MLFLOW_TRACKING_URI": mlflow_tracking_uri(),
        # MLflow otherwise warns on every run about a git repo it may not find
        "GIT_PYTHON_REFRESH": "quiet",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    applied = {}
    for key, value in defaults.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied
