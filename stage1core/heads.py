"""Classifier heads trained on cached backbone features.

Every head standardises its input with the train split's feature mean and std, kept as buffers so the
saved weights are self-contained. `linear`: one layer. `mlp`: hidden -> 768 -> 2. `selective`: a shared
trunk (hidden -> 768) with three heads (SelectiveNet): cls (2 logits), gate (1 logit: accept or abstain)
and aux (2 logits, trained at full coverage). Every head's `forward` returns the 2 class logits; the
selective head's `forward(x, return_all=True)` also returns the gate and aux outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

HEAD_KINDS = ("mlp", "linear", "selective")


@dataclass(frozen=True)
class HeadConfig:
    # mlp (hidden -> 768 -> 2), linear (hidden -> 2), or selective (trunk + cls/gate/aux heads)
    kind: Literal["mlp", "linear", "selective"] = "mlp"
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


class _Standardise(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set_stats(self, features: torch.Tensor) -> None:
        self.mean.copy_(features.mean(dim=0))
        self.std.copy_(features.std(dim=0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class LinearHead(nn.Module):
    def __init__(self, in_dim: int, num_classes: int = 2):
        super().__init__()
        self.norm = _Standardise(in_dim)
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


class MLPHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 768, dropout: float = 0.1, num_classes: int = 2):
        super().__init__()
        self.norm = _Standardise(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))


class SelectiveHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 768, dropout: float = 0.1, num_classes: int = 2):
        super().__init__()
        self.norm = _Standardise(in_dim)
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


def build_head(config: HeadConfig, in_dim: int) -> nn.Module:
    if config.kind == "linear":
        return LinearHead(in_dim)
    if config.kind == "selective":
        return SelectiveHead(in_dim, hidden=config.hidden, dropout=config.dropout)
    return MLPHead(in_dim, hidden=config.hidden, dropout=config.dropout)


def positive_probability(logits: torch.Tensor) -> torch.Tensor:
    """p(roadwork) from 2-class logits."""
    return torch.softmax(logits.float(), dim=-1)[..., 1]
