"""Helpers of the fault tests (tests/test_faults_*.py): image bytes good and broken, a JSON strategy for
fuzzing, a forked feature-extraction child, and the `stage1` command run as a deployment runs it."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st
from PIL import Image

from stage1core.features import FeatureConfig, extract_features
from tests.common import HANG_TIMEOUT_S, encode, png_claiming, tiny_run_parameters  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parents[1]
SHARD = 8  # images per shard in the crash tests: the most a kill may cost
BATCH = 4  # divides SHARD, so a resumed run batches exactly like an uninterrupted one
CRASH_CFG = FeatureConfig(batch_size=BATCH, num_workers=0, shard_size=SHARD, device="cpu")
FORK = multiprocessing.get_context("fork")


def photo(width: int = 48, height: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def exif_rotated(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo(48, 32), "JPEG", exif=exif.tobytes(), quality=95)


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def child_extract(samples, backbone, root, progress: str | None, result: str | None,
                   wait_after: int | None = None) -> None:
    """Runs in a forked child: extract features, logging embedded counts to `progress` as it goes. With
    `wait_after`, the child waits to be killed once it has embedded that many images (before their shard
    is written), so it can never finish first: every kill lands, however load shifts the race between
    this child and the test polling its progress."""
    import torch

    import stage1core.features as features

    # every extraction compared bit for bit below runs with one intra-op thread: BLAS picks kernels by
    # thread count (and shape), so equal thread counts and equal batches (BATCH divides SHARD) are what
    # make the features of different processes bit-identical, on any CPU and under any load
    torch.set_num_threads(1)
    done = [0]
    real_embed = features.embed

    def logged_embed(model, batch, pooling):
        out = real_embed(model, batch, pooling)
        done[0] += len(batch)
        if progress:
            with open(progress, "a") as fh:
                fh.write(f"{done[0]}\n")
        time.sleep(0.01)  # widen the window between batches so kills land everywhere
        if wait_after is not None and done[0] >= wait_after:
            time.sleep(HANG_TIMEOUT_S)
        return out

    features.embed = logged_embed
    info = extract_features(samples, backbone, CRASH_CFG, store_root=root, progress=False, log_fn=lambda m: None)
    if result:
        Path(result).write_text(json.dumps(info.to_json()))


def run_child(samples, backbone, root, tmp, tag) -> dict:
    result = tmp / f"{tag}.json"
    proc = FORK.Process(target=child_extract, args=(samples, backbone, str(root), None, str(result)))
    proc.start()
    proc.join(HANG_TIMEOUT_S)
    assert proc.exitcode == 0, f"{tag} exited with {proc.exitcode}"
    return json.loads(result.read_text())


# ----------------------------------------------------------------------------------------------- the stage1 command
# The `stage1` command as a deployment runs it: a subprocess in its own session (so that every process
# it starts can be found by session id in /proc), with its own $STAGE1_HOME, under bounded timeouts.

STAGE1 = Path(sys.executable).with_name("stage1")


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """The test session's environment without its Prefect/MLflow/stage1 settings, plus a home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "STAGE1_"))}
    env.update({"STAGE1_HOME": str(home), "PREFECT_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    env.update(extra)
    return env


def stage1_cmd() -> list[str]:
    if not STAGE1.exists():
        pytest.skip("the stage1 console script is not installed in this interpreter (make venv)")
    return [str(STAGE1)]


def start_stage1(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    out = open(log, "wb")
    return subprocess.Popen([*stage1_cmd(), *args], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def params_file(folder: Path, data: Path, model_name: str) -> Path:
    """`stage1 train --params` JSON for the tiny run on `data`, registering as `model_name`."""
    path = folder / "params.json"
    path.write_text(json.dumps(tiny_run_parameters(data, experiment="faults", model_name=model_name)))
    return path


def run_stage1(args: list[str], env: dict[str, str], cwd: Path, *, timeout: float = 900,
               stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*stage1_cmd(), *args], env=env, cwd=cwd, capture_output=True, timeout=timeout,
                          input=stdin if stdin is not None else b"", start_new_session=True)


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command) of every live (non-zombie) process in session `sid`, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            found.append((int(entry.name), cmd.strip()))
    return found


def wait_for(check, *, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def query(db: Path, sql: str, *args) -> list[tuple]:
    import sqlite3

    if not db.exists():
        return []
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []


def mlflow_db(home: Path) -> Path:
    return home / "mlflow" / "mlflow.db"


def prefect_db(home: Path) -> Path:
    return home / "prefect" / "prefect.db"


def text(proc: subprocess.CompletedProcess) -> tuple[str, str]:
    return proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
