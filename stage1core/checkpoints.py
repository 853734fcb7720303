"""Where a fine-tuning run stands (`RunProgress`), and its resumable checkpoints, under
`<out_dir>/checkpoints/step-NNNNNNNN/`.

A checkpoint holds Accelerate's state (model, optimizer with the F-SAM EMA, the RNG of every
process), the weight EMA and the best weights so far (trainable tensors only, safetensors), and
`trainer_state.json`, written last, which marks it complete. It is written to a temporary directory
and renamed into place; only the newest complete checkpoint is kept.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .classifier import load_weights
from .loop import EarlyStopping
from .storage import atomic_write_json

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
EMA_WEIGHTS = "ema.safetensors"
BEST_WEIGHTS = "best.safetensors"

log = logging.getLogger(__name__)


@dataclass
class RunProgress:
    """Where a fine-tuning run stands. All of it but the best weights is a checkpoint's trainer_state.json."""

    fingerprint: str
    stopping: EarlyStopping  # the selection rule's state: best score, step and epoch, patience
    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # optimizer steps done in this epoch
    history: list[dict[str, float]] = field(default_factory=list)  # one row per evaluation
    best_state: dict[str, torch.Tensor] | None = None  # the selected weights (trainable tensors)
    best_val_p: list[float] = field(default_factory=list)  # their val p(roadwork)
    images_seen: int = 0  # all processes together
    train_seconds: float = 0.0
    resumed_from: int | None = None

    def to_json(self, *, total_steps: int, world: int, ema: bool) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint, "step": self.step, "epoch": self.epoch, "position": self.position,
            "history": self.history, "selection": self.stopping.to_json(), "best_val_p": self.best_val_p,
            "images_seen": self.images_seen, "train_seconds": self.train_seconds, "total_steps": total_steps,
            "ema_updates": self.step if ema else 0,
            # bitwise resume needs the same thread count (BLAS kernels depend on it)
            "intra_op_threads": torch.get_num_threads(),
            # RNG of each process: random_states_<rank>.pkl written by accelerator.save_state
            "rng": f"random_states_<rank>.pkl for {world} processes",
        }

    def restore(self, state: dict[str, Any], best_state: dict[str, torch.Tensor] | None, where: Path) -> None:
        if "selection" not in state:
            raise ValueError(f"{where}: a checkpoint written by an older version of fit_backbone; delete "
                             f"{where.parent} to start the run afresh")
        self.stopping = EarlyStopping.from_json(state["selection"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.history, self.best_val_p = state["history"], state["best_val_p"]
        self.images_seen, self.train_seconds = state["images_seen"], state["train_seconds"]
        self.best_state, self.resumed_from = best_state, self.step


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints (trainer_state.json present), oldest first."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / TRAINER_STATE).is_file())


def save_checkpoint(out_dir: Path, step: int, *, accelerator, trainer_state: dict[str, Any],
                    ema_weights: dict[str, torch.Tensor] | None,
                    best_weights: dict[str, torch.Tensor] | None) -> Path:
    """Accelerate's state (every process) + EMA/best weights + trainer_state.json (main process; last:
    marks the checkpoint complete). Call it in every process."""
    from safetensors.torch import save_file

    final = out_dir / CHECKPOINTS / f"step-{step:08d}"
    tmp = out_dir / CHECKPOINTS / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        if ema_weights is not None:
            save_file(ema_weights, str(tmp / EMA_WEIGHTS))
        if best_weights is not None:
            save_file(best_weights, str(tmp / BEST_WEIGHTS))
        atomic_write_json(tmp / TRAINER_STATE, trainer_state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out_dir)[:-1]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_latest_checkpoint(out_dir: Path, fingerprint: str, *, accelerator
                           ) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor] | None,
                                      dict[str, torch.Tensor] | None] | None:
    """Restore Accelerate's state from the newest complete checkpoint of the run `fingerprint` and
    return (its directory, trainer state, EMA weights or None, best weights or None); None when there
    is no checkpoint. A checkpoint of another run is refused."""
    from safetensors.torch import load_file

    found = checkpoint_dirs(out_dir)
    if not found:
        return None
    latest = found[-1]
    state = json.loads((latest / TRAINER_STATE).read_text())
    if state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{latest} is a checkpoint of another run ({str(state.get('fingerprint'))[:12]}; this run is "
            f"{fingerprint[:12]}: config, data, backbone or process count differ); use another output directory"
        )
    accelerator.load_state(str(latest))  # model, optimizer (with the F-SAM EMA), RNG of every process
    ema = load_file(str(latest / EMA_WEIGHTS)) if (latest / EMA_WEIGHTS).is_file() else None
    best = load_file(str(latest / BEST_WEIGHTS)) if (latest / BEST_WEIGHTS).is_file() else None
    return latest, state, ema, best


def resume_run(run: RunProgress, out_dir: Path, *, accelerator, ema, keys: list[str]) -> Path | None:
    """Continue `run` from the newest complete checkpoint of it in `out_dir`: Accelerate's state, the
    EMA's trainable tensors `keys`, the best weights and the progress. Returns the checkpoint, or None
    when there is none."""
    loaded = load_latest_checkpoint(out_dir, run.fingerprint, accelerator=accelerator)
    if loaded is None:
        return None
    latest, state, ema_weights, best_weights = loaded
    if ema is not None:
        load_weights(ema.module, ema_weights or {}, keys, str(latest / EMA_WEIGHTS))
    run.restore(state, best_weights, latest)
    threads = state.get("intra_op_threads")
    if accelerator.is_main_process and threads is not None and threads != torch.get_num_threads():
        log.warning("%s was written with %d intra-op threads, this process has %d: the result will agree with "
                    "an uninterrupted run to float rounding, not bit for bit (set OMP_NUM_THREADS=%d for an "
                    "exact resume)", latest, threads, torch.get_num_threads(), threads)
    return latest
