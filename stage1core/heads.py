"""Classifier heads trained on cached backbone features.

Every head standardises its input with the train split's feature mean and std, kept as buffers so the
saved weights are self-contained. `linear`: one layer. `mlp`: hidden -> 768 -> 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

HEAD_KINDS = ("mlp", "linear")


@dataclass(frozen=True)
class HeadConfig:
    # mlp (hidden -> 768 -> 2) or linear (hidden -> 2)
    kind: str = "mlp"
    # width of the MLP's hidden layer
    hidden: int = 768
    # dropout before the last layer
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        if self.hidden < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("hidden must be >= 1 and dropout in [0, 1)")


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


def build_head(config: HeadConfig, in_dim: int) -> nn.Module:
    if config.kind == "linear":
        return LinearHead(in_dim)
    return MLPHead(in_dim, hidden=config.hidden, dropout=config.dropout)


def positive_probability(logits: torch.Tensor) -> torch.Tensor:
    """p(roadwork) from 2-class logits."""
    return torch.softmax(logits.float(), dim=-1)[..., 1]
