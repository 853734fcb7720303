"""Backbone modes and the parameters each one reads, so that no parameter is silently ignored.

`frozen` trains a grid of heads on cached features (`features`, `train`, `selection`); `lora` and
`dora` fine-tune adapters on the backbone together with one head, on images (`finetune`, `launch`,
`merge_adapters`), and read `features` only for the baselines' probe of the frozen backbone. The mode
is the one switch: `finetune.adapter.method` must name the same method, and a parameter the mode
would not read must keep its default. Checked before a run does any work (flows) and when team
settings are read (stage1core.settings).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .baselines import BaselineConfig
from .features import FeatureConfig
from .finetune import FinetuneConfig
from .selection import SelectionConfig
from .train import TrainConfig

FINETUNE_MODES = ("lora", "dora")
BACKBONE_MODES = ("frozen", *FINETUNE_MODES)


class BackboneModeError(ValueError):
    """Parameters that contradict the backbone mode, or that it would ignore."""


def changed_fields(name: str, value: Any, default: Any) -> list[str]:
    """`name.field = value (default d)` for every field of a config dataclass that differs from the
    default (`name = value` for a plain value)."""
    if not dataclasses.is_dataclass(value):
        return [] if value == default else [f"{name} = {value!r} (default {default!r})"]
    out = []
    for f in dataclasses.fields(value):
        mine, theirs = getattr(value, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(mine):
            out += changed_fields(f"{name}.{f.name}", mine, theirs)
        elif mine != theirs:
            out.append(f"{name}.{f.name} = {mine!r} (default {theirs!r})")
    return out


def check_backbone_mode(backbone_mode: str, *, finetune: FinetuneConfig, features: FeatureConfig,
                        train: TrainConfig, selection: SelectionConfig, baselines: BaselineConfig,
                        merge_adapters: bool = False, launch: Any = None) -> list[str]:
    """Refuse (BackboneModeError, naming the parameters) a `finetune.adapter.method` other than a
    lora/dora mode, and non-default values of parameters that mode ignores: `train` and `selection`
    (heads on cached features), and `features` unless the baselines read it. Defaults are fine.

    For `frozen`, returns what is set but unused (fine-tuning settings a team may keep ready: `finetune`,
    `merge_adapters`, and `launch`, compared with its class's defaults when given), for a warning.
    """
    if backbone_mode not in BACKBONE_MODES:
        raise BackboneModeError(f"backbone_mode must be one of {BACKBONE_MODES}, got {backbone_mode!r}")
    if backbone_mode == "frozen":
        unused = changed_fields("finetune", finetune, FinetuneConfig())
        unused += changed_fields("merge_adapters", merge_adapters, False)
        if launch is not None:
            unused += changed_fields("launch", launch, type(launch)())
        return unused
    method = finetune.adapter.method
    if method != backbone_mode:
        raise BackboneModeError(
            f"backbone_mode {backbone_mode!r} and finetune.adapter.method {method!r} disagree: set "
            f"finetune.adapter.method to {backbone_mode!r} as well (or backbone_mode to {method!r})")
    ignored = changed_fields("train", train, TrainConfig()) + changed_fields("selection", selection, SelectionConfig())
    if not baselines.enabled:  # with baselines on, `features` configures their frozen-backbone probe
        ignored += changed_fields("features", features, FeatureConfig())
    if ignored:
        raise BackboneModeError(
            f"backbone_mode {backbone_mode!r} trains one head with the backbone on images (settings under "
            f"`finetune`), so these would be ignored: {'; '.join(ignored)}. Put them back to their defaults, "
            "or set backbone_mode to 'frozen' to train heads on cached features")
    return []
