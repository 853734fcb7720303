"""Classifier heads trained on cached backbone features.

Every head standardises its input with the train split's feature mean and std, kept as buffers so the
saved weights are self-contained. Real backbones have dead and near-constant feature dimensions (an
EfficientNet-Lite0 on real photos: 6 of 1,280 with std < 1e-3, the smallest exactly 0), so a plain
`std.clamp_min(1e-6)` turns a tiny shift on val or test images into z-scores of 1e5 and one such
dimension dominates the logits. The std is therefore floored at 1% of the median std over dimensions
(on Fashion-MNIST features this touches the 13 of 1,280 dimensions that are essentially dead; a 10%
floor would also shrink 88 legitimately quiet ones), and standardised values are clipped
(`STANDARD_CLIP`), so a value far outside the train range moves a logit by a bounded amount.

`linear`: one layer. `mlp`: hidden -> 768 -> 2. `selective`: a shared trunk (hidden -> 768) with three
heads (SelectiveNet): cls (2 logits), gate (1 logit: accept or abstain) and aux (2 logits, trained at
full coverage). Every head's `forward` returns the 2 class logits; the selective head's
`forward(x, return_all=True)` also returns the gate and aux outputs.

A head may read a slice of the feature vector (`FeatureView`): a store of `cls+avg` features holds
the CLS token and the patch mean side by side, so a head can be trained on either half or both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .config import describe_fields

HEAD_KINDS = ("auto", "mlp", "linear", "selective")
# the std of a feature dimension is floored at this fraction of the median std over dimensions
STD_FLOOR_FRACTION = 0.01
# standardised values are clipped to [-STANDARD_CLIP, STANDARD_CLIP]
STANDARD_CLIP = 10.0


@describe_fields
@dataclass(frozen=True)
class HeadConfig:
    # auto: linear and mlp under head selection (the better on val is kept), mlp without it, and
    # selective when the policy needs a gate; or one kind: mlp (hidden -> 768 -> 2), linear
    # (hidden -> 2), selective (trunk + cls/gate/aux heads, needed by the gate and scrc-gate policies)
    kind: Literal["auto", "mlp", "linear", "selective"] = "auto"
    # width of the hidden layer (MLP and selective trunk)
    hidden: int = 768
    # dropout before the last layer
    dropout: float = 0.1
    # selective only: SelectiveNet's target coverage c (fraction of samples the gate should accept)
    target_coverage: float = 0.8
    # selective only: weight of the coverage penalty lambda * max(0, c - coverage)^2 (32 in the paper)
    coverage_lambda: float = 32.0
    # selective only: mix alpha * selective loss + (1 - alpha) * aux cross-entropy (0.5 in the paper)
    selective_alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        if self.hidden < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("hidden must be >= 1 and dropout in [0, 1)")
        if not 0.0 < self.target_coverage <= 1.0 or not 0.0 <= self.selective_alpha <= 1.0:
            raise ValueError("target_coverage must be in (0, 1] and selective_alpha in [0, 1]")
        if self.coverage_lambda < 0:
            raise ValueError("coverage_lambda must be >= 0")

    def kinds(self, *, selection: bool, needs_gate: bool = False) -> tuple[str, ...]:
        """The concrete head kinds to train (see `kind`)."""
        if self.kind != "auto":
            return (self.kind,)
        if needs_gate:
            return ("selective",)
        return ("linear", "mlp") if selection else ("mlp",)


@dataclass(frozen=True)
class FeatureView:
    """Which columns of the stored feature vector a head reads: `name` is all, cls or avg."""

    name: str
    start: int
    stop: int

    @property
    def dim(self) -> int:
        return self.stop - self.start


def feature_views(pooling: str, dim: int) -> list[FeatureView]:
    """The views a store of `pooling` features offers: cls+avg stores [cls, mean of patches] side by side."""
    whole = FeatureView("all", 0, dim)
    if pooling != "cls+avg":
        return [whole]
    if dim % 2:
        raise ValueError(f"cls+avg features must have an even dimension, got {dim}")
    return [whole, FeatureView("cls", 0, dim // 2), FeatureView("avg", dim // 2, dim)]


class _Standardise(nn.Module):
    def __init__(self, dim: int, start: int = 0):
        super().__init__()
        self.start, self.dim = start, dim
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set_stats(self, features: torch.Tensor) -> None:
        """Mean and floored std of the train features (all columns; this head's view is taken here)."""
        x = features[:, self.start:self.start + self.dim].double()
        std = x.std(dim=0)
        floor = max(float(std.median()) * STD_FLOOR_FRACTION, 1e-6)
        self.mean.copy_(x.mean(dim=0).float())
        self.std.copy_(std.clamp_min(floor).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[..., self.start:self.start + self.dim]
        return ((x - self.mean) / self.std).clamp(-STANDARD_CLIP, STANDARD_CLIP)


class LinearHead(nn.Module):
    def __init__(self, in_dim: int, num_classes: int = 2, *, start: int = 0):
        super().__init__()
        self.norm = _Standardise(in_dim, start)
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


class MLPHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 768, dropout: float = 0.1, num_classes: int = 2, *,
                 start: int = 0):
        super().__init__()
        self.norm = _Standardise(in_dim, start)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))


class SelectiveHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 768, dropout: float = 0.1, num_classes: int = 2, *,
                 start: int = 0):
        super().__init__()
        self.norm = _Standardise(in_dim, start)
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.cls = nn.Linear(hidden, num_classes)
        self.gate = nn.Linear(hidden, 1)
        self.aux = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor, return_all: bool = False):
        """Class logits (B, 2); with `return_all`, (cls logits, gate logit (B,), aux logits (B, 2)).
        (A keyword, not a second method, so DDP-wrapped modules still sync gradients.)"""
        h = self.trunk(self.norm(x))
        if not return_all:
            return self.cls(h)
        return self.cls(h), self.gate(h).squeeze(-1), self.aux(h)


def build_head(config: HeadConfig, in_dim: int, *, kind: str | None = None,
               view: FeatureView | None = None) -> nn.Module:
    """A head of `kind` (default: the config's kind, `auto` meaning mlp) reading `view` of `in_dim`-d
    features (default: all of them)."""
    kind = kind or config.kind
    view = view or FeatureView("all", 0, in_dim)
    if view.stop > in_dim:
        raise ValueError(f"feature view {view} does not fit {in_dim}-d features")
    if kind == "linear":
        return LinearHead(view.dim, start=view.start)
    if kind == "selective":
        return SelectiveHead(view.dim, hidden=config.hidden, dropout=config.dropout, start=view.start)
    return MLPHead(view.dim, hidden=config.hidden, dropout=config.dropout, start=view.start)


def positive_probability(logits: torch.Tensor) -> torch.Tensor:
    """p(roadwork) from 2-class logits."""
    return torch.softmax(logits.float(), dim=-1)[..., 1]
