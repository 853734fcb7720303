"""The model that fine-tuning trains, as one module: the backbone with adapters, pooling and the head
(`AdaptedClassifier`); its training loss per head kind; which of its tensors train; its evaluation on
a split of images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .backbone import embed
from .heads import HeadConfig, positive_probability
from .images import ImageDataset, collate_images
from .losses import class_weighted_ce, selectivenet_loss
from .metrics import binary_metrics
from .selection import balanced_brier
from .sources import DataError


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


def trainable_keys(model: nn.Module) -> list[str]:
    """State-dict keys that training changes: adapter and head parameters, and the head's buffers."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return sorted(k for k in model.state_dict() if k in names or k.startswith("head."))


def copy_weights(model: nn.Module, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors `keys` of `model`, copied to CPU (safetensors-ready)."""
    state = model.state_dict()
    return {k: state[k].detach().to("cpu", copy=True).contiguous() for k in keys}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], keys: Sequence[str], where: str) -> None:
    """Load the tensors `keys` from `state` (read from `where`) into `model`."""
    missing = sorted(set(keys) - set(state))
    if missing:
        raise ValueError(f"{where}: missing tensors {missing[:5]}; the checkpoint is from another configuration")
    model.load_state_dict({k: state[k] for k in keys}, strict=False)


def param_groups(model: AdaptedClassifier, *, lr: float, head_lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: adapters at `lr`, the head at `head_lr`; weight decay on matrices only."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "head" if name.startswith("head.") else "adapter"
        # DoRA magnitudes and biases are not shrunk toward zero
        decay = param.ndim >= 2 and "lora_magnitude" not in name
        groups.setdefault((part, decay), []).append(param)
    return [
        {"params": params, "lr": head_lr if part == "head" else lr, "weight_decay": weight_decay if decay else 0.0}
        for (part, decay), params in sorted(groups.items())
    ]


def image_loader(dataset: ImageDataset, batches: list[list[Any]], *, num_workers: int,
                 device: torch.device) -> DataLoader:
    """A DataLoader over `batches` (lists of dataset keys), in that order."""
    # a private generator: creating the iterator must not draw from the global RNG (dropout's)
    return DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_images,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0),
        prefetch_factor=2 if num_workers else None, persistent_workers=False,
    )


def describe_failures(dataset: ImageDataset, failed: list[tuple[int, str]]) -> list[str]:
    return [f"{dataset.samples[i].locator}: {reason}" for i, reason in failed]


def _batches(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[s:s + batch_size] for s in range(0, len(indices), batch_size)]


def set_head_norm(model: AdaptedClassifier, dataset: ImageDataset, *, n: int, batch_size: int, num_workers: int,
                  accelerator) -> torch.Tensor:
    """Standardise the head's input with the initial features of the first `n` images of `dataset`;
    returns two of those images (for `peft.check_adapter_gradients`)."""
    feats, example = [], None
    model.backbone.eval()
    with torch.no_grad():
        loader = image_loader(dataset, _batches(list(range(min(n, len(dataset)))), batch_size),
                              num_workers=num_workers, device=accelerator.device)
        for _idx, images, _labels, _failed in loader:
            if images is not None:
                example = images[:2] if example is None else example
                with accelerator.autocast():
                    feats.append(model.features(images.to(accelerator.device)).float())
    if not feats:
        raise DataError("fit_backbone: none of the first train images could be decoded")
    model.head.norm.set_stats(torch.cat(feats))
    return example


@torch.no_grad()
def _predict(module: nn.Module, dataset: ImageDataset, indices: list[int], *, batch_size: int, num_workers: int,
             accelerator, selective: bool = False) -> tuple[list[int], list[list[float]]]:
    """(indices, output rows) for `indices`, evaluated on this process. A row is the 2 class logits, or
    for a selective head cls logits (2), gate logit (1) and aux logits (2)."""
    module.eval()
    device = accelerator.device
    out_idx: list[int] = []
    out_rows: list[list[float]] = []
    loader = image_loader(dataset, _batches(indices, batch_size), num_workers=num_workers, device=device)
    for idx, images, _labels, failed in loader:
        if failed:
            raise DataError(f"validation images that cannot be decoded: {describe_failures(dataset, failed)[:3]}")
        with accelerator.autocast():
            outputs = module(images.to(device, non_blocking=True), return_all=selective)
        if selective:
            cls, gate, aux = outputs
            outputs = torch.cat([cls.float(), gate.float()[:, None], aux.float()], dim=1)
        out_idx.extend(idx)
        out_rows.extend(outputs.float().cpu().tolist())
    return out_idx, out_rows


def evaluate(module: nn.Module, dataset: ImageDataset, *, head: HeadConfig, class_weights: torch.Tensor,
             batch_size: int, num_workers: int, accelerator) -> tuple[dict[str, float], np.ndarray]:
    """Val metrics over the whole of `dataset` (sharded over processes, then gathered) and p(roadwork):
    the selection score `val_brier` (class-balanced Brier, as in fit_head), the val loss (the training
    loss of the head kind, weighted by `class_weights`, no label smoothing) and the usual metrics at 0.5."""
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    selective = head.kind == "selective"
    idx, rows = _predict(module, dataset, list(range(rank, len(dataset), world)), batch_size=batch_size,
                         num_workers=num_workers, accelerator=accelerator, selective=selective)
    pairs = gather_object(list(zip(idx, rows, strict=True))) if world > 1 else list(zip(idx, rows, strict=True))
    pairs = sorted(pairs, key=lambda pair: pair[0])
    outputs = torch.tensor([pair[1] for pair in pairs], dtype=torch.float32)
    labels = torch.tensor([dataset.samples[pair[0]].label for pair in pairs], dtype=torch.long)
    all_logits = outputs[:, :2]
    heads_out = (outputs[:, :2], outputs[:, 2], outputs[:, 3:5]) if selective else all_logits
    loss = float(finetune_loss(heads_out, labels, head=head, class_weights=class_weights))
    p = positive_probability(all_logits).double().numpy()
    full = binary_metrics(labels.numpy(), p, threshold=0.5)
    metrics = {"val_brier": balanced_brier(p, labels.numpy()), "val_loss": loss,
               **{f"val_{k}": float(full[k]) for k in ("accuracy", "mcc", "auroc", "fnr", "fpr")}}
    return metrics, p
