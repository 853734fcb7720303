"""DoRA/LoRA adapters (through peft) on timm ViT blocks, for backbone fine-tuning.

`apply_adapters` wraps selected linear layers of the last N transformer blocks of a timm ViT
(DINOv3 is `timm.models.eva.Eva`) with peft LoRA or DoRA layers and freezes everything else. An adapter
only trains if the block's forward actually calls the wrapped module. timm's fused-qkv attention with a
q/v bias (timm 1.0.31: `EvaAttention` in every `*_dinov3_qkvb` model and nowhere else among the DINOv3
models; also beit and swin v2 attention) computes `F.linear(x, self.qkv.weight, qkv_bias)`, which reads
the weight and skips the module, and with it the adapter, silently. These classes have a switch,
`qkv_bias_separate`, that calls `self.qkv(x)` and adds the bias afterwards (the same function);
`apply_adapters` turns it on in the adapted blocks, and refuses to adapt `attn.qkv` of an attention
that has a q bias and no such switch. `check_adapter_gradients` is the guard against any other bypass:
one forward/backward that fails unless every adapter is called and gets a non-zero gradient.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .config import describe_fields

log = logging.getLogger(__name__)

ADAPTER_METHODS = ("lora", "dora")

# timm's SwiGLU MLP (DINOv3 small-plus, huge-plus, 7b) splits fc1 into a gate and a value projection;
# the target "mlp.fc1" stands for both there.
_SWIGLU_FC1 = ("mlp.fc1_g", "mlp.fc1_x")


@describe_fields
@dataclass(frozen=True)
class AdapterConfig:
    # lora, or dora (weight-decomposed LoRA: a learned magnitude per output)
    method: Literal["lora", "dora"] = "dora"
    rank: int = 8  # rank r of the low-rank update B @ A
    alpha: int = 16  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input (the frozen path sees none)
    last_n_blocks: int = 4  # adapt only the last N transformer blocks
    # module paths inside a block; on a SwiGLU MLP "mlp.fc1" means mlp.fc1_g and mlp.fc1_x, which may
    # also be named one by one. A target missing from the adapted blocks is an error.
    targets: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")

    def __post_init__(self) -> None:
        # a form or a JSON file gives a list; keep the config hashable
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.method not in ADAPTER_METHODS:
            raise ValueError(f"AdapterConfig.method must be one of {ADAPTER_METHODS}, got {self.method!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"AdapterConfig.rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"AdapterConfig.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.last_n_blocks, int) or self.last_n_blocks < 1:
            raise ValueError(f"AdapterConfig.last_n_blocks must be an integer >= 1, got {self.last_n_blocks!r}")
        if not self.targets:
            raise ValueError("AdapterConfig.targets is empty: name at least one module, e.g. 'attn.proj'")
        for target in self.targets:
            if not isinstance(target, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", target):
                raise ValueError(
                    f"AdapterConfig.targets: {target!r} is not a module path inside a block "
                    "(like 'attn.qkv' or 'mlp.fc2')"
                )
            if target.startswith("blocks."):
                raise ValueError(
                    f"AdapterConfig.targets: {target!r} names a block; targets are paths inside a block "
                    "('attn.qkv'); choose the blocks with last_n_blocks"
                )
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"AdapterConfig.targets has duplicates: {self.targets}")


# ---------------------------------------------------------------------------------------------------
# adapters


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's transformer block list (timm names it `blocks`) and its dotted prefix."""
    if _is_peft_model(model):
        raise ValueError("the model already carries peft adapters; pass the plain timm model")
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and (name == "blocks" or name.endswith(".blocks"))
    ]
    if len(found) != 1:
        where = ", ".join(name for name, _ in found) or "none"
        raise ValueError(
            f"{type(model).__name__}: expected exactly one transformer block list named 'blocks' "
            f"(timm ViT / Eva layout), found {where}"
        )
    name, blocks = found[0]
    return name[: -len("blocks")], blocks


def _is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _linear_names(block: nn.Module) -> list[str]:
    return [name for name, module in block.named_modules() if isinstance(module, nn.Linear)]


def _resolve_targets(block: nn.Module, targets: Sequence[str]) -> tuple[list[str], list[str]]:
    """(module paths in `block` that the targets name, targets not found), with "mlp.fc1" expanded
    to fc1_g and fc1_x on a SwiGLU MLP."""
    present = {name for name, _ in block.named_modules() if name}
    resolved: list[str] = []
    missing: list[str] = []
    for target in targets:
        if target in present:
            names = [target]
        elif target == "mlp.fc1" and all(name in present for name in _SWIGLU_FC1):
            names = list(_SWIGLU_FC1)
        else:
            missing.append(target)
            names = []
        resolved.extend(name for name in names if name not in resolved)
    return resolved, missing


def target_regex(model: nn.Module, config: AdapterConfig) -> str:
    """The regex that peft full-matches against module names: the config's targets in the last N blocks.

    Anchored on `blocks\\.(i|j)\\.` so that a bare name like `proj` can never reach `patch_embed.proj`.
    Raises ValueError, naming the regex and the model's blocks, when the model has fewer blocks than
    `last_n_blocks` or a target is not a module of every adapted block.
    """
    prefix, blocks = _find_blocks(model)
    depth = len(blocks)
    indices = list(range(max(depth - config.last_n_blocks, 0), depth))
    resolved, unresolved = _resolve_targets(blocks[depth - 1], config.targets) if depth else ([], [])
    names = resolved + unresolved  # an unresolved target only ever reaches an error message
    regex = (
        re.escape(prefix)
        + r"blocks\.("
        + "|".join(str(i) for i in indices)
        + r")\.("
        + "|".join(re.escape(name) for name in names)
        + ")"
    )
    span = f"{prefix}blocks.0 .. {prefix}blocks.{depth - 1}" if depth else "none"
    if config.last_n_blocks > depth:
        raise ValueError(
            f"AdapterConfig.last_n_blocks={config.last_n_blocks} but the model has {depth} blocks ({span}); "
            f"regex {regex!r}"
        )
    for index in indices:
        here, missing = _resolve_targets(blocks[index], config.targets)
        if missing or here != resolved:
            raise ValueError(
                f"adapter targets {missing or list(config.targets)} are not modules of "
                f"{prefix}blocks.{index} "
                f"(regex {regex!r}; the model's blocks are {span}); "
                f"the linear layers of that block are {_linear_names(blocks[index])}"
            )
    return regex


def _route_fused_qkv_bias(model: nn.Module, adapted: Sequence[str]) -> None:
    """Make fused-qkv-with-bias attention call its (adapted) qkv module instead of reading its weight."""
    modules = dict(model.named_modules())
    for name in adapted:
        parent_name, _, attr = name.rpartition(".")
        parent = modules.get(parent_name)
        if attr != "qkv" or parent is None or getattr(parent, "q_bias", None) is None:
            continue
        # This attention computes F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias)).
        if hasattr(parent, "qkv_bias_separate"):
            if not parent.qkv_bias_separate:
                # timm's own switch: qkv = self.qkv(x); qkv += bias. Same function, module is called.
                parent.qkv_bias_separate = True
                log.info("%s: qkv_bias_separate=True so that the adapter on %s is used", parent_name, name)
        else:
            raise ValueError(
                f"{name}: {type(parent).__name__}.forward computes F.linear(x, self.qkv.weight, qkv_bias), "
                "which bypasses any adapter on it. Remove 'attn.qkv' from AdapterConfig.targets "
                "(adapt 'attn.proj', 'mlp.fc1', 'mlp.fc2'), or use a model without a qkv bias"
            )


def apply_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap the targeted linear layers of the last N blocks with LoRA/DoRA; freeze everything else.

    Returns a `peft.PeftModel` around `model` (modified in place, as peft does). Fused-qkv attention
    with a bias is switched to call its qkv module (see the module docstring), or refused where timm
    offers no switch. The adapters start as an exact no-op: lora_B is zero and DoRA's magnitude is the
    weight's own column norm.
    """
    from peft import LoraConfig, get_peft_model

    regex = target_regex(model, config)
    adapted = [name for name, _ in model.named_modules() if re.fullmatch(regex, name)]
    if not adapted:
        prefix, blocks = _find_blocks(model)
        raise ValueError(
            f"adapter regex {regex!r} matches no module; the model's blocks are "
            f"{prefix}blocks.0 .. {prefix}blocks.{len(blocks) - 1}"
        )
    _route_fused_qkv_bias(model, adapted)
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=regex,
        use_dora=config.method == "dora",
        bias="none",
    )
    peft_model = get_peft_model(model, lora_config)
    # peft already freezes the base weights; this makes "only adapters train" hold whatever it does
    for name, param in peft_model.named_parameters():
        param.requires_grad_("lora_" in name)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info(
        "%s adapters on %d modules (%s): %d trainable of %d parameters",
        config.method,
        len(adapted),
        regex,
        trainable,
        total,
    )
    return peft_model


def _adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if _is_peft_model(model) else model
    return {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}


def adapted_module_names(model: nn.Module) -> list[str]:
    """Names (in the timm model, e.g. `blocks.11.attn.qkv`) of the modules that carry an adapter."""
    return list(_adapter_layers(model))


def check_adapter_gradients(model: nn.Module, example_input: torch.Tensor) -> dict[str, float]:
    """One forward/backward on `example_input`; the gradient norm of each adapted module's adapter.

    Raises RuntimeError naming every adapted module that the forward never called (its parent reads
    the weight directly, as fused qkv with F.linear does), that has no trainable adapter parameter, or
    whose adapter gradient is None, zero or not finite. The loss is a fixed random projection of the
    output, so no output symmetry can cancel a gradient. Adapter `.grad`s are cleared before and after.
    """
    layers = _adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapters; call apply_adapters first")
    adapter_params = {
        name: [p for pname, p in layer.named_parameters() if p.requires_grad and "lora_" in pname]
        for name, layer in layers.items()
    }
    for params in adapter_params.values():
        for p in params:
            p.grad = None
    called: set[str] = set()
    handles = [
        layer.register_forward_hook(lambda _m, _i, _o, name=name: called.add(name)) for name, layer in layers.items()
    ]
    try:
        with torch.enable_grad():
            out = model(example_input)
            if isinstance(out, (tuple, list)):
                out = out[0]
            out = out.float()
            generator = torch.Generator(device="cpu").manual_seed(0)
            weights = torch.randn(out.shape, generator=generator).to(out.device)
            loss = (out * weights).sum()
            if loss.requires_grad:  # not when every adapter is bypassed; reported below
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()

    norms: dict[str, float] = {}
    problems: list[str] = []
    for name, params in adapter_params.items():
        if name not in called:
            problems.append(f"{name}: never called in forward (its parent bypasses the module)")
            continue
        if not params:
            problems.append(f"{name}: no trainable adapter parameter")
            continue
        grads = [p.grad for p in params if p.grad is not None]
        norm = math.sqrt(sum(float(g.detach().float().pow(2).sum()) for g in grads)) if grads else 0.0
        norms[name] = norm
        if not grads or not norm > 0.0 or not math.isfinite(norm):
            problems.append(f"{name}: adapter gradient norm is {norm} (None, zero or not finite)")
    for params in adapter_params.values():
        for p in params:
            p.grad = None
    if problems:
        raise RuntimeError("adapters that would not train (silent bypass):\n  " + "\n  ".join(problems))
    return norms


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only (lora_A, lora_B, DoRA magnitudes), on CPU, contiguous: safetensors-ready."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load weights from `adapter_state_dict` into a model built by `apply_adapters` with the same config.

    Raises ValueError naming missing, unexpected and mis-shaped keys (a config or backbone mismatch).
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(
        f"{key} {tuple(state_dict[key].shape)} != {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    if missing or unexpected or mis_shaped:
        raise ValueError(
            "adapter weights do not fit this model (was it built with the same backbone and AdapterConfig?): "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}, "
            f"wrong shape {mis_shaped[:5]}"
        )
    result = set_peft_model_state_dict(model, state_dict)
    if result.unexpected_keys:
        raise ValueError(f"peft did not place adapter weights {result.unexpected_keys[:5]}")


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights; returns the plain timm model (same state-dict keys).

    Attention that `apply_adapters` switched to `qkv_bias_separate=True` keeps it (the same function).
    """
    if not _is_peft_model(model):
        raise ValueError("merge_adapters expects the model returned by apply_adapters")
    merged = model.merge_and_unload()
    left = adapted_module_names(merged)
    if left:
        raise RuntimeError(f"adapters left after merge: {left[:5]}")
    return merged
