"""Where all state lives: one directory, `$STAGE1_HOME` (default `~/.stage1`).

Every path the product writes (demo data, feature store, heads, bundles, MLflow, Prefect) is derived
here, so nothing depends on the working directory. `configure_environment()` only sets environment
defaults (no file is touched, so `stage1 --help` works on any home); `prepare_home()` creates the
home and checks that it can be written, before anything else runs.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

DEFAULT_HOME = "~/.stage1"
# subfolders made up front: Prefect creates its home without parents, so a missing $STAGE1_HOME made
# its start-up fail with a misleading "cannot connect" error
SUBFOLDERS = ("prefect", "mlflow", "reports", "runs", "locks")
# below this much free space a run would die half-way (ENOSPC in a task, a Prefect server that can
# no longer write its database); override with $STAGE1_MIN_FREE_MB
DEFAULT_MIN_FREE_MB = 100


class HomeError(OSError):
    """$STAGE1_HOME cannot be used (read-only, full, not a directory); the message names the path."""

    def __str__(self) -> str:
        return str(self.strerror)


def stage1_home() -> Path:
    """The state root: `$STAGE1_HOME` if set, else `~/.stage1`; always absolute."""
    return Path(os.environ.get("STAGE1_HOME") or DEFAULT_HOME).expanduser().resolve()


def home_path(*parts: str, create: bool = False) -> Path:
    """A path under the state root. Building one touches no file; `create=True` makes it a directory
    now, for callers that need it before they write (a lock file). The writers of stage1core.storage
    make the parents of what they write themselves."""
    path = stage1_home().joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def mlflow_tracking_uri(*, create: bool = True) -> str:
    """`$MLFLOW_TRACKING_URI` if set, else SQLite under the home (never `./mlflow.db`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home_path('mlflow', create=create) / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    return (home_path("mlflow") / "artifacts").as_uri()


def bundle_signing_key() -> Path | None:
    """`$STAGE1_BUNDLE_SIGNING_KEY`: the team's ed25519 private key (PEM); exported bundles are signed."""
    value = os.environ.get("STAGE1_BUNDLE_SIGNING_KEY")
    return Path(value).expanduser() if value else None


def bundle_public_key() -> Path | None:
    """`$STAGE1_BUNDLE_PUBLIC_KEY`: the team's ed25519 public key (PEM); bundles must carry its signature."""
    value = os.environ.get("STAGE1_BUNDLE_PUBLIC_KEY")
    return Path(value).expanduser() if value else None


def configure_environment() -> dict[str, str]:
    """Default the environment of the orchestration layer to the home directory.

    Must run before prefect, timm or huggingface_hub are imported: Prefect reads its settings and
    huggingface_hub reads HF_HUB_OFFLINE at import time. Values already set by the user win. Touches
    no file. Returns what was set.
    """
    home = stage1_home()
    defaults = {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "prefect" / "results"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        # a loaded machine takes far longer than Prefect's default 20 s to start the local server
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        # every call to a server has a deadline: Prefect's client, and MLflow's (its defaults, 120 s x 7
        # retries with backoff, kept a run blocked for minutes on a server that accepts and never answers)
        "PREFECT_API_REQUEST_TIMEOUT": "60",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        # child processes (the Prefect server, fine-tuning launches) never import from the working
        # directory: a stray inspect.py there must not replace the standard library's
        "PYTHONSAFEPATH": "1",
        # weights come from local files or an offline Hugging Face cache, never the network
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "MLFLOW_TRACKING_URI": mlflow_tracking_uri(create=False),
        # MLflow otherwise warns on every run about a git repo it may not find
        "GIT_PYTHON_REFRESH": "quiet",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # an MLflow server started from here (`stage1 ui`, `stage1 serve`, the tests) runs without its
        # GenAI job runner: stage1 submits no MLflow jobs, and the runner is four more Python processes
        # (huey consumers) that each import MLflow at every server start
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    applied = {}
    for key, value in defaults.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


def _fix(home: Path) -> str:
    return f"point STAGE1_HOME at a writable directory with free space (now STAGE1_HOME={home})"


def prepare_home(*, min_free_mb: float | None = None) -> Path:
    """Create the home and its subfolders, and check that it can be written and has room.

    Raises HomeError naming the path and what to do when the home is read-only, not a directory, or
    (nearly) full. Runs before any server starts, so a broken home is one clear error, not a server
    that restarts until a timeout.
    """
    home = stage1_home()
    try:
        for sub in SUBFOLDERS:
            (home / sub).mkdir(parents=True, exist_ok=True)
        probe = home / "locks" / f".write-probe-{os.getpid()}"
        with open(probe, "wb") as fh:
            fh.write(b"stage1")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        where = exc.filename or home
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise HomeError(exc.errno, f"{where} is read-only ({exc.strerror}); {_fix(home)}") from exc
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HomeError(exc.errno, f"no space left on the device of {where}; free space or "
                                       f"{_fix(home)}") from exc
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            raise HomeError(exc.errno, f"{where} is not a directory; {_fix(home)}") from exc
        raise HomeError(exc.errno or errno.EIO, f"cannot write to {where} ({exc.strerror or exc}); "
                                                f"{_fix(home)}") from exc
    need = float(os.environ.get("STAGE1_MIN_FREE_MB", DEFAULT_MIN_FREE_MB)) if min_free_mb is None else min_free_mb
    stat = os.statvfs(home)
    free_mb = stat.f_bavail * stat.f_frsize / 2**20
    if free_mb < need:
        raise HomeError(errno.ENOSPC, f"only {free_mb:.0f} MB free on the device of {home}, a run needs at least "
                                      f"{need:.0f} MB ($STAGE1_MIN_FREE_MB); free space or {_fix(home)}")
    return home
