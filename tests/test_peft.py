"""Adapters on tiny random-init DINOv3 (timm Eva) models, and the F-SAM optimizer.

The Accelerate tests run this file as a script in a fresh interpreter (Accelerate's state is a
process-wide singleton), see the bottom of the file.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from torch import nn

from stage1core.peft import (
    FSAM,
    AdapterConfig,
    adapted_module_names,
    adapter_state_dict,
    apply_adapters,
    check_adapter_gradients,
    fsam_training_step,
    load_adapter_state_dict,
    make_optimizer,
    merge_adapters,
    target_regex,
    unwrap_fsam,
)
from tests.common import HANG_TIMEOUT_S

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


# ---------------------------------------------------------------------------------------------------
# F-SAM


def tiny_mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)).to(dtype)


def classification_batches(count: int, size: int, dtype: torch.dtype = torch.float32, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 6, generator=generator, dtype=dtype), torch.randint(0, 3, (size,), generator=generator))
        for _ in range(count)
    ]


def cross_entropy(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def test_lr_zero_never_moves_the_weights():
    model = tiny_mlp()
    start = copy.deepcopy(model.state_dict())
    optimizer = make_optimizer(model.parameters(), kind="fsam", lr=0.0, weight_decay=0.1, rho=0.5)
    for batches in [classification_batches(2, 4, seed=s) for s in range(4)]:
        fsam_training_step(model, cross_entropy, optimizer, micro_batches=batches)
        assert all(torch.equal(model.state_dict()[k], start[k]) for k in start)
    # the perturbation itself is real, and its restore is bitwise
    fsam = unwrap_fsam(optimizer)
    cross_entropy(model, classification_batches(1, 4)[0]).backward()
    fsam.first_step(zero_grad=True)
    assert not torch.equal(model.state_dict()["0.weight"], start["0.weight"])
    cross_entropy(model, classification_batches(1, 4)[0]).backward()
    fsam.second_step(zero_grad=True)
    assert all(torch.equal(model.state_dict()[k], start[k]) for k in start)
    assert all("old_p" not in state for state in fsam.state.values())


def test_restore_copies_instead_of_subtracting():
    # small weights, large rho: (w + eps) - eps != w in float32, a copy is exact
    w0 = 1e-3 * torch.randn(64, generator=torch.Generator().manual_seed(0))
    w = nn.Parameter(w0.clone())
    optimizer = FSAM([w], torch.optim.SGD, rho=3.0, lr=0.0)
    w.grad = torch.randn(64, generator=torch.Generator().manual_seed(1))
    eps = 3.0 * w.grad / w.grad.norm()
    assert not torch.equal((w0 + eps) - eps, w0)
    optimizer.first_step()
    torch.testing.assert_close(w.detach() - w0, eps, atol=1e-6, rtol=0)
    optimizer.second_step()
    assert torch.equal(w.detach(), w0)


def test_quadratic_two_steps_match_the_hand_computed_update():
    """loss = 0.5 w^T A w over two parameter groups (different lr), SGD base, float64."""
    torch.manual_seed(0)
    q = torch.randn(5, 5, dtype=torch.float64)
    a = q @ q.T + 5 * torch.eye(5, dtype=torch.float64)
    w0 = torch.randn(5, dtype=torch.float64)
    rho, sigma, lmbd, lrs = 0.2, 0.7, 0.8, torch.tensor([0.05, 0.05, 0.05, 0.02, 0.02], dtype=torch.float64)

    w1p = nn.Parameter(w0[:3].clone())
    w2p = nn.Parameter(w0[3:].clone())
    optimizer = FSAM(
        [{"params": [w1p], "lr": 0.05}, {"params": [w2p], "lr": 0.02}],
        torch.optim.SGD,
        rho=rho,
        sigma=sigma,
        lmbd=lmbd,
        lr=0.1,
    )

    def closure():
        w = torch.cat([w1p, w2p])
        loss = 0.5 * w @ a @ w
        loss.backward()
        return loss

    def grad(w):
        return a @ w

    # by hand, in the reference order: d uses the EMA before it absorbs g; the EMA starts at g
    def hand(w, ema):
        g = grad(w)
        if ema is None:
            d, ema = g, g
        else:
            d, ema = g - sigma * ema, lmbd * ema + (1 - lmbd) * g
        eps = rho * d / d.norm()
        return w - lrs * grad(w + eps), ema

    w, ema = w0, None
    for _ in range(2):
        loss = optimizer.step(closure)
        torch.testing.assert_close(loss, 0.5 * w @ a @ w)
        w, ema = hand(w, ema)
        torch.testing.assert_close(torch.cat([w1p, w2p]).detach(), w, rtol=1e-12, atol=1e-12)
        state_ema = torch.cat([optimizer.state[w1p]["ema"], optimizer.state[w2p]["ema"]])
        torch.testing.assert_close(state_ema, ema, rtol=1e-12, atol=1e-12)

    # the test tells the orders apart: the paper's order (EMA first) lands elsewhere on step 2
    g0 = grad(w0)
    w_first = w0 - lrs * grad(w0 + rho * g0 / g0.norm())
    g1 = grad(w_first)
    m = lmbd * g0 + (1 - lmbd) * g1
    d = g1 - sigma * m
    w_paper = w_first - lrs * grad(w_first + rho * d / d.norm())
    assert (w_paper - w).abs().max() > 1e-6


def test_adaptive_perturbation_scales_by_the_weights():
    w0 = torch.tensor([0.5, -2.0, 1.0, 3.0])
    g = torch.tensor([1.0, 0.5, -1.0, 0.25])
    w = nn.Parameter(w0.clone())
    optimizer = FSAM([w], torch.optim.SGD, rho=0.1, adaptive=True, lr=0.0)
    w.grad = g.clone()
    optimizer.first_step()
    expected = 0.1 * w0**2 * g / (w0.abs() * g).norm()
    torch.testing.assert_close(w.detach() - w0, expected)


def test_micro_batches_accumulate_to_the_full_batch_step():
    batches = classification_batches(2, 4, dtype=torch.float64)
    full = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    models = [tiny_mlp(torch.float64) for _ in range(2)]
    optimizers = [FSAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.1) for m in models]
    for _ in range(3):
        split = fsam_training_step(models[0], cross_entropy, optimizers[0], micro_batches=batches)
        whole = fsam_training_step(models[1], cross_entropy, optimizers[1], micro_batches=full)
        assert split == pytest.approx(whole, rel=1e-12)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert not torch.equal(models[0][0].weight, tiny_mlp(torch.float64)[0].weight)


def test_closure_step_equals_the_training_step_helper():
    batch = classification_batches(1, 8)
    models = [tiny_mlp() for _ in range(2)]
    optimizers = [make_optimizer(m.parameters(), lr=1e-2, rho=0.1) for m in models]
    for _ in range(3):
        fsam_training_step(models[0], cross_entropy, optimizers[0], micro_batches=batch)
        optimizers[1].step(lambda: cross_entropy(models[1], batch[0]).backward())
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_dict_carries_the_base_optimizer_and_the_ema():
    batches = classification_batches(1, 8)
    model = tiny_mlp()
    optimizer = make_optimizer(model.parameters(), lr=1e-2, rho=0.1)
    fsam_training_step(model, cross_entropy, optimizer, micro_batches=batches)
    clone = copy.deepcopy(model)
    restored = make_optimizer(clone.parameters(), lr=1e-2, rho=0.1)
    # deepcopy, as a save/load would: torch's load_state_dict keeps the given tensors (step, ema)
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert restored.base_optimizer.param_groups is restored.param_groups
    assert "exp_avg" in restored.base_optimizer.state[next(clone.parameters())]
    for m, o in [(model, optimizer), (clone, restored)]:
        fsam_training_step(m, cross_entropy, o, micro_batches=classification_batches(1, 8, seed=9))
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bf16_autocast_step_keeps_fp32_weights():
    model = tiny_mlp()
    start = copy.deepcopy(model)
    optimizer = make_optimizer(model.parameters(), lr=1e-2, rho=0.1)
    seen = []
    model.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    loss = fsam_training_step(
        model, cross_entropy, optimizer, micro_batches=classification_batches(2, 4), autocast_dtype=torch.bfloat16
    )
    assert math.isfinite(loss) and seen == [torch.bfloat16] * 4
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(model[0].weight, start[0].weight)


def test_training_step_refuses_what_it_cannot_do_right():
    model = tiny_mlp()
    batches = classification_batches(1, 4)
    fsam = make_optimizer(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="fp16"):
        fsam_training_step(
            model,
            cross_entropy,
            fsam,
            micro_batches=batches,
            accelerator=SimpleNamespace(scaler=object(), gradient_accumulation_steps=1),
        )
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        fsam_training_step(
            model,
            cross_entropy,
            fsam,
            micro_batches=batches,
            accelerator=SimpleNamespace(scaler=None, gradient_accumulation_steps=4),
        )
    with pytest.raises(TypeError, match="FSAM"):
        fsam_training_step(model, cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), micro_batches=batches)
    with pytest.raises(RuntimeError, match="without first_step"):
        fsam.second_step()
    with pytest.raises(ValueError, match="closure"):
        fsam.step()


def test_make_optimizer():
    params = list(tiny_mlp().parameters())
    adamw = make_optimizer(params, kind="adamw", lr=1e-3, weight_decay=0.01)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.01
    fsam = make_optimizer(params, lr=1e-3, weight_decay=0.01, rho=0.1, lmbd=0.5)
    assert isinstance(fsam, FSAM) and type(fsam.base_optimizer) is torch.optim.AdamW
    group = fsam.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["rho"], group["lmbd"], group["sigma"]) == (
        1e-3,
        0.01,
        0.1,
        0.5,
        1.0,
    )
    for bad in [dict(kind="sgd"), dict(kind="adamw", rho=0.1), dict(kind="fsam", momentum=0.9)]:
        with pytest.raises(ValueError, match="make_optimizer"):
            make_optimizer(params, lr=1e-3, **bad)


# ---------------------------------------------------------------------------------------------------
# Accelerate: each scenario runs in its own interpreter (this file as a script)


def run_script(scenario: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, __file__, scenario], cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S
    )
    assert result.returncode == 0 and f"{scenario} OK" in result.stdout, result.stdout + result.stderr


@pytest.mark.slow
def test_accelerate_prepared_optimizer_bf16():
    run_script("accelerate-bf16")


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_weights():
    run_script("accelerate-ddp")


def scenario_accelerate_bf16() -> None:
    """A prepared (wrapped) FSAM under bf16 autocast does what the bare one does under torch.autocast."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model, reference = tiny_mlp(), tiny_mlp()
    optimizer = make_optimizer(model.parameters(), lr=1e-2, rho=0.1)
    reference_optimizer = make_optimizer(reference.parameters(), lr=1e-2, rho=0.1)
    model, prepared = accelerator.prepare(model, optimizer)
    assert isinstance(prepared, AcceleratedOptimizer) and unwrap_fsam(prepared) is optimizer
    assert optimizer.base_optimizer.param_groups is optimizer.param_groups
    for seed in range(3):
        batches = classification_batches(2, 4, seed=seed)
        loss = fsam_training_step(model, cross_entropy, prepared, micro_batches=batches, accelerator=accelerator)
        expected = fsam_training_step(
            reference, cross_entropy, reference_optimizer, micro_batches=batches, autocast_dtype=torch.bfloat16
        )
        assert abs(loss - expected) < 1e-3, (loss, expected)
    for p, q in zip(accelerator.unwrap_model(model).parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    assert not torch.equal(reference[0].weight, tiny_mlp()[0].weight)
    assert all("ema" in optimizer.state[p] for p in model.parameters())


def ddp_worker() -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    model = tiny_mlp()
    optimizer = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.1)
    model, prepared = accelerator.prepare(model, optimizer)
    assert isinstance(model, nn.parallel.DistributedDataParallel)

    # emulation of the documented semantics: each rank perturbs along its own gradient,
    # the update uses the average of the gradients taken at the perturbed points
    replicas = [tiny_mlp() for _ in range(world)]
    replica_optimizers = [FSAM(r.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.1) for r in replicas]

    for step in range(3):
        data = {r: classification_batches(2, 4, seed=100 * step + r) for r in range(world)}
        fsam_training_step(model, cross_entropy, prepared, micro_batches=data[rank], accelerator=accelerator)

        for r, (replica, opt) in enumerate(zip(replicas, replica_optimizers, strict=True)):
            opt.zero_grad()
            for batch in data[r]:
                (cross_entropy(replica, batch) / 2).backward()
            opt.first_step(zero_grad=True)
            for batch in data[r]:
                (cross_entropy(replica, batch) / 2).backward()
        with torch.no_grad():
            for params in zip(*(r.parameters() for r in replicas), strict=True):
                mean = torch.stack([p.grad for p in params]).mean(0)
                for p in params:
                    p.grad = mean.clone()
        for opt in replica_optimizers:
            opt.second_step(zero_grad=True)

    weights = torch.cat([p.detach().flatten() for p in accelerator.unwrap_model(model).parameters()])
    gathered = accelerator.gather(weights[None])
    assert torch.equal(gathered[0], gathered[1]), "ranks disagree"
    expected = torch.cat([p.detach().flatten() for p in replicas[0].parameters()])
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=1e-5)
    assert not torch.equal(weights, torch.cat([p.flatten() for p in tiny_mlp().parameters()]))
    ema = torch.cat([optimizer.state[p]["ema"].flatten() for p in accelerator.unwrap_model(model).parameters()])
    gathered_ema = accelerator.gather(ema[None])
    assert not torch.equal(gathered_ema[0], gathered_ema[1]), "first pass was synchronised"


def scenario_accelerate_ddp() -> None:
    from accelerate import debug_launcher

    debug_launcher(ddp_worker, num_processes=2)


if __name__ == "__main__":
    scenario = sys.argv[1]
    {"accelerate-bf16": scenario_accelerate_bf16, "accelerate-ddp": scenario_accelerate_ddp}[scenario]()
    print(f"{scenario} OK")
