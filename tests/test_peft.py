"""Adapters on tiny random-init DINOv3 (timm Eva) models (the F-SAM optimizer: tests/test_fsam.py)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from stage1core.peft import (
    AdapterConfig,
    adapted_module_names,
    adapter_state_dict,
    apply_adapters,
    check_adapter_gradients,
    load_adapter_state_dict,
    merge_adapters,
    target_regex,
)

REPO = Path(__file__).resolve().parents[1]
PLAIN = "vit_small_patch16_dinov3"
SWIGLU = "vit_small_plus_patch16_dinov3"
QKVB = "vit_small_patch16_dinov3_qkvb"
VARIANTS = [PLAIN, SWIGLU, QKVB]


def tiny_vit(name: str, depth: int = 4, **kwargs) -> nn.Module:
    # layer scale 1 instead of DINOv3's 1e-5, so that a changed adapter visibly changes the output
    torch.manual_seed(0)
    options = dict(depth=depth, embed_dim=64, num_heads=2, img_size=32, init_values=1.0)
    options.update(kwargs)
    return timm.create_model(name, pretrained=False, **options).eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def expected_names(blocks: range, variant: str) -> set[str]:
    fc1 = ["mlp.fc1_g", "mlp.fc1_x"] if variant == SWIGLU else ["mlp.fc1"]
    return {f"blocks.{i}.{t}" for i in blocks for t in ["attn.qkv", "attn.proj", *fc1, "mlp.fc2"]}


def randomize_adapters(model: nn.Module) -> None:
    """Move the adapters away from their no-op init (lora_B = 0, DoRA magnitude = weight norm)."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
            elif "lora_magnitude" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))


# ---------------------------------------------------------------------------------------------------
# adapters


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_adapter_gets_gradient_and_only_adapters_train(variant, method):
    model = apply_adapters(tiny_vit(variant), AdapterConfig(method=method, last_n_blocks=2))
    names = set(adapted_module_names(model))
    assert names == expected_names(range(2, 4), variant)
    norms = check_adapter_gradients(model, images())
    assert set(norms) == names
    assert all(norm > 0 and math.isfinite(norm) for norm in norms.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert (method == "dora") == any("lora_magnitude" in n for n in trainable)
    assert all(p.grad is None for p in model.parameters())  # the check leaves no gradients behind


@pytest.mark.parametrize("variant", timm.list_models("*dinov3*"))
def test_which_dinov3_variants_bypass_an_adapter_on_qkv(variant):
    """Wrap qkv with peft directly (no routing): the gradient check must fail exactly for *_qkvb."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_vit(variant, depth=2), LoraConfig(r=2, target_modules=r"blocks\.1\.attn\.qkv"))
    if variant.endswith("_qkvb"):
        with pytest.raises(RuntimeError, match=r"blocks\.1\.attn\.qkv: never called in forward"):
            check_adapter_gradients(model, images())
    else:
        assert check_adapter_gradients(model, images())["blocks.1.attn.qkv"] > 0


def test_qkvb_routing_keeps_the_function_and_touches_only_adapted_blocks():
    model = tiny_vit(QKVB)
    before = model(images())
    adapted = apply_adapters(model, AdapterConfig(method="lora", last_n_blocks=2))
    flags = [block.attn.qkv_bias_separate for block in adapted.get_base_model().blocks]
    assert flags == [False, False, True, True]
    # give the qkv bias a value so the separate-bias path is really exercised
    with torch.no_grad():
        for block in adapted.get_base_model().blocks:
            block.attn.q_bias.normal_()
    reference = tiny_vit(QKVB)
    reference.load_state_dict(merge_adapters(adapted).state_dict())
    assert not torch.allclose(before, reference(images()))
    torch.testing.assert_close(adapted(images()), reference(images()), atol=1e-5, rtol=1e-5)


def test_refuses_qkv_where_bias_cannot_be_routed():
    model = tiny_vit("beit_base_patch16_224", depth=2, init_values=0.1, num_classes=0)
    for block in model.blocks:
        del block.attn.qkv_bias_separate  # an attention with a q bias and no switch
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv: .*F\.linear.*Remove 'attn\.qkv'"):
        apply_adapters(model, AdapterConfig(last_n_blocks=1))
    # BEiT itself has the switch: adapting qkv works and trains
    beit = apply_adapters(
        tiny_vit("beit_base_patch16_224", depth=2, init_values=0.1, num_classes=0), AdapterConfig(last_n_blocks=1)
    )
    assert "blocks.1.attn.qkv" in check_adapter_gradients(beit, images())


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_adapters_at_init_leave_the_output_unchanged(variant, method):
    base = tiny_vit(variant)
    expected = base(images())
    adapted = apply_adapters(copy.deepcopy(base), AdapterConfig(method=method, last_n_blocks=3))
    with torch.no_grad():
        torch.testing.assert_close(adapted(images()), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("last_n", [1, 3])
def test_adapters_sit_only_in_the_last_n_blocks(last_n):
    model = tiny_vit(PLAIN)
    config = AdapterConfig(last_n_blocks=last_n, targets=("attn.proj",))
    regex = target_regex(model, config)
    assert regex.startswith(r"blocks\.(")
    import re

    matched = [name for name, _ in model.named_modules() if re.fullmatch(regex, name)]
    assert "patch_embed.proj" in dict(model.named_modules())
    assert matched == [f"blocks.{i}.attn.proj" for i in range(4 - last_n, 4)]
    assert adapted_module_names(apply_adapters(model, config)) == matched


def test_config_and_model_mismatches_are_refused_with_names():
    for bad in [
        dict(method="ia3"),
        dict(rank=0),
        dict(alpha=0),
        dict(dropout=1.0),
        dict(last_n_blocks=0),
        dict(targets=()),
        dict(targets=("blocks.3.attn.qkv",)),
        dict(targets=("attn.proj", "attn.proj")),
    ]:
        with pytest.raises(ValueError, match="AdapterConfig"):
            AdapterConfig(**bad)
    assert AdapterConfig(targets=["attn.proj"]).targets == ("attn.proj",)  # JSON lists become tuples
    with pytest.raises(ValueError, match=r"fc1_g.*regex.*blocks\.0 \.\. blocks\.3.*mlp\.fc1"):
        target_regex(tiny_vit(PLAIN), AdapterConfig(targets=("mlp.fc1_g",)))
    with pytest.raises(ValueError, match=r"last_n_blocks=5 but the model has 4 blocks"):
        apply_adapters(tiny_vit(PLAIN), AdapterConfig(last_n_blocks=5))
    with pytest.raises(ValueError, match="'blocks'"):
        apply_adapters(nn.Sequential(nn.Linear(2, 2)), AdapterConfig())
    # the SwiGLU names are accepted by name too
    swiglu = apply_adapters(tiny_vit(SWIGLU), AdapterConfig(last_n_blocks=1, targets=("mlp.fc1_x",)))
    assert adapted_module_names(swiglu) == ["blocks.3.mlp.fc1_x"]


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_gives_the_adapter_model_outputs(variant, method):
    base = tiny_vit(variant)
    adapted = apply_adapters(copy.deepcopy(base), AdapterConfig(method=method, last_n_blocks=2))
    randomize_adapters(adapted)
    with torch.no_grad():
        expected = adapted(images())
        assert (expected - base(images())).abs().max() > 1e-2  # the adapters matter
        merged = merge_adapters(adapted)
        assert type(merged) is type(base) and not adapted_module_names(merged)
        assert merged.state_dict().keys() == base.state_dict().keys()
        torch.testing.assert_close(merged(images()), expected, atol=1e-5, rtol=1e-4)


def test_adapter_state_dict_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    config = AdapterConfig(method="dora", last_n_blocks=2)
    source = apply_adapters(tiny_vit(SWIGLU), config)
    randomize_adapters(source)
    state = adapter_state_dict(source)
    assert state and all("lora_" in key for key in state)
    assert any("lora_magnitude" in key for key in state)
    save_file(state, tmp_path / "adapter.safetensors")

    target = apply_adapters(tiny_vit(SWIGLU), config)
    load_adapter_state_dict(target, load_file(tmp_path / "adapter.safetensors"))
    with torch.no_grad():
        assert torch.equal(target(images()), source(images()))
    other = apply_adapters(tiny_vit(SWIGLU), AdapterConfig(method="dora", rank=4, last_n_blocks=2))
    with pytest.raises(ValueError, match="wrong shape"):
        load_adapter_state_dict(other, state)
    lora = apply_adapters(tiny_vit(SWIGLU), AdapterConfig(method="lora", last_n_blocks=2))
    with pytest.raises(ValueError, match="unexpected .*lora_magnitude"):
        load_adapter_state_dict(lora, state)
