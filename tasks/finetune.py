"""The `fit_backbone` Prefect task: backbone fine-tuning in a child process, never in the Prefect process.

One device: `python -m stage1core.finetune --config launch.json --out DIR`. Several GPUs or machines:
`python -m accelerate.commands.launch --num_processes N [--num_machines M --machine_rank R
--main_process_ip IP --main_process_port P] -m stage1core.finetune ...`. The child runs in its own
session (process group); its output streams line by line into the Prefect log; a timeout (ours or
Prefect's) or any error kills the whole group, DataLoader workers and accelerate's ranks included.
This module never touches torch.cuda: CUDA initialised in a parent breaks forked workers and holds a
GPU context the child needs.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task

from stage1core.backbone import BackboneSpec
from stage1core.config import describe_fields
from stage1core.finetune import (
    ADAPTER_WEIGHTS,
    RESULT,
    FinetuneConfig,
    FinetuneResult,
    extract_adapted_features,
    write_launch_config,
)
from stage1core.fingerprint import fingerprint
from stage1core.heads import HeadConfig
from stage1core.home import home_path
from tasks.logs import run_logger

from .caching import OutputCache
from .pipeline import SplitRef
from .processes import die_with_parent

REPO_ROOT = Path(__file__).resolve().parent.parent


@describe_fields
@dataclass(frozen=True)
class LaunchConfig:
    # training processes on this machine (one per GPU); 1 runs a plain subprocess
    num_processes: int = 1
    # machines in a multi-node run
    num_machines: int = 1
    # this machine's rank among them (0 on the main machine)
    machine_rank: int = 0
    # address of rank 0 (multi-node only)
    main_process_ip: str | None = None
    # port of rank 0 (multi-node only)
    main_process_port: int = 29500
    # run on CPU even where a GPU exists (tests, CPU-only workers)
    cpu: bool = False
    # wall-clock limit of the child; past it the whole process group is killed
    timeout_s: float = 24 * 3600.0
    # seconds between SIGTERM and SIGKILL when the group is stopped
    kill_grace_s: float = 10.0

    def __post_init__(self) -> None:
        if self.num_processes < 1 or self.num_machines < 1 or not 0 <= self.machine_rank < self.num_machines:
            raise ValueError("LaunchConfig: num_processes and num_machines must be >= 1, 0 <= machine_rank < "
                             f"num_machines (got {self.num_processes}, {self.num_machines}, {self.machine_rank})")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("LaunchConfig: a multi-node run needs main_process_ip (the address of machine rank 0)")
        if self.timeout_s <= 0 or self.kill_grace_s < 0:
            raise ValueError("LaunchConfig: timeout_s must be > 0 and kill_grace_s >= 0")

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines


@dataclass(frozen=True)
class FinetuneRef:
    path: str  # output directory: adapter.*, head.* (head_dir for export_bundle), preprocessing.json
    fingerprint: str
    result_path: str
    adapter_path: str
    metrics: dict[str, float]  # val metrics of the selected weights
    best_step: int
    steps: int
    epochs_run: int
    seconds: float
    images_per_second: float
    resumed_from: int | None


def launch_command(config_path: str | Path, out_dir: str | Path, launch: LaunchConfig) -> list[str]:
    """The child's argv: a plain interpreter for one process, `accelerate launch` otherwise."""
    entry = ["-m", "stage1core.finetune", "--config", str(config_path), "--out", str(out_dir)]
    if launch.world_size == 1:
        return [sys.executable, *entry]
    # torchrun's launcher (accelerate's `--multi_gpu`) for CPU ranks too: `--cpu` with several processes
    # starts one process only (accelerate's simple launcher); with `cpu`, ACCELERATE_USE_CPU and no visible
    # GPU (child_environment) the ranks join a gloo process group
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launch.world_size),
           "--multi_gpu"]
    if launch.num_machines > 1:
        cmd += ["--num_machines", str(launch.num_machines), "--machine_rank", str(launch.machine_rank),
                "--main_process_ip", str(launch.main_process_ip), "--main_process_port", str(launch.main_process_port)]
    else:
        cmd += ["--num_machines", "1", "--main_process_port", str(launch.main_process_port)]
    return [*cmd, *entry]


def child_environment(launch: LaunchConfig) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # the child imports stage1core from this checkout, whatever the worker's working directory
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if launch.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["ACCELERATE_USE_CPU"] = "true"  # Accelerator(cpu=True): gloo ranks under torchrun
    return env


def _kill_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            # the leader is gone; stragglers (workers, ranks) may not be
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return


def run_child(command: Sequence[str], *, env: dict[str, str] | None = None, timeout_s: float,
              kill_grace_s: float = 10.0, on_line: Callable[[str], None] = print) -> tuple[int, list[str]]:
    """Run `command` in a new session, hand every output line (stdout and stderr) to `on_line`.

    Returns (exit code, last 50 lines). Past `timeout_s`, or on any exception here (including
    Prefect's task timeout), the whole process group is killed; a timeout raises TimeoutError.
    """
    proc = subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        text=True, bufsize=1, errors="replace", start_new_session=True,
        preexec_fn=die_with_parent,  # a killed parent (kill -9 included) takes the launcher with it
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, name="finetune-output", daemon=True)
    reader.start()
    tail: list[str] = []
    deadline = time.monotonic() + timeout_s
    finished = False
    try:
        while True:
            try:
                # short waits: Prefect's timeout and KeyboardInterrupt land between them
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"fine-tuning exceeded {timeout_s:.0f}s; its process group was killed") from None
                continue
            if line is None:
                break
            tail = (tail + [line])[-50:]
            on_line(line)
        code = proc.wait()
        finished = True
        return code, tail
    finally:
        if not finished:
            _kill_group(proc, kill_grace_s)
        reader.join(timeout=5.0)


def finetune_fingerprint(split: SplitRef, backbone: BackboneSpec, head: HeadConfig, finetune: FinetuneConfig,
                         launch: LaunchConfig) -> str:
    """Output key: data split, resolved backbone, configs and world size (it sets the effective batch)."""
    return fingerprint("finetune-task", split.fingerprint, backbone.fingerprint, head, finetune.to_json(),
                       launch.world_size)


FINETUNE_CACHE = OutputCache(
    "fit_backbone",
    lambda p: finetune_fingerprint(p["split"], p["backbone"], p["head"], p["finetune"], p["launch"]),
    paths=lambda ref, p: [ref.path],
)


@task(name="fit_backbone", tags=["gpu"], cache_key_fn=FINETUNE_CACHE, persist_result=True)
@FINETUNE_CACHE.records_outputs
def fit_backbone(split: SplitRef, backbone: BackboneSpec, head: HeadConfig, finetune: FinetuneConfig,
                 launch: LaunchConfig = LaunchConfig()) -> FinetuneRef:
    """Fine-tune adapters + head on the split's train images (early stopping on val) in a child process
    (`backbone`: the run's resolved spec; the child builds it without hashing the weights again).

    The output directory is keyed by content, so a retried or restarted task resumes from the child's
    last checkpoint there. The per-epoch history lands in head.json beside the head, so
    `tasks.tracking.log_training_history(run_id, ref.path)` logs its curves, cached or not.
    """
    logger = run_logger(__name__)
    fp = finetune_fingerprint(split, backbone, head, finetune, launch)
    out_dir = home_path("finetune") / fp[:24]
    config_path = out_dir.parent / f"{fp[:24]}.launch.json"
    write_launch_config(config_path, backbone=backbone, head=head, config=finetune, split_manifest=split.path)
    command = launch_command(config_path, out_dir, launch)
    logger.info("launching: %s", " ".join(command))

    code, tail = run_child(command, env=child_environment(launch), timeout_s=launch.timeout_s,
                           kill_grace_s=launch.kill_grace_s, on_line=lambda line: logger.info("%s", line))
    if code != 0:
        raise RuntimeError(f"fine-tuning failed with exit code {code}; last lines:\n" + "\n".join(tail[-20:]))
    result = FinetuneResult.from_json(json.loads((out_dir / RESULT).read_text()))
    return FinetuneRef(
        path=str(out_dir), fingerprint=result.fingerprint, result_path=str(out_dir / RESULT),
        adapter_path=str(out_dir / ADAPTER_WEIGHTS), metrics=result.metrics, best_step=result.best_step,
        steps=result.steps, epochs_run=result.epochs_run, seconds=result.seconds,
        images_per_second=result.images_per_second, resumed_from=result.resumed_from,
    )


def result_of(ref: FinetuneRef) -> dict[str, Any]:
    """The full result JSON (history, val predictions) behind a reference."""
    return json.loads(Path(ref.result_path).read_text())


ADAPTED_CACHE = OutputCache(
    "extract_adapted_features",
    lambda p: (p["split"].fingerprint, p["finetune"].fingerprint, p["precision"]),
    paths=lambda info, p: [info.store_dir],
)


@task(name="extract_adapted_features", cache_key_fn=ADAPTED_CACHE, persist_result=True, tags=["features"])
@ADAPTED_CACHE.records_outputs
def extract_adapted_features_task(split: SplitRef, finetune: FinetuneRef, precision: str,
                                  backbone: BackboneSpec | None = None):
    """Calib and test features of the fine-tuned backbone, so calibration, evaluation and export are the
    same tasks as for a frozen backbone. With `backbone` (the run's resolved spec, which the fine-tuned
    run's fingerprint already covers) the weights are not hashed again."""
    from stage1core.features import FeatureConfig
    from stage1core.splits import read_split_manifest

    _, parts, _ = read_split_manifest(split.path)
    samples = [s for name in ("calib", "test") for s in parts[name]]
    return extract_adapted_features(samples, finetune.path, FeatureConfig(precision=precision, num_workers=0),
                                    backbone=backbone)


def head_ref_of(ref: FinetuneRef):
    """The fine-tuned head as the HeadRef the shared tasks take."""
    from stage1core.fingerprint import sha256_file

    from .pipeline import HeadRef

    result = result_of(ref)
    head_dir = Path(ref.path)
    return HeadRef(path=ref.path, fingerprint=ref.fingerprint,
                   weights_sha256=sha256_file(head_dir / "head.safetensors"),
                   in_dim=int(json.loads((head_dir / "head.json").read_text())["in_dim"]),
                   best_epoch=int(result["best_epoch"]), epochs_run=int(result["epochs_run"]))
