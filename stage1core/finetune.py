"""Backbone fine-tuning on images: DoRA/LoRA adapters and a head, one explicit loop on Accelerate.

The feature cache cannot serve this path: every step decodes images, augments them (timm's train
transforms with the backbone's data config) and runs the adapted backbone. The loop mirrors
`stage1core.train.fit_head`: the same loss per head kind (class-weighted CE with label smoothing, or
for the selective head the SelectiveNet loss over its cls, gate and aux outputs, in training and in
the val loss that early stopping reads; `finetune_loss`), timm's cosine schedule with warmup stepped per
optimizer step, timm's ModelEmaV3 with warmup, early stopping on the val split, selection of the best
(EMA) weights. The optimizer is F-SAM (`stage1core.peft`) or plain AdamW.

Exact resume. Everything random is a pure function of the seed or is checkpointed: the sample order
of epoch e is a permutation seeded by (seed, e); the augmentation of sample i in epoch e runs under
an RNG seeded by (seed, e, i), whatever process or DataLoader worker decodes it; dropout draws from
the global RNG, which `accelerator.save_state` stores and `load_state` restores. A checkpoint (every
`checkpoint_every` optimizer steps) holds Accelerate's state (model, optimizer with the F-SAM EMA,
RNG), the EMA and best weights (trainable tensors only), and `trainer_state.json`, written last, which
marks the checkpoint complete. A run started again on the same output directory resumes from the
newest complete checkpoint and, on CPU with a fixed seed, ends with bitwise the same weights as a run
that was never interrupted.

Gradient accumulation is done here, not by Accelerate: one optimizer step takes `grad_accum`
micro-batches (F-SAM needs both of its passes over the same micro-batches), so the Accelerator is
created with gradient_accumulation_steps=1, as `fsam_training_step` requires.

Entry point for `accelerate launch` (and for a plain subprocess on one device):
    python -m stage1core.finetune --config launch.json --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .backbone import BackboneConfig, BackboneSpec, build_backbone, embed, feature_dim, resolve_backbone
from .config import describe_fields
from .features import FeatureConfig, draft_size, eval_transform, preprocessing_spec
from .fingerprint import fingerprint
from .heads import HeadConfig, build_head, positive_probability
from .images import ImageDecodeError, decode_image
from .losses import class_weighted_ce, class_weights_from_labels, selectivenet_loss
from .metrics import binary_metrics
from .peft import (
    AdapterConfig,
    adapter_state_dict,
    apply_adapters,
    check_adapter_gradients,
    fsam_training_step,
    load_adapter_state_dict,
    make_optimizer,
    merge_adapters,
)
from .sources import DataError, Sample, read_bytes
from .storage import atomic_write_bytes, atomic_write_json
from .train import HEAD_META, HEAD_WEIGHTS, TrainedHead, save_head

log = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]

PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("fsam", "adamw")
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"
MERGED_BACKBONE = "backbone.safetensors"
PREPROCESSING = "preprocessing.json"
RESULT = "result.json"
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
EMA_WEIGHTS = "ema.safetensors"
BEST_WEIGHTS = "best.safetensors"
METRICS_PREFIX = "stage1-metrics "  # stdout lines the launching task can parse


def _no_log(metrics: dict[str, float], step: int) -> None:
    return None


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
    # stop after this many evaluations (one per epoch) without a better val loss
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
# model


class AdaptedClassifier(nn.Module):
    """Backbone with adapters (a peft model), pooled as configured, then the head.

    The pooled features pass through fp16 before the head, as in the feature store and the bundle's
    Predictor, so a bundle reproduces the training-time outputs (a head standardises by the features'
    std, and near-constant feature dimensions turn fp16 rounding into large input changes). The
    rounding is straight-through: its gradient is the identity.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, pooling: str):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pooling = pooling

    def features(self, images: torch.Tensor) -> torch.Tensor:
        feats = embed(self.backbone.get_base_model(), images, self.pooling).float()
        return feats + (feats.half().float() - feats).detach()

    def forward(self, images: torch.Tensor, return_all: bool = False):
        """Class logits; with `return_all` (selective head only) its (cls, gate, aux) outputs. A keyword,
        not a second method, so a DDP-wrapped model still syncs gradients."""
        if return_all:
            return self.head(self.features(images), return_all=True)
        return self.head(self.features(images))


def finetune_loss(outputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor, *, head: HeadConfig,
                  class_weights: torch.Tensor | None, label_smoothing: float = 0.0) -> torch.Tensor:
    """The loss `fit_head` trains each head kind with (`stage1core.train.head_loss`), on the outputs of
    `AdaptedClassifier(images, return_all=head.kind == "selective")`, computed in fp32: for the selective
    head the SelectiveNet loss with the head's target coverage, lambda and alpha, which trains the cls,
    gate and aux heads together (plain CE on the class logits would leave gate and aux at their random
    init); for the others class-weighted CE with label smoothing."""
    if head.kind == "selective":
        cls, gate, aux = (t.float() for t in outputs)
        loss, _ = selectivenet_loss(cls, gate, aux, labels, coverage=head.target_coverage, lam=head.coverage_lambda,
                                    alpha=head.selective_alpha, class_weights=class_weights)
        return loss
    return class_weighted_ce(outputs.float(), labels, class_weights=class_weights, label_smoothing=label_smoothing)


def _trainable_keys(model: nn.Module) -> list[str]:
    """State-dict keys that training changes: adapter and head parameters, and the head's buffers."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return sorted(k for k in model.state_dict() if k in names or k.startswith("head."))


def _subset_state(model: nn.Module, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k: state[k].detach().to("cpu", copy=True).contiguous() for k in keys}


def _load_subset(model: nn.Module, state: dict[str, torch.Tensor], keys: Sequence[str], where: str) -> None:
    missing = sorted(set(keys) - set(state))
    if missing:
        raise ValueError(f"{where}: missing tensors {missing[:5]}; the checkpoint is from another configuration")
    model.load_state_dict({k: state[k] for k in keys}, strict=False)


def _param_groups(model: AdaptedClassifier, config: FinetuneConfig) -> list[dict[str, Any]]:
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "head" if name.startswith("head.") else "adapter"
        # DoRA magnitudes and biases are not shrunk toward zero
        decay = param.ndim >= 2 and "lora_magnitude" not in name
        groups.setdefault((part, decay), []).append(param)
    return [
        {"params": params, "lr": config.head_lr if part == "head" else config.lr,
         "weight_decay": config.weight_decay if decay else 0.0}
        for (part, decay), params in sorted(groups.items())
    ]


# ---------------------------------------------------------------------------------------------------
# data


def _derived_seed(*parts: Any) -> int:
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@contextlib.contextmanager
def _seeded_rng(seed: int) -> Iterator[None]:
    """Run a block under Python's and torch's CPU RNG seeded by `seed`; restore both afterwards."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def train_transform(pre: dict[str, Any], config: FinetuneConfig):
    """timm's training transform for the backbone's data config (input size, mean/std, interpolation)."""
    from timm.data import create_transform

    return create_transform(
        input_size=tuple(pre["input_size"]), is_training=True, scale=(config.crop_scale_min, 1.0),
        hflip=config.hflip, color_jitter=config.color_jitter, auto_augment=config.auto_augment,
        interpolation=pre["interpolation"], mean=tuple(pre["mean"]), std=tuple(pre["std"]),
        re_prob=config.re_prob,
    )


class _ImageDataset(Dataset):
    """Keys are (epoch, index) for training (augmentation seeded by both) or index for evaluation."""

    def __init__(self, samples: Sequence[Sample], transform, draft: int | None, seed: int):
        self.samples = list(samples)
        self.transform = transform
        self.draft = draft
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (None, key)
        sample = self.samples[i]
        try:
            image = decode_image(read_bytes(sample.locator), draft_size=self.draft)
        except (ImageDecodeError, DataError, OSError) as exc:
            return i, None, sample.label, f"{sample.locator}: {exc}"
        if epoch is None:
            return i, self.transform(image), sample.label, ""
        with _seeded_rng(_derived_seed("augment", self.seed, epoch, i)):
            return i, self.transform(image), sample.label, ""


def _collate(batch):
    ok = [(i, x, y) for i, x, y, err in batch if x is not None]
    failed = [err for _i, x, _y, err in batch if x is None]
    if not ok:
        return [], None, None, failed
    return ([i for i, _, _ in ok], torch.stack([x for _, x, _ in ok]),
            torch.tensor([y for _, _, y in ok], dtype=torch.long), failed)


def _loader(dataset: Dataset, batches: list[list[Any]], config: FinetuneConfig, device: torch.device) -> DataLoader:
    # a private generator: creating the iterator must not draw from the global RNG (dropout's)
    return DataLoader(
        dataset, batch_sampler=batches, num_workers=config.num_workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0),
        prefetch_factor=2 if config.num_workers else None, persistent_workers=False,
    )


def _epoch_micro_batches(n: int, epoch: int, *, seed: int, batch_size: int, rank: int, world: int,
                         count: int) -> list[list[tuple[int, int]]]:
    """This process's first `count` micro-batches of epoch `epoch`, as (epoch, index) keys."""
    generator = torch.Generator().manual_seed(_derived_seed("order", seed, epoch))
    order = torch.randperm(n, generator=generator).tolist()
    out = []
    for j in range(count):
        start = j * batch_size * world + rank * batch_size
        out.append([(epoch, i) for i in order[start:start + batch_size]])
    return out


def _check_samples(name: str, samples: Sequence[Sample]) -> None:
    if not samples:
        raise DataError(f"fit_backbone: the {name} split is empty")
    labels = {s.label for s in samples}
    if labels != {0, 1}:
        raise DataError(f"fit_backbone: the {name} split needs both classes, has labels {sorted(labels)}")


def run_fingerprint(train_samples: Sequence[Sample], val_samples: Sequence[Sample], *, backbone: BackboneSpec,
                    head: HeadConfig, config: FinetuneConfig, num_processes: int) -> str:
    """Identifies a run: the same value means the same weights (and a checkpoint that may be resumed)."""
    rows = lambda samples: sorted([s.sample_id, s.label] for s in samples)
    return fingerprint("finetune", backbone.fingerprint, head, config.to_json(), rows(train_samples),
                       rows(val_samples), num_processes)


# ---------------------------------------------------------------------------------------------------
# steps


def _adamw_step(model: nn.Module, batch_fn, optimizer, *, micro_batches: Sequence[Any], accelerator,
                max_grad_norm: float | None) -> float:
    """One optimizer step over `micro_batches` (gradient of the mean loss; DDP syncs on the last one)."""
    count = len(micro_batches)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for index, batch in enumerate(micro_batches):
        context = accelerator.no_sync(model) if index < count - 1 else nullcontext()
        with context:
            with accelerator.autocast():
                loss = batch_fn(model, batch) / count
            accelerator.backward(loss)
        total += float(loss.detach())
    if max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def _predict(module: nn.Module, dataset: _ImageDataset, indices: list[int], config: FinetuneConfig,
             accelerator, *, selective: bool = False) -> tuple[list[int], list[list[float]]]:
    """(indices, output rows) for `indices`, evaluated on this process. A row is the 2 class logits, or
    for a selective head cls logits (2), gate logit (1) and aux logits (2)."""
    module.eval()
    device = accelerator.device
    batches = [indices[s:s + config.batch_size] for s in range(0, len(indices), config.batch_size)]
    out_idx: list[int] = []
    out_rows: list[list[float]] = []
    for idx, images, _labels, failed in _loader(dataset, batches, config, device):
        if failed:
            raise DataError(f"validation images that cannot be decoded: {failed[:3]}")
        with accelerator.autocast():
            outputs = module(images.to(device, non_blocking=True), return_all=selective)
        if selective:
            cls, gate, aux = outputs
            outputs = torch.cat([cls.float(), gate.float()[:, None], aux.float()], dim=1)
        out_idx.extend(idx)
        out_rows.extend(outputs.float().cpu().tolist())
    return out_idx, out_rows


def _evaluate(module: nn.Module, dataset: _ImageDataset, config: FinetuneConfig, accelerator,
              val_weights: torch.Tensor, head: HeadConfig) -> tuple[dict[str, float], np.ndarray]:
    """Val loss (the training loss of the head kind, class-weighted by the val split, no label smoothing,
    as in fit_head) and metrics over the whole val split (sharded over processes, then gathered)."""
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    selective = head.kind == "selective"
    idx, rows = _predict(module, dataset, list(range(rank, len(dataset), world)), config, accelerator,
                         selective=selective)
    pairs = gather_object(list(zip(idx, rows, strict=True))) if world > 1 else list(zip(idx, rows, strict=True))
    pairs = sorted(pairs, key=lambda pair: pair[0])
    outputs = torch.tensor([pair[1] for pair in pairs], dtype=torch.float32)
    labels = torch.tensor([dataset.samples[pair[0]].label for pair in pairs], dtype=torch.long)
    all_logits = outputs[:, :2]
    heads_out = (outputs[:, :2], outputs[:, 2], outputs[:, 3:5]) if selective else all_logits
    loss = float(finetune_loss(heads_out, labels, head=head, class_weights=val_weights))
    p = positive_probability(all_logits).double().numpy()
    full = binary_metrics(labels.numpy(), p, threshold=0.5)
    metrics = {"val_loss": loss, **{f"val_{k}": float(full[k]) for k in ("accuracy", "mcc", "auroc", "fnr", "fpr")}}
    return metrics, p


# ---------------------------------------------------------------------------------------------------
# checkpoints


def _checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints (trainer_state.json present), oldest first."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / TRAINER_STATE).is_file())


def _save_checkpoint(out_dir: Path, step: int, *, accelerator, ema, best_state, trainer_state: dict[str, Any],
                     keys: Sequence[str]) -> Path:
    """Accelerate's state + EMA/best weights + trainer_state.json (last: marks it complete)."""
    from safetensors.torch import save_file

    final = out_dir / CHECKPOINTS / f"step-{step:08d}"
    tmp = out_dir / CHECKPOINTS / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        if ema is not None:
            save_file(_subset_state(ema.module, keys), str(tmp / EMA_WEIGHTS))
        if best_state is not None:
            save_file(best_state, str(tmp / BEST_WEIGHTS))
        atomic_write_json(tmp / TRAINER_STATE, trainer_state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoint_dirs(out_dir)[:-1]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------------
# training


def fit_backbone(
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    *,
    backbone: BackboneSpec,
    head: HeadConfig,
    config: FinetuneConfig,
    out_dir: str | Path,
    log_fn: LogFn = _no_log,
    after_step: Callable[[int], None] | None = None,
) -> FinetuneResult:
    """Fine-tune adapters on the backbone plus a head on images; write the outputs under `out_dir`.

    Outputs: adapter.safetensors + adapter.json (peft adapter weights, AdapterConfig, backbone spec),
    head.safetensors + head.json (the format of `stage1core.train.save_head`), preprocessing.json (eval
    preprocessing, bundle-ready), result.json (written last; `FinetuneResult`). The selected weights are
    the best EMA (or live) weights by val loss. If `out_dir` holds a complete checkpoint of the same run
    (same `run_fingerprint`) training resumes from it; if it holds a finished result, that is returned.
    `after_step(step)` runs after every optimizer step and its checkpoint (tests stop the run there).
    Call it in every process of a launch; only the main process writes outputs.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from safetensors.torch import load_file
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    _check_samples("train", train_samples)
    _check_samples("val", val_samples)
    out_dir = Path(out_dir)
    accelerator = Accelerator(
        mixed_precision="bf16" if config.precision == "bf16" else "no", gradient_accumulation_steps=1,
    )
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    main = accelerator.is_main_process
    train_samples = sorted(train_samples, key=lambda s: s.sample_id)
    val_samples = sorted(val_samples, key=lambda s: s.sample_id)
    run_fp = run_fingerprint(train_samples, val_samples, backbone=backbone, head=head, config=config,
                             num_processes=world)
    if (out_dir / RESULT).is_file():
        done = FinetuneResult.from_json(json.loads((out_dir / RESULT).read_text()))
        if done.fingerprint == run_fp:
            log.info("%s already holds the finished run %s", out_dir, run_fp[:12])
            return done
        raise ValueError(f"{out_dir} holds the result of another run ({done.fingerprint[:12]}, this run is "
                         f"{run_fp[:12]}); choose an empty output directory")

    # model: backbone + adapters (the adapters start as an exact no-op) + head
    base = build_backbone(backbone, verify=False)
    pre = preprocessing_spec(base, backbone, FeatureConfig(precision=config.precision))
    peft_model = apply_adapters(base, config.adapter)
    set_seed(config.seed)
    eval_tf = eval_transform(pre)
    draft = draft_size(pre)
    train_set = _ImageDataset(train_samples, train_transform(pre, config), draft, config.seed)
    train_eval_set = _ImageDataset(train_samples, eval_tf, draft, config.seed)
    val_set = _ImageDataset(val_samples, eval_tf, draft, config.seed)

    model = AdaptedClassifier(peft_model, build_head(head, feature_dim(base, backbone.pooling)), backbone.pooling)
    model.to(device)
    # the head standardises its input with the initial features of (up to norm_samples) train images
    feats, example = [], None
    peft_model.eval()
    with torch.no_grad():
        norm_indices = list(range(min(config.norm_samples, len(train_samples))))
        batches = [norm_indices[s:s + config.batch_size] for s in range(0, len(norm_indices), config.batch_size)]
        for _idx, images, _labels, _failed in _loader(train_eval_set, batches, config, device):
            if images is not None:
                example = images[:2] if example is None else example
                with accelerator.autocast():
                    feats.append(model.features(images.to(device)).float())
    if not feats:
        raise DataError("fit_backbone: none of the first train images could be decoded")
    model.head.norm.set_stats(torch.cat(feats))
    del feats
    # guard against silent bypass: every adapter must be called and receive gradient
    check_adapter_gradients(peft_model, example.to(device))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    keys = _trainable_keys(model)

    micro_per_epoch = len(train_samples) // (config.batch_size * world)
    steps_per_epoch = micro_per_epoch // config.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"fit_backbone: {len(train_samples)} train images do not fill one optimizer step of "
            f"batch_size {config.batch_size} x {world} processes x grad_accum {config.grad_accum}; "
            "lower batch_size or grad_accum"
        )
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)

    optimizer = make_optimizer(
        _param_groups(model, config), kind=config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
        **({"rho": config.rho, "sigma": config.sigma, "lmbd": config.lmbd} if config.optimizer == "fsam" else {}),
    )
    scheduler = CosineLRScheduler(
        optimizer, t_initial=total_steps, lr_min=config.min_lr, warmup_t=config.warmup_steps,
        warmup_lr_init=config.min_lr, t_in_epochs=False,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    forward_model = torch.compile(model) if config.compile else model
    ema = (ModelEmaV3(unwrapped, decay=config.ema_decay, use_warmup=config.ema_warmup)
           if config.ema_decay > 0 else None)
    train_weights = (class_weights_from_labels([s.label for s in train_samples]).to(device)
                     if config.class_weighting else None)
    val_weights = class_weights_from_labels([s.label for s in val_samples])

    def batch_fn(_model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        outputs = forward_model(images, return_all=head.kind == "selective")
        return finetune_loss(outputs, labels, head=head, class_weights=train_weights,
                             label_smoothing=config.label_smoothing)

    # state, possibly from a checkpoint
    step, epoch, position = 0, 0, 0  # next optimizer step starts at micro-batch position*grad_accum of epoch
    history: list[dict[str, float]] = []
    best_loss, best_step, best_epoch, stale, stopped = float("inf"), -1, -1, 0, False
    best_state: dict[str, torch.Tensor] | None = None
    best_val_p: list[float] = []
    images_seen, train_seconds, resumed_from = 0, 0.0, None
    checkpoints = _checkpoint_dirs(out_dir)
    if checkpoints:
        latest = checkpoints[-1]
        state = json.loads((latest / TRAINER_STATE).read_text())
        if state["fingerprint"] != run_fp:
            raise ValueError(
                f"{latest} is a checkpoint of another run ({state['fingerprint'][:12]}; this run is "
                f"{run_fp[:12]}: config, data, backbone or process count differ); use another output directory"
            )
        accelerator.load_state(str(latest))  # model, optimizer (with the F-SAM EMA), RNG of every process
        if ema is not None:
            _load_subset(ema.module, load_file(str(latest / EMA_WEIGHTS)), keys, str(latest / EMA_WEIGHTS))
        if (latest / BEST_WEIGHTS).is_file():
            best_state = load_file(str(latest / BEST_WEIGHTS))
        step, epoch, position = state["step"], state["epoch"], state["position"]
        history, stale, stopped = state["history"], state["stale"], state["stopped"]
        best_loss = state["best_loss"] if state["best_loss"] is not None else float("inf")
        best_step, best_epoch, best_val_p = state["best_step"], state["best_epoch"], state["best_val_p"]
        images_seen, train_seconds = state["images_seen"], state["train_seconds"]
        resumed_from = step
        if main:
            log.info("resumed from %s (step %d of %d)", latest, step, total_steps)
    scheduler.step_update(step)
    if main:
        log.info(
            "fine-tuning %s with %s (%d trainable parameters), %s, %d processes, %d steps of %d images "
            "(%d steps per epoch), precision %s",
            backbone.name, config.adapter.method, trainable, config.optimizer, world, total_steps,
            config.batch_size * world * config.grad_accum, steps_per_epoch, config.precision,
        )

    def trainer_state() -> dict[str, Any]:
        return {
            "fingerprint": run_fp, "step": step, "epoch": epoch, "position": position, "history": history,
            "best_loss": best_loss if math.isfinite(best_loss) else None, "best_step": best_step,
            "best_epoch": best_epoch, "best_val_p": best_val_p, "stale": stale, "stopped": stopped,
            "images_seen": images_seen, "train_seconds": train_seconds, "total_steps": total_steps,
            "ema_updates": step if ema is not None else 0,
            # RNG of each process: random_states_<rank>.pkl written by accelerator.save_state
            "rng": f"random_states_<rank>.pkl for {world} processes",
        }

    started = time.perf_counter()
    while step < total_steps and not stopped:
        micro = _epoch_micro_batches(len(train_samples), epoch, seed=config.seed, batch_size=config.batch_size,
                                     rank=rank, world=world, count=steps_per_epoch * config.grad_accum)
        batches = iter(_loader(train_set, micro[position * config.grad_accum:], config, device))
        while position < steps_per_epoch and step < total_steps:
            tick = time.perf_counter()
            chunk = []
            for _ in range(config.grad_accum):
                _idx, images, labels, failed = next(batches)
                if failed:
                    log.warning("skipping train images that cannot be decoded: %s", failed[:3])
                if images is None:
                    raise DataError(f"a whole train micro-batch failed to decode: {failed[:3]}")
                chunk.append((images.to(device, non_blocking=True), labels.to(device, non_blocking=True)))
            model.train()
            clip = config.max_grad_norm or None
            if config.optimizer == "fsam":
                loss = fsam_training_step(model, batch_fn, optimizer, micro_batches=chunk, accelerator=accelerator,
                                          max_grad_norm=clip)
            else:
                loss = _adamw_step(model, batch_fn, optimizer, micro_batches=chunk, accelerator=accelerator,
                                   max_grad_norm=clip)
            step += 1
            position += 1
            scheduler.step_update(step)
            if ema is not None:
                ema.update(unwrapped, step=step)
            images_seen += sum(len(y) for _, y in chunk) * world
            train_seconds += time.perf_counter() - tick
            row_loss = loss

            epoch_ended = position == steps_per_epoch
            if epoch_ended or step == total_steps:
                judged = ema.module if ema is not None else unwrapped
                metrics, val_p = _evaluate(judged, val_set, config, accelerator, val_weights, head)
                row = {"epoch": epoch, "step": step, "train_loss": row_loss, **metrics,
                       "lr": optimizer.param_groups[0]["lr"]}
                history.append(row)
                if main:
                    log_fn({k: v for k, v in row.items() if k not in ("epoch", "step")}, step)
                    log.info("epoch %d step %d: %s", epoch, step,
                             ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in ("epoch", "step")))
                if metrics["val_loss"] < best_loss - 1e-6:
                    best_loss, best_step, best_epoch, stale = metrics["val_loss"], step, epoch, 0
                    best_state = _subset_state(judged, keys)
                    best_val_p = val_p.tolist()
                else:
                    stale += 1
                    if stale >= config.patience:
                        stopped = True
                        if main:
                            log.info("early stop at epoch %d (best step %d, val_loss %.4f)", epoch, best_step,
                                     best_loss)
                if epoch_ended:
                    epoch, position = epoch + 1, 0
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps and not stopped:
                _save_checkpoint(out_dir, step, accelerator=accelerator, ema=ema, best_state=best_state,
                                 trainer_state=trainer_state(), keys=keys)
            if after_step is not None:
                after_step(step)
            if stopped or epoch_ended:
                break
        del batches

    seconds = time.perf_counter() - started
    result = FinetuneResult(
        out_dir=str(out_dir), fingerprint=run_fp, metrics={}, best_step=best_step, best_epoch=best_epoch,
        steps=step, epochs_run=len(history), stopped_early=stopped, history=history, seconds=seconds,
        images_per_second=images_seen / train_seconds if train_seconds > 0 else 0.0,
        trainable_parameters=trainable, resumed_from=resumed_from, num_processes=world,
    )
    if main:
        final = copy.deepcopy(unwrapped).to("cpu")
        _load_subset(final, best_state, keys, "best weights")
        best_row = next(r for r in history if r["step"] == best_step)
        result.metrics = {k: v for k, v in best_row.items() if k.startswith("val_")}
        result.val_predictions = {"sample_ids": [s.sample_id for s in val_samples],
                                  "labels": [s.label for s in val_samples], "p_roadwork": best_val_p}
        _write_outputs(out_dir, final, backbone=backbone, head=head, config=config, pre=pre, result=result)
        if not config.keep_checkpoints:
            shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
        log.info("fine-tuning done: best step %d, %s; outputs in %s", best_step,
                 ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()), out_dir)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    if not main:
        result = FinetuneResult.from_json(json.loads((out_dir / RESULT).read_text()))
    return result


def _write_outputs(out_dir: Path, final: AdaptedClassifier, *, backbone: BackboneSpec, head: HeadConfig,
                   config: FinetuneConfig, pre: dict[str, Any], result: FinetuneResult) -> None:
    from safetensors.torch import save

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / ADAPTER_WEIGHTS, save(adapter_state_dict(final.backbone)))
    atomic_write_json(out_dir / ADAPTER_META, {
        "adapter": config.to_json()["adapter"], "backbone": backbone.to_json(),
        "backbone_fingerprint": backbone.fingerprint, "pooling": backbone.pooling,
        "run_fingerprint": result.fingerprint, "merged": False,
    })
    # the head in save_head's format, written through its own atomic directory, then moved in
    staging = out_dir / ".head"
    trained = TrainedHead(model=final.head.eval(), head=head, in_dim=int(final.head.norm.mean.numel()),
                          history=result.history, best_epoch=result.best_epoch)
    save_head(staging, trained, extra={"fingerprint": result.fingerprint, "finetune": config.to_json(),
                                       "backbone_fingerprint": backbone.fingerprint})
    for name in (HEAD_WEIGHTS, HEAD_META):
        os.replace(staging / name, out_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
    atomic_write_json(out_dir / PREPROCESSING, {**pre, "precision": config.precision})
    atomic_write_json(out_dir / RESULT, result.to_json())  # last: marks the directory complete


# ---------------------------------------------------------------------------------------------------
# bundles


def _read_adapter_meta(directory: Path) -> dict[str, Any]:
    path = directory / ADAPTER_META
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the adapter description ({exc})") from exc


def export_adapter_files(finetune_out_dir: str | Path, *, merge: bool) -> dict[str, bytes]:
    """Files to add to a bundle (`export_bundle(files=...)`) for a fine-tuned backbone.

    Unmerged: adapter.safetensors + adapter.json (AdapterConfig, backbone spec). Merged: the adapters
    folded into the backbone weights, backbone.safetensors (the full timm state dict) + adapter.json
    with "merged": true. The bundle's backbone.json still names the original weights, which the
    Predictor loads and verifies first.
    """
    from safetensors.torch import load_file, save

    directory = Path(finetune_out_dir)
    if not (directory / RESULT).is_file():
        raise ValueError(f"{directory}: not a finished fine-tuning run (no {RESULT})")
    meta = _read_adapter_meta(directory)
    weights = (directory / ADAPTER_WEIGHTS).read_bytes()
    if not merge:
        return {ADAPTER_WEIGHTS: weights, ADAPTER_META: _json_bytes(meta)}
    spec = BackboneSpec.from_json(meta["backbone"])
    model = apply_adapters(build_backbone(spec, verify=True), AdapterConfig(**meta["adapter"]))
    load_adapter_state_dict(model, load_file(str(directory / ADAPTER_WEIGHTS)))
    merged = merge_adapters(model)
    state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    return {MERGED_BACKBONE: save(state), ADAPTER_META: _json_bytes({**meta, "merged": True})}


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def attach_bundle_adapters(model: nn.Module, bundle_dir: str | Path, manifest: dict[str, Any], *,
                           merge: bool = False) -> nn.Module:
    """What the Predictor calls after building the backbone: apply a bundle's fine-tuning to `model`.

    A bundle without adapter.json is returned unchanged. With backbone.safetensors (merged export) the
    merged weights are loaded into `model`; with adapter.safetensors the adapters are applied and loaded
    (and folded in when `merge`, which is faster at inference and gives the same outputs). Returns the
    plain timm model (adapters live inside its modules), in eval mode, frozen, on `model`'s device.
    The files were hash-checked by `read_manifest`; the adapter's backbone must be the bundle's.
    """
    from safetensors.torch import load_file

    root = Path(bundle_dir)
    files = manifest["files"]
    if ADAPTER_META not in files:
        return model
    meta = _read_adapter_meta(root)
    if meta["backbone_fingerprint"] != manifest["backbone_fingerprint"]:
        raise ValueError(f"{root / ADAPTER_META}: adapters were trained on backbone "
                         f"{meta['backbone_fingerprint'][:12]}, the bundle's is "
                         f"{manifest['backbone_fingerprint'][:12]}")
    device = next(model.parameters()).device
    if MERGED_BACKBONE in files:
        model.load_state_dict(load_file(str(root / MERGED_BACKBONE), device=str(device)), strict=True)
        out = model
    elif ADAPTER_WEIGHTS in files:
        peft_model = apply_adapters(model, AdapterConfig(**meta["adapter"]))
        load_adapter_state_dict(peft_model, load_file(str(root / ADAPTER_WEIGHTS), device=str(device)))
        out = merge_adapters(peft_model) if merge else peft_model.get_base_model()
    else:
        raise ValueError(f"{root}: {ADAPTER_META} but neither {ADAPTER_WEIGHTS} nor {MERGED_BACKBONE}")
    out.eval()
    for param in out.parameters():
        param.requires_grad_(False)
    return out


def extract_adapted_features(samples: Sequence[Sample], finetune_out_dir: str | Path,
                             config: FeatureConfig = FeatureConfig(), *, store_root: str | Path | None = None,
                             progress: bool = False):
    """Features of the fine-tuned backbone (adapters merged) in the feature store, so that the shared
    pipeline (calibrate_threshold, evaluate_test, export_bundle) runs on them with the head of
    `finetune_out_dir` unchanged. The store key adds the adapter weights' sha256 to the frozen key; the
    store's `backbone` stays the original spec (what a bundle's backbone.json names). Features pass
    through fp16 as in training, so head outputs equal the training-time ones. Use
    `FeatureConfig(precision=<the run's precision>)`. Returns a `features.FeatureSetInfo`.
    """
    from safetensors.torch import load_file

    from .features import FeatureSetInfo, FeatureStore, _embed_into, feature_store_dir, store_key
    from .fingerprint import sha256_file

    directory = Path(finetune_out_dir)
    meta = _read_adapter_meta(directory)
    spec = BackboneSpec.from_json(meta["backbone"])
    peft_model = apply_adapters(build_backbone(spec, verify=True), AdapterConfig(**meta["adapter"]))
    load_adapter_state_dict(peft_model, load_file(str(directory / ADAPTER_WEIGHTS)))
    model = merge_adapters(peft_model).eval()
    pre = preprocessing_spec(model, spec, config)
    adapter_sha = sha256_file(directory / ADAPTER_WEIGHTS)
    key = fingerprint("adapted-feature-store", store_key(spec, pre, config.precision), adapter_sha)
    root = feature_store_dir(key, store_root)
    store = FeatureStore.create(root, {
        "format": 1, "store_key": key, "backbone": spec.to_json(), "preprocessing": pre,
        "precision": config.precision, "dim": feature_dim(model, spec.pooling), "adapter_sha256": adapter_sha,
        "adapter": meta["adapter"],
    })
    by_id = {s.sample_id: s for s in samples}
    ids = sorted(by_id)
    todo = [by_id[sid] for sid in store.missing(ids)]
    started = time.perf_counter()
    failed = _embed_into(store, model, todo, pre, spec.pooling, config, progress=progress) if todo else []
    seconds = time.perf_counter() - started
    failed_ids = {f["sample_id"] for f in failed}
    covered = [sid for sid in ids if sid not in failed_ids]
    return FeatureSetInfo(
        store_dir=str(root), store_key=key, dim=store.dim, fingerprint=fingerprint(key, covered),
        n_samples=len(covered), n_computed=len(todo) - len(failed), seconds=seconds,
        images_per_second=(len(todo) - len(failed)) / seconds if todo and seconds > 0 else 0.0, failed=failed,
    )


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
