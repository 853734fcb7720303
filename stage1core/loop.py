"""What the two explicit training loops share: `train.fit_head` (AdamW heads on cached features) and
`finetune.fit_backbone` (adapters and a head on images).

Each loop stays written out in its own function; these are the pieces where two copies would drift
apart: the learning-rate schedule, the weight EMA, and the rule that decides which evaluation's
weights are kept and when to stop (docs/selection.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

LogFn = Callable[[dict[str, float], int], None]

# a new best must beat the old one by more than float noise
SCORE_TOLERANCE = 1e-9


def no_log(metrics: dict[str, float], step: int) -> None:
    """The default `log_fn`: tasks pass one that writes to MLflow."""
    return None


def cosine_schedule(optimizer: Any, *, total_steps: int, warmup_steps: int, min_lr: float):
    """timm's cosine schedule over `total_steps` optimizer steps, after a linear warmup from `min_lr`;
    the loop calls `step_update(step)` after every optimizer step."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=min_lr, warmup_t=warmup_steps,
                             warmup_lr_init=min_lr, t_in_epochs=False)


def weight_ema(model: nn.Module, *, decay: float, warmup: bool):
    """timm's ModelEmaV3 of `model` (updated with `ema.update(model, step=step)`), or None when `decay`
    is 0: then the live weights are the ones judged on val."""
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=warmup) if decay > 0 else None


def judged_model(model: nn.Module, ema: Any) -> nn.Module:
    """The weights an evaluation scores: the EMA's when there is one."""
    return ema.module if ema is not None else model


@dataclass
class EarlyStopping:
    """Which evaluation's weights to keep, and when to stop training.

    Scores are lower-is-better (both loops pass the val `train.balanced_brier`). An evaluation that ends
    inside the LR warmup is not eligible unless it is the run's last: a half-warmed-up model must not
    win because later evaluations, at the full learning rate, looked worse. After `patience` eligible
    evaluations without a better score, `stopped` turns true. Plain data, so a checkpoint can hold it.
    """

    patience: int  # eligible evaluations without improvement before stopping
    warmup_steps: int  # evaluations at an optimizer step below this are not eligible
    best_score: float = math.inf
    best_step: int = -1
    best_epoch: int = -1
    stale: int = 0  # eligible evaluations since the best one
    stopped: bool = False

    def update(self, score: float, *, step: int, epoch: int, last: bool = False) -> bool:
        """Record the evaluation after optimizer step `step`; True when it is the new best, whose
        weights the caller then keeps. `last`: the run ends here, so it is eligible whatever the step."""
        if step < self.warmup_steps and not last:
            return False
        if score < self.best_score - SCORE_TOLERANCE:
            self.best_score, self.best_step, self.best_epoch, self.stale = score, step, epoch, 0
            return True
        self.stale += 1
        self.stopped = self.stale >= self.patience
        return False

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["best_score"] = self.best_score if math.isfinite(self.best_score) else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EarlyStopping:
        score = data["best_score"]
        return cls(**{**data, "best_score": math.inf if score is None else float(score)})
