"""The F-SAM optimizer: the update against hand-computed steps, gradient accumulation, state, bf16,
and under Accelerate (one process, bf16) and 2-process DDP.

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
import torch
from torch import nn

from stage1core.fsam import FSAM, fsam_training_step, make_optimizer, unwrap_fsam
from tests.common import HANG_TIMEOUT_S

REPO = Path(__file__).resolve().parents[1]


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


def test_adamw_step_over_micro_batches_is_one_step_on_the_whole_batch():
    """adamw_training_step, F-SAM's plain counterpart in fit_backbone: the gradient of the mean loss over
    the step's micro-batches, clipped, one AdamW update."""
    from contextlib import nullcontext

    from stage1core.fsam import adamw_training_step

    stand_in = SimpleNamespace(no_sync=lambda model: nullcontext(), autocast=nullcontext,
                               backward=lambda loss: loss.backward(), clip_grad_norm_=nn.utils.clip_grad_norm_)
    batches = classification_batches(2, 4, dtype=torch.float64)
    full = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    models = [tiny_mlp(torch.float64) for _ in range(2)]
    optimizers = [make_optimizer(m.parameters(), kind="adamw", lr=0.05) for m in models]
    for _ in range(3):
        split = adamw_training_step(models[0], cross_entropy, optimizers[0], micro_batches=batches,
                                    accelerator=stand_in, max_grad_norm=0.5)
        whole = adamw_training_step(models[1], cross_entropy, optimizers[1], micro_batches=full,
                                    accelerator=stand_in, max_grad_norm=0.5)
        assert split == pytest.approx(whole, rel=1e-12)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        assert p.grad is None  # gradients are cleared after the step
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

    def step(*, scaler, gradient_accumulation_steps: int) -> None:
        accelerator = SimpleNamespace(scaler=scaler, gradient_accumulation_steps=gradient_accumulation_steps)
        fsam_training_step(model, cross_entropy, fsam, micro_batches=batches, accelerator=accelerator)

    with pytest.raises(ValueError, match="fp16"):
        step(scaler=object(), gradient_accumulation_steps=1)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        step(scaler=None, gradient_accumulation_steps=4)
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
