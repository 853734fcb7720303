"""Backbone fine-tuning on images: DoRA/LoRA adapters and a head, one explicit loop on Accelerate.

The feature cache cannot serve this path: every step decodes images, augments them (timm's train
transforms with the backbone's data config) and runs the adapted backbone. The loop mirrors
`stage1core.train.fit_head` and shares its pieces (`stage1core.loop`): the same loss per head kind
(class-weighted CE with label smoothing, or for the selective head the SelectiveNet loss over its cls,
gate and aux outputs; `classifier.finetune_loss`), timm's cosine schedule with warmup stepped per
optimizer step, timm's ModelEmaV3 with warmup, and the same choice of weights: the (EMA) weights of the
evaluation with the best class-balanced Brier score on val, never one that ends inside the LR warmup,
with early stopping on that score. The optimizer is F-SAM (`stage1core.fsam`) or plain AdamW.

Exact resume. Everything random is a pure function of the seed or is checkpointed: the sample order
of epoch e is a permutation seeded by (seed, e); the augmentation of sample i in epoch e runs under
an RNG seeded by (seed, e, i), whatever process or DataLoader worker decodes it
(`images.ImageDataset`); dropout draws from the global RNG, which `accelerator.save_state` stores and
`load_state` restores. A checkpoint (every `checkpoint_every` optimizer steps; `stage1core.checkpoints`)
holds Accelerate's state, the EMA and best weights and the trainer state. A run started again on the
same output directory resumes from the newest complete checkpoint and, on CPU with a fixed seed, ends
with bitwise the same weights as a run that was never interrupted, on the same machine with the same
number of intra-op threads (BLAS picks kernels by thread count and shape, so other thread counts or CPUs
agree to float rounding only; the checkpoint records the thread count and a resume with another one
says so).

Gradient accumulation is done here, not by Accelerate: one optimizer step takes `grad_accum`
micro-batches (F-SAM needs both of its passes over the same micro-batches), so the Accelerator is
created with gradient_accumulation_steps=1, as `fsam_training_step` requires.

Entry point for `accelerate launch` (and for a plain subprocess on one device):
    python -m stage1core.finetune --config launch.json --out DIR
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

# tasks/ import the run directory's file names and the adapter exports from here
from .adapters import (  # noqa: F401
    ADAPTER_WEIGHTS,
    RESULT,
    export_adapter_files,
    extract_adapted_features,
    write_adapters,
)
from .backbone import BackboneConfig, BackboneSpec, build_backbone, feature_dim, resolve_backbone
from .checkpoints import CHECKPOINTS, RunProgress, resume_run, save_checkpoint
from .classifier import (
    AdaptedClassifier,
    copy_weights,
    describe_failures,
    evaluate,
    finetune_loss,
    image_loader,
    load_weights,
    param_groups,
    set_head_norm,
    trainable_keys,
)
from .config import describe_fields
from .features import FeatureConfig, draft_size, preprocessing_spec
from .fingerprint import fingerprint
from .fsam import adamw_training_step, fsam_training_step, make_optimizer
from .heads import HeadConfig, build_head
from .images import ImageDataset, epoch_batches, eval_transform, train_transform
from .loop import EarlyStopping, LogFn, cosine_schedule, judged_model, no_log, weight_ema
from .losses import class_weights_from_labels
from .peft import AdapterConfig, apply_adapters, check_adapter_gradients
from .sources import DataError, Sample
from .storage import atomic_write_json
from .train import HEAD_META, HEAD_WEIGHTS, TrainedHead, save_head

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("fsam", "adamw")
PREPROCESSING = "preprocessing.json"
METRICS_PREFIX = "stage1-metrics "  # stdout lines the launching task can parse


@describe_fields
@dataclass(frozen=True)
class FinetuneConfig:
    # which modules get adapters, LoRA or DoRA, rank/alpha/dropout, how many of the last blocks
    adapter: AdapterConfig = AdapterConfig()
    # "fsam" (Friendly SAM around AdamW: two forward/backward passes per step) or "adamw"
    optimizer: Literal["fsam", "adamw"] = "fsam"
    # peak learning rate of the adapters after warmup
    lr: float = 1e-4
    # peak learning rate of the head (random init, so it needs more than the adapters)
    head_lr: float = 1e-3
    # decoupled weight decay on adapter matrices and head weights (never on DoRA magnitudes or biases)
    weight_decay: float = 0.05
    rho: float = 0.05  # F-SAM perturbation radius
    sigma: float = 1.0  # F-SAM: weight of the gradient EMA removed from the perturbation
    lmbd: float = 0.9  # F-SAM: decay of that gradient EMA
    # passes over the train split (early stopping or max_steps may end sooner)
    epochs: int = 10
    # cap on optimizer steps; 0 means the epochs decide
    max_steps: int = 0
    # images per micro-batch per process
    batch_size: int = 32
    # micro-batches per optimizer step (effective batch = batch_size * processes * grad_accum)
    grad_accum: int = 1
    # linear warmup length in optimizer steps
    warmup_steps: int = 100
    # floor of the cosine schedule
    min_lr: float = 1e-6
    # label smoothing of the cross-entropy; class weights still apply (not used by the selective head's
    # SelectiveNet loss, as in fit_head)
    label_smoothing: float = 0.1
    # weight classes by inverse frequency in the train split (CE and SelectiveNet loss alike)
    class_weighting: bool = True
    # clip the gradient used for the update to this norm; 0 disables clipping
    max_grad_norm: float = 1.0
    # EMA of the weights (timm ModelEmaV3); 0 disables it and the live weights are judged on val
    ema_decay: float = 0.999
    # EMA warmup: the effective decay ramps up over the first steps
    ema_warmup: bool = True
    # stop after this many evaluations (one per epoch) past the LR warmup without a better val score
    # (class-balanced Brier, as in fit_head; docs/selection.md)
    patience: int = 3
    # "fp32" or "bf16" (autocast; on GPU, and allowed on CPU); fp16 is not offered (F-SAM + GradScaler)
    precision: Literal["fp32", "bf16"] = "fp32"
    # torch.compile the training forward (GPU; the first steps pay the compile time)
    compile: bool = False
    # save a resumable checkpoint every N optimizer steps; 0: never
    checkpoint_every: int = 200
    # keep the last checkpoint after a successful run (it holds the full model and optimizer)
    keep_checkpoints: bool = False
    # seed of adapter and head initialisation, data order and augmentation
    seed: int = 0
    # DataLoader worker processes that decode and augment images (0: in the training process)
    num_workers: int = 4
    # train augmentation (timm create_transform): RandomResizedCrop's smallest area fraction (small
    # roadwork evidence such as one cone is lost by timm's default 0.08)
    crop_scale_min: float = 0.35
    hflip: float = 0.5  # probability of a horizontal flip
    color_jitter: float = 0.2  # colour jitter strength
    auto_augment: str | None = None  # timm auto-augment string (e.g. "rand-m9-mstd0.5"); None: off
    re_prob: float = 0.0  # random-erasing probability
    # train images whose initial features set the head's input standardisation
    norm_samples: int = 512

    def __post_init__(self) -> None:
        if isinstance(self.adapter, dict):  # from a JSON file or a form
            object.__setattr__(self, "adapter", AdapterConfig(**self.adapter))
        if not isinstance(self.adapter, AdapterConfig):
            raise ValueError(f"FinetuneConfig.adapter must be an AdapterConfig, got {type(self.adapter).__name__}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"FinetuneConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"FinetuneConfig.precision must be one of {PRECISIONS}, got {self.precision!r} "
                "(fp16 needs a GradScaler, which F-SAM cannot use; take bf16)"
            )
        for name in ("lr", "head_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FinetuneConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "min_lr", "rho", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"FinetuneConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.lmbd <= 1.0 or not math.isfinite(self.sigma):
            raise ValueError(f"FinetuneConfig: lmbd must be in [0, 1] and sigma finite, got {self.lmbd}, {self.sigma}")
        for name in ("epochs", "batch_size", "grad_accum", "patience", "norm_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FinetuneConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("max_steps", "warmup_steps", "checkpoint_every", "num_workers", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"FinetuneConfig.{name} must be an integer >= 0, got {value!r}")
        if not 0.0 <= self.label_smoothing < 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("FinetuneConfig: label_smoothing and ema_decay must be in [0, 1)")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"FinetuneConfig.crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if not 0.0 <= self.hflip <= 1.0 or not 0.0 <= self.re_prob <= 1.0 or self.color_jitter < 0:
            raise ValueError("FinetuneConfig: hflip and re_prob must be in [0, 1], color_jitter >= 0")

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["adapter"]["targets"] = list(self.adapter.targets)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"FinetuneConfig: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass
class FinetuneResult:
    """What `fit_backbone` wrote (all under `out_dir`) and how it went; also `result.json`."""

    out_dir: str
    fingerprint: str
    metrics: dict[str, float]  # val metrics of the selected weights, at threshold 0.5
    best_step: int
    best_epoch: int
    steps: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]]
    seconds: float
    images_per_second: float  # training images per second, all processes together
    trainable_parameters: int
    resumed_from: int | None  # step of the checkpoint this run resumed from
    num_processes: int
    val_predictions: dict[str, list] = field(default_factory=dict)  # sample_ids, labels, p_roadwork

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FinetuneResult:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


# ---------------------------------------------------------------------------------------------------
# data


def _next_step_batches(batches, *, dataset: ImageDataset, grad_accum: int, device: torch.device) -> list:
    """The `grad_accum` micro-batches of the next optimizer step, on the device."""
    chunk = []
    for _ in range(grad_accum):
        _idx, images, labels, failed = next(batches)
        if failed:
            log.warning("skipping train images that cannot be decoded: %s", describe_failures(dataset, failed)[:3])
        if images is None:
            raise DataError(f"a whole train micro-batch failed to decode: {describe_failures(dataset, failed)[:3]}")
        chunk.append((images.to(device, non_blocking=True), labels.to(device, non_blocking=True)))
    return chunk


def _check_samples(name: str, samples: Sequence[Sample]) -> None:
    if not samples:
        raise DataError(f"fit_backbone: the {name} split is empty")
    labels = {s.label for s in samples}
    if labels != {0, 1}:
        raise DataError(f"fit_backbone: the {name} split needs both classes, has labels {sorted(labels)}")


def _step_counts(n_train: int, config: FinetuneConfig, world: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps of the run)."""
    steps_per_epoch = n_train // (config.batch_size * world) // config.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"fit_backbone: {n_train} train images do not fill one optimizer step of "
            f"batch_size {config.batch_size} x {world} processes x grad_accum {config.grad_accum}; "
            "lower batch_size or grad_accum"
        )
    total_steps = config.epochs * steps_per_epoch
    return steps_per_epoch, min(total_steps, config.max_steps) if config.max_steps else total_steps


def run_fingerprint(train_samples: Sequence[Sample], val_samples: Sequence[Sample], *, backbone: BackboneSpec,
                    head: HeadConfig, config: FinetuneConfig, num_processes: int) -> str:
    """Identifies a run: the same value means the same weights (and a checkpoint that may be resumed)."""
    rows = lambda samples: sorted([s.sample_id, s.label] for s in samples)
    return fingerprint("finetune", backbone.fingerprint, head, config.to_json(), rows(train_samples),
                       rows(val_samples), num_processes)


# ---------------------------------------------------------------------------------------------------
# training


def _build_model(backbone: BackboneSpec, head: HeadConfig, config: FinetuneConfig, train_samples: Sequence[Sample],
                 accelerator) -> tuple[AdaptedClassifier, dict[str, Any]]:
    """Backbone + adapters (which start as an exact no-op) + head, on the device, with the head's input
    standardisation set and every adapter checked to train; and the eval preprocessing spec."""
    from accelerate.utils import set_seed

    base = build_backbone(backbone, verify=False)
    pre = preprocessing_spec(base, backbone, FeatureConfig(precision=config.precision))
    peft_model = apply_adapters(base, config.adapter)
    set_seed(config.seed)
    model = AdaptedClassifier(peft_model, build_head(head, feature_dim(base, backbone.pooling)), backbone.pooling)
    model.to(accelerator.device)
    example = set_head_norm(model, ImageDataset(train_samples, eval_transform(pre), draft_size(pre)),
                            n=config.norm_samples, batch_size=config.batch_size, num_workers=config.num_workers,
                            accelerator=accelerator)
    # guard against silent bypass: every adapter must be called and receive gradient
    check_adapter_gradients(peft_model, example.to(accelerator.device))
    return model, pre


def _make_optimizer(model: AdaptedClassifier, config: FinetuneConfig, *, total_steps: int):
    """F-SAM or AdamW over the trainable tensors, and its cosine schedule with warmup."""
    optimizer = make_optimizer(
        param_groups(model, lr=config.lr, head_lr=config.head_lr, weight_decay=config.weight_decay),
        kind=config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
        **({"rho": config.rho, "sigma": config.sigma, "lmbd": config.lmbd} if config.optimizer == "fsam" else {}),
    )
    return optimizer, cosine_schedule(optimizer, total_steps=total_steps, warmup_steps=config.warmup_steps,
                                      min_lr=config.min_lr)


def _finished_result(out_dir: Path, run_fp: str) -> FinetuneResult | None:
    """The result of this run if `out_dir` holds it; another run's result is refused."""
    if not (out_dir / RESULT).is_file():
        return None
    done = FinetuneResult.from_json(json.loads((out_dir / RESULT).read_text()))
    if done.fingerprint == run_fp:
        log.info("%s already holds the finished run %s", out_dir, run_fp[:12])
        return done
    raise ValueError(f"{out_dir} holds the result of another run ({done.fingerprint[:12]}, this run is "
                     f"{run_fp[:12]}); choose an empty output directory")


def fit_backbone(
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    *,
    backbone: BackboneSpec,
    head: HeadConfig,
    config: FinetuneConfig,
    out_dir: str | Path,
    log_fn: LogFn = no_log,
    after_step: Callable[[int], None] | None = None,
) -> FinetuneResult:
    """Fine-tune adapters on the backbone plus a head on images; write the outputs under `out_dir`.

    Outputs: adapter.safetensors + adapter.json (peft adapter weights, AdapterConfig, backbone spec),
    head.safetensors + head.json (the format of `stage1core.train.save_head`), preprocessing.json (eval
    preprocessing, bundle-ready), result.json (written last; `FinetuneResult`). The selected weights are
    the (EMA) weights of the best eligible evaluation (`loop.EarlyStopping` on the val Brier score). If
    `out_dir` holds a complete checkpoint of the same run (same `run_fingerprint`) training resumes from
    it; if it holds a finished result, that is returned. `after_step(step)` runs after every optimizer
    step and its checkpoint (tests stop the run there). Call it in every process of a launch; only the
    main process writes outputs.
    """
    # Longer than the other functions here on purpose: it is the one explicit training loop (as in
    # nanoGPT's train.py), read top to bottom; the order of its steps (what draws from the RNG, when the
    # EMA, the schedule and a checkpoint see the step) is what makes a resumed run bitwise identical.
    from accelerate import Accelerator

    _check_samples("train", train_samples)
    _check_samples("val", val_samples)
    out_dir = Path(out_dir)
    accelerator = Accelerator(
        mixed_precision="bf16" if config.precision == "bf16" else "no", gradient_accumulation_steps=1,
    )
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    train_samples = sorted(train_samples, key=lambda s: s.sample_id)
    val_samples = sorted(val_samples, key=lambda s: s.sample_id)
    run_fp = run_fingerprint(train_samples, val_samples, backbone=backbone, head=head, config=config,
                             num_processes=world)
    finished = _finished_result(out_dir, run_fp)
    if finished is not None:
        return finished

    model, pre = _build_model(backbone, head, config, train_samples, accelerator)
    draft = draft_size(pre)
    augment = train_transform(pre, crop_scale_min=config.crop_scale_min, hflip=config.hflip,
                              color_jitter=config.color_jitter, auto_augment=config.auto_augment,
                              re_prob=config.re_prob)
    train_set = ImageDataset(train_samples, augment, draft, config.seed)
    val_set = ImageDataset(val_samples, eval_transform(pre), draft)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    keys = trainable_keys(model)
    steps_per_epoch, total_steps = _step_counts(len(train_samples), config, world)
    optimizer, scheduler = _make_optimizer(model, config, total_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    forward_model = torch.compile(model) if config.compile else model
    ema = weight_ema(unwrapped, decay=config.ema_decay, warmup=config.ema_warmup)
    train_weights = (class_weights_from_labels([s.label for s in train_samples]).to(device)
                     if config.class_weighting else None)
    val_weights = class_weights_from_labels([s.label for s in val_samples])

    def batch_fn(_model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        outputs = forward_model(images, return_all=head.kind == "selective")
        return finetune_loss(outputs, labels, head=head, class_weights=train_weights,
                             label_smoothing=config.label_smoothing)

    run = RunProgress(run_fp, EarlyStopping(patience=config.patience, warmup_steps=config.warmup_steps))
    resumed = resume_run(run, out_dir, accelerator=accelerator, ema=ema, keys=keys)
    scheduler.step_update(run.step)
    if accelerator.is_main_process:
        if resumed is not None:
            log.info("resumed from %s (step %d of %d)", resumed, run.step, total_steps)
        log.info("fine-tuning %s with %s (%d trainable parameters), %s, %d processes, %d steps of %d images "
                 "(%d steps per epoch), precision %s", backbone.name, config.adapter.method, trainable,
                 config.optimizer, world, total_steps, config.batch_size * world * config.grad_accum,
                 steps_per_epoch, config.precision)

    step_fn = fsam_training_step if config.optimizer == "fsam" else adamw_training_step
    started = time.perf_counter()
    while run.step < total_steps and not run.stopping.stopped:
        micro = epoch_batches(len(train_samples), run.epoch, seed=config.seed, batch_size=config.batch_size,
                              rank=rank, world=world, count=steps_per_epoch * config.grad_accum)
        batches = iter(image_loader(train_set, micro[run.position * config.grad_accum:],
                                    num_workers=config.num_workers, device=device))
        while run.position < steps_per_epoch and run.step < total_steps:
            tick = time.perf_counter()
            chunk = _next_step_batches(batches, dataset=train_set, grad_accum=config.grad_accum, device=device)
            model.train()
            loss = step_fn(model, batch_fn, optimizer, micro_batches=chunk, accelerator=accelerator,
                           max_grad_norm=config.max_grad_norm or None)
            run.step += 1
            run.position += 1
            scheduler.step_update(run.step)
            if ema is not None:
                ema.update(unwrapped, step=run.step)
            run.images_seen += sum(len(y) for _, y in chunk) * world
            run.train_seconds += time.perf_counter() - tick

            epoch_ended = run.position == steps_per_epoch
            if epoch_ended or run.step == total_steps:
                judged = judged_model(unwrapped, ema)
                metrics, val_p = evaluate(judged, val_set, head=head, class_weights=val_weights,
                                          batch_size=config.batch_size, num_workers=config.num_workers,
                                          accelerator=accelerator)
                row = {"epoch": run.epoch, "step": run.step, "train_loss": loss, **metrics,
                       "lr": optimizer.param_groups[0]["lr"]}
                _record_evaluation(run, row, val_p, judged, keys=keys, last=run.step == total_steps,
                                   main=accelerator.is_main_process, log_fn=log_fn)
                if epoch_ended:
                    run.epoch, run.position = run.epoch + 1, 0
            if (config.checkpoint_every and run.step % config.checkpoint_every == 0 and run.step < total_steps
                    and not run.stopping.stopped):
                _checkpoint(run, out_dir, accelerator=accelerator, ema=ema, keys=keys, total_steps=total_steps)
            if after_step is not None:
                after_step(run.step)
            if run.stopping.stopped or epoch_ended:
                break
        del batches

    return _finish(run, out_dir, unwrapped, keys=keys, accelerator=accelerator, backbone=backbone, head=head,
                   config=config, pre=pre, val_samples=val_samples, trainable=trainable,
                   seconds=time.perf_counter() - started)


def _record_evaluation(run: RunProgress, row: dict[str, float], val_p: np.ndarray, judged: nn.Module, *,
                       keys: Sequence[str], last: bool, main: bool, log_fn: LogFn) -> None:
    """Log an evaluation, and keep the judged weights when the selection rule calls them the best."""
    run.history.append(row)
    shown = {k: v for k, v in row.items() if k not in ("epoch", "step")}
    if main:
        log_fn(shown, run.step)
        log.info("epoch %d step %d: %s", run.epoch, run.step, ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    if run.stopping.update(row["val_brier"], step=run.step, epoch=run.epoch, last=last):
        run.best_state = copy_weights(judged, keys)
        run.best_val_p = val_p.tolist()
    elif run.stopping.stopped and main:
        log.info("early stop at epoch %d (best step %d, val_brier %.4f)", run.epoch, run.stopping.best_step,
                 run.stopping.best_score)


def _checkpoint(run: RunProgress, out_dir: Path, *, accelerator, ema, keys: Sequence[str], total_steps: int) -> None:
    save_checkpoint(out_dir, run.step, accelerator=accelerator,
                    trainer_state=run.to_json(total_steps=total_steps, world=accelerator.num_processes,
                                              ema=ema is not None),
                    ema_weights=copy_weights(ema.module, keys) if ema is not None and accelerator.is_main_process
                    else None,
                    best_weights=run.best_state)


def _finish(run: RunProgress, out_dir: Path, unwrapped: AdaptedClassifier, *, keys: Sequence[str], accelerator,
            backbone: BackboneSpec, head: HeadConfig, config: FinetuneConfig, pre: dict[str, Any],
            val_samples: Sequence[Sample], trainable: int, seconds: float) -> FinetuneResult:
    """The run's result; the main process writes the outputs with the selected weights, the others
    read its result.json."""
    result = FinetuneResult(
        out_dir=str(out_dir), fingerprint=run.fingerprint, metrics={}, best_step=run.stopping.best_step,
        best_epoch=run.stopping.best_epoch, steps=run.step, epochs_run=len(run.history),
        stopped_early=run.stopping.stopped, history=run.history, seconds=seconds,
        images_per_second=run.images_seen / run.train_seconds if run.train_seconds > 0 else 0.0,
        trainable_parameters=trainable, resumed_from=run.resumed_from, num_processes=accelerator.num_processes,
    )
    if accelerator.is_main_process:
        final = copy.deepcopy(unwrapped).to("cpu")
        load_weights(final, run.best_state or {}, keys, "best weights")
        best_row = next(r for r in run.history if r["step"] == run.stopping.best_step)
        result.metrics = {k: v for k, v in best_row.items() if k.startswith("val_")}
        result.val_predictions = {"sample_ids": [s.sample_id for s in val_samples],
                                  "labels": [s.label for s in val_samples], "p_roadwork": run.best_val_p}
        _write_outputs(out_dir, final, backbone=backbone, head=head, config=config, pre=pre, result=result)
        if not config.keep_checkpoints:
            shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
        log.info("fine-tuning done: best step %d, %s; outputs in %s", run.stopping.best_step,
                 ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()), out_dir)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    if not accelerator.is_main_process:
        result = FinetuneResult.from_json(json.loads((out_dir / RESULT).read_text()))
    return result


def _write_outputs(out_dir: Path, final: AdaptedClassifier, *, backbone: BackboneSpec, head: HeadConfig,
                   config: FinetuneConfig, pre: dict[str, Any], result: FinetuneResult) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_adapters(out_dir, final.backbone, {
        "adapter": config.to_json()["adapter"], "backbone": backbone.to_json(),
        "backbone_fingerprint": backbone.fingerprint, "pooling": backbone.pooling,
        "run_fingerprint": result.fingerprint,
    })
    # the head in save_head's format, written through its own atomic directory, then moved in
    staging = out_dir / ".head"
    # kind: the concrete kind build_head made ("auto" means mlp), which load_head rebuilds
    trained = TrainedHead(model=final.head.eval(), head=head, in_dim=int(final.head.norm.mean.numel()),
                          history=result.history, best_epoch=result.best_epoch,
                          kind=head.kinds(selection=False)[0])
    save_head(staging, trained, extra={"fingerprint": result.fingerprint, "finetune": config.to_json(),
                                       "backbone_fingerprint": backbone.fingerprint})
    for name in (HEAD_WEIGHTS, HEAD_META):
        os.replace(staging / name, out_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
    atomic_write_json(out_dir / PREPROCESSING, {**pre, "precision": config.precision})
    atomic_write_json(out_dir / RESULT, result.to_json())  # last: marks the directory complete


# ---------------------------------------------------------------------------------------------------
# entry point for `accelerate launch` and single-device subprocesses


def write_launch_config(path: str | Path, *, backbone: BackboneConfig | BackboneSpec, head: HeadConfig,
                        config: FinetuneConfig, split_manifest: str | Path | None = None,
                        train_samples: Sequence[Sample] | None = None,
                        val_samples: Sequence[Sample] | None = None) -> Path:
    """The JSON file `python -m stage1core.finetune --config` reads. Data: a split manifest (its train
    and val splits) or explicit sample lists."""
    if (split_manifest is None) == (train_samples is None):
        raise ValueError("write_launch_config: pass split_manifest or train_samples/val_samples")
    spec = backbone if isinstance(backbone, BackboneSpec) else resolve_backbone(backbone)
    data: dict[str, Any] = {"backbone": spec.to_json(), "head": dataclasses.asdict(head), "finetune": config.to_json()}
    if split_manifest is not None:
        data["split_manifest"] = str(Path(split_manifest).absolute())
    else:
        data["train_samples"] = [dataclasses.asdict(s) for s in train_samples]
        data["val_samples"] = [dataclasses.asdict(s) for s in val_samples or ()]
    return atomic_write_json(path, data)


def read_launch_config(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if "split_manifest" in data:
        from .splits import read_split_manifest

        _, parts, _ = read_split_manifest(data["split_manifest"])
        train, val = parts["train"], parts["val"]
    else:
        train = [Sample(**s) for s in data["train_samples"]]
        val = [Sample(**s) for s in data["val_samples"]]
    return {"backbone": BackboneSpec.from_json(data["backbone"]), "head": HeadConfig(**data["head"]),
            "config": FinetuneConfig.from_json(data["finetune"]), "train": train, "val": val}


def _print_metrics(metrics: dict[str, float], step: int) -> None:
    print(METRICS_PREFIX + json.dumps({"step": step, **metrics}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stage1core.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="launch JSON written by write_launch_config")
    parser.add_argument("--out", required=True, help="output directory (resumes from its checkpoints)")
    parser.add_argument("--kill-at-step", type=int, default=None,
                        help="test hook: SIGKILL this process after optimizer step N (and its checkpoint)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loaded = read_launch_config(args.config)

    def kill_hook(step: int) -> None:
        if step == args.kill_at_step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    result = fit_backbone(
        loaded["train"], loaded["val"], backbone=loaded["backbone"], head=loaded["head"], config=loaded["config"],
        out_dir=args.out, log_fn=_print_metrics, after_step=kill_hook if args.kill_at_step else None,
    )
    print(f"stage1-result {Path(args.out) / RESULT} best_step={result.best_step}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
