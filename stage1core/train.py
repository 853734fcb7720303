"""Head training on cached features: one explicit loop through Accelerate.

AdamW, timm's cosine schedule with warmup (stepped per update), timm's ModelEmaV3 with warmup,
class-weighted cross-entropy (weights kept under label smoothing), early stopping on the validation
split, selection of the best EMA weights. Seeded and deterministic on CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .fingerprint import fingerprint, sha256_file
from .heads import HeadConfig, SelectiveHead, build_head, positive_probability
from .losses import class_weighted_ce, class_weights_from_labels, risk_aware_loss, selectivenet_loss
from .storage import atomic_dir

log = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]


def _no_log(metrics: dict[str, float], step: int) -> None:
    return None


@dataclass(frozen=True)
class TrainConfig:
    # passes over the train split (early stopping may end sooner)
    epochs: int = 40
    batch_size: int = 128
    # peak learning rate of AdamW after warmup
    lr: float = 1e-3
    weight_decay: float = 0.05
    # linear warmup length, in epochs (converted to optimizer steps)
    warmup_epochs: float = 2.0
    # floor of the cosine schedule
    min_lr: float = 1e-6
    # label smoothing of the cross-entropy; class weights still apply
    label_smoothing: float = 0.1
    # weight classes by inverse frequency in the train split
    class_weighting: bool = True
    # EMA of the weights (timm ModelEmaV3); 0 disables it
    ema_decay: float = 0.995
    # EMA warmup: the effective decay ramps up over the first steps
    ema_warmup: bool = True
    # stop after this many epochs without a better validation loss
    patience: int = 8
    seed: int = 0
    # ce (class-weighted cross-entropy) or risk_aware (cost-weighted focal loss that punishes confident
    # missed roadwork fn_cost times more than confident false alarms; docs/selective.md); the selective
    # head always trains with the SelectiveNet loss
    loss: Literal["ce", "risk_aware"] = "ce"
    fn_cost: float = 5.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.min_lr < 0:
            raise ValueError("lr must be > 0; weight_decay and min_lr >= 0")
        if not 0.0 <= self.label_smoothing < 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("label_smoothing and ema_decay must be in [0, 1)")
        if self.patience < 1 or self.warmup_epochs < 0:
            raise ValueError("patience must be >= 1 and warmup_epochs >= 0")
        if self.loss not in ("ce", "risk_aware") or self.fn_cost <= 0:
            raise ValueError(f"loss must be 'ce' or 'risk_aware' and fn_cost > 0, got {self.loss!r}, {self.fn_cost}")


@dataclass
class TrainedHead:
    model: nn.Module  # best weights (EMA when enabled), on CPU, eval mode
    head: HeadConfig
    in_dim: int
    history: list[dict[str, float]]
    best_epoch: int


def _check_inputs(name: str, x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"{name}: features {x.shape} and labels {y.shape} do not match")
    if len(x) == 0:
        raise ValueError(f"{name} split is empty")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} features contain NaN or inf")
    if set(np.unique(y).tolist()) != {0, 1}:
        raise ValueError(f"{name} split needs both classes, has labels {sorted(set(np.unique(y).tolist()))}")


def head_loss(model: nn.Module, head: HeadConfig, x: torch.Tensor, y: torch.Tensor, *,
              class_weights: torch.Tensor | None, label_smoothing: float = 0.0, loss: str = "ce",
              fn_cost: float = 5.0) -> torch.Tensor:
    """The training loss of a head kind: class-weighted CE (with label smoothing) or the class-weighted
    risk-aware loss, or for the selective head the SelectiveNet loss on plain class-weighted CE
    (docs/selective.md). `class_weights=None` means unweighted."""
    if head.kind == "selective":
        cls, gate, aux = model(x, return_all=True)
        loss, _ = selectivenet_loss(cls, gate, aux, y, coverage=head.target_coverage, lam=head.coverage_lambda,
                                    alpha=head.selective_alpha, class_weights=class_weights)
        return loss
    if loss == "risk_aware":
        return risk_aware_loss(model(x), y, fn_cost=fn_cost, class_weights=class_weights)
    return class_weighted_ce(model(x), y, class_weights=class_weights, label_smoothing=label_smoothing)


def fit_head(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    head: HeadConfig = HeadConfig(),
    config: TrainConfig = TrainConfig(),
    log_fn: LogFn = _no_log,
) -> TrainedHead:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    _check_inputs("train", train_x, train_y)
    _check_inputs("val", val_x, val_y)
    set_seed(config.seed)
    accelerator = Accelerator()
    device = accelerator.device

    xt = torch.as_tensor(train_x, dtype=torch.float32)
    yt = torch.as_tensor(train_y, dtype=torch.long)
    xv = torch.as_tensor(val_x, dtype=torch.float32, device=device)
    yv = torch.as_tensor(val_y, dtype=torch.long, device=device)

    model = build_head(head, xt.shape[1])
    model.norm.set_stats(xt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loader = DataLoader(
        TensorDataset(xt, yt), batch_size=config.batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
    )
    steps_per_epoch = len(loader)
    total_steps = config.epochs * steps_per_epoch
    scheduler = CosineLRScheduler(
        optimizer, t_initial=total_steps, lr_min=config.min_lr,
        warmup_t=int(round(config.warmup_epochs * steps_per_epoch)), warmup_lr_init=config.lr * 0.01,
        t_in_epochs=False,
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema = (
        ModelEmaV3(accelerator.unwrap_model(model), decay=config.ema_decay, use_warmup=config.ema_warmup)
        if config.ema_decay > 0 else None
    )
    train_weights = class_weights_from_labels(train_y).to(device) if config.class_weighting else None
    val_weights = class_weights_from_labels(val_y).to(device)

    history: list[dict[str, float]] = []
    best_loss, best_epoch, best_state, stale, step = float("inf"), -1, None, 0, 0
    for epoch in range(config.epochs):
        model.train()
        running, seen = 0.0, 0
        for xb, yb in loader:
            loss = head_loss(model, head, xb, yb, class_weights=train_weights,
                             label_smoothing=config.label_smoothing, loss=config.loss, fn_cost=config.fn_cost)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            scheduler.step_update(step)
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step=step)
            running += float(loss.detach()) * len(yb)
            seen += len(yb)
        judged = ema.module if ema is not None else accelerator.unwrap_model(model)
        judged.eval()
        with torch.no_grad():
            val_logits = judged(xv)
            val_loss = float(head_loss(judged, head, xv, yv, class_weights=val_weights))
            val_acc = float((val_logits.argmax(-1) == yv).float().mean())
        row = {
            "epoch": epoch, "step": step, "train_loss": running / seen, "val_loss": val_loss,
            "val_accuracy": val_acc, "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(row)
        log_fn({k: v for k, v in row.items() if k not in ("epoch", "step")}, epoch)
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, stale = val_loss, epoch, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in judged.state_dict().items()})
        else:
            stale += 1
            if stale >= config.patience:
                log.info("early stop at epoch %d (best %d, val_loss %.4f)", epoch, best_epoch, best_loss)
                break

    final = build_head(head, xt.shape[1])
    final.load_state_dict(best_state)
    final.eval()
    accelerator.free_memory()
    return TrainedHead(model=final, head=head, in_dim=int(xt.shape[1]), history=history, best_epoch=best_epoch)


def head_outputs(model: nn.Module, features: np.ndarray, *, batch_size: int = 4096) -> dict[str, np.ndarray]:
    """Class logits (n, 2) for any head, plus the gate logit (n,) for a selective head."""
    model.eval()
    logits, gates = [], []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            xb = torch.as_tensor(features[start:start + batch_size], dtype=torch.float32)
            if isinstance(model, SelectiveHead):
                cls, gate, _ = model(xb, return_all=True)
                gates.append(gate.double().numpy())
            else:
                cls = model(xb)
            logits.append(cls.double().numpy())
    out = {"logits": np.concatenate(logits) if logits else np.zeros((0, 2))}
    if gates:
        out["gate_logit"] = np.concatenate(gates)
    return out


def predict_positive(model: nn.Module, features: np.ndarray, *, batch_size: int = 4096) -> np.ndarray:
    """p(roadwork) for cached features, as float64."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            xb = torch.as_tensor(features[start:start + batch_size], dtype=torch.float32)
            out.append(positive_probability(model(xb)).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


HEAD_WEIGHTS = "head.safetensors"
HEAD_META = "head.json"


def save_head(directory: str | Path, trained: TrainedHead, *, extra: dict[str, Any] | None = None) -> str:
    """Write head.safetensors + head.json atomically; return the weights' sha256."""
    from safetensors.torch import save_file

    directory = Path(directory)
    with atomic_dir(directory, replace=True) as tmp:
        save_file({k: v.contiguous() for k, v in trained.model.state_dict().items()}, str(tmp / HEAD_WEIGHTS))
        meta = {
            "head": dataclasses.asdict(trained.head), "in_dim": trained.in_dim, "history": trained.history,
            "best_epoch": trained.best_epoch, **(extra or {}),
        }
        (tmp / HEAD_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return sha256_file(directory / HEAD_WEIGHTS)


def load_head(directory: str | Path) -> TrainedHead:
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = json.loads((directory / HEAD_META).read_text())
    head = HeadConfig(**meta["head"])
    model = build_head(head, meta["in_dim"])
    model.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)))
    model.eval()
    return TrainedHead(model=model, head=head, in_dim=meta["in_dim"], history=meta["history"],
                       best_epoch=meta["best_epoch"])


def head_fingerprint(features_fingerprint: str, split_fingerprint: str, head: HeadConfig,
                     config: TrainConfig) -> str:
    return fingerprint("head", features_fingerprint, split_fingerprint, head, config)
