"""F-SAM: Friendly Sharpness-Aware Minimization (Li et al., CVPR 2024) around AdamW, for fine-tuning.

F-SAM perturbs the weights along the gradient minus an EMA of past gradients, then steps the base
optimizer with the gradient taken at the perturbed point. No maintained package implements it, so it
is written here (after the authors' reference code, github.com/nblt/F-SAM, `FriendlySAM` in utils.py).
`fsam_training_step` is one optimizer step of it with gradient accumulation, under Accelerate or DDP;
`make_optimizer` and `adamw_training_step` give plain AdamW the same two entry points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn


class FSAM(torch.optim.Optimizer):
    """Friendly Sharpness-Aware Minimization around a base optimizer.

    One step, with g the (accumulated) gradient at w and m the per-parameter EMA of past gradients:

        d   = g - sigma * m_prev          # first step ever: d = g and m = g
        m   = lmbd * m_prev + (1 - lmbd) * g
        eps = rho * d / ||d||             # one norm over all parameters; adaptive: rho * w^2 d / || |w| d ||
        w  <- w + eps                     first_step
        g' = gradient at w + eps          (caller)
        w  <- stored copy of w; base_optimizer.step() with g'     second_step

    Order of the EMA update: as in the authors' code (nblt/F-SAM, utils.py `FriendlySAM.first_step`)
    d subtracts the EMA *before* it absorbs the current gradient, and the EMA starts at the first
    gradient (not at zero), so the first perturbation is plain SAM's. Paper Algorithm 1 updates m first
    (d = g - sigma * m_t); the two differ from the second step on. The restore copies the stored tensor
    back (bitwise exact), it does not subtract eps. `param_groups` are shared with the base optimizer,
    so lr schedulers act on both; `state_dict` carries the base optimizer's state too.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer_cls: type[torch.optim.Optimizer],
        *,
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbd: float = 0.9,
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if not rho >= 0.0:
            raise ValueError(f"FSAM rho must be >= 0, got {rho}")
        if not math.isfinite(sigma):
            raise ValueError(f"FSAM sigma must be finite, got {sigma}")
        if not 0.0 <= lmbd <= 1.0:
            raise ValueError(f"FSAM lmbd (EMA decay) must be in [0, 1], got {lmbd}")
        self._fsam_defaults = dict(rho=rho, sigma=sigma, lmbd=lmbd, adaptive=adaptive)
        super().__init__(params, dict(self._fsam_defaults, **base_kwargs))
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._perturbed = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # during __init__
            super().add_param_group(param_group)
            return
        for key, value in self._fsam_defaults.items():
            param_group.setdefault(key, value)
        self.base_optimizer.add_param_group(param_group)

    def _perturbation_norm(self) -> torch.Tensor:
        norms = [
            ((p.abs() if group["adaptive"] else 1.0) * p.grad).norm(p=2)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not norms:
            raise RuntimeError("FSAM.first_step: no parameter has a gradient; run backward first")
        device = norms[0].device
        dtype = norms[0].dtype
        for n in norms[1:]:
            dtype = torch.promote_types(dtype, n.dtype)
        return torch.stack([n.to(device=device, dtype=dtype) for n in norms]).norm(p=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter with a gradient to w + eps (see the class docstring)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "ema" not in state:
                    state["ema"] = p.grad.detach().clone()
                else:
                    g = p.grad.detach().clone()
                    p.grad.sub_(state["ema"], alpha=group["sigma"])  # p.grad now holds d
                    state["ema"].mul_(group["lmbd"]).add_(g, alpha=1.0 - group["lmbd"])
        norm = self._perturbation_norm()
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                eps = (p * p if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                self.state[p]["old_p"] = p.detach().clone()
                p.add_(eps)
        self._perturbed = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the stored weights exactly, then step the base optimizer with the current gradient."""
        if not self._perturbed:
            raise RuntimeError("FSAM.second_step called without first_step")
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state[p].pop("old_p", None)
                if old is not None:
                    p.copy_(old)
        self._perturbed = False
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Full F-SAM step. `closure` runs forward and backward and returns the loss; it is called twice.

        Gradients are zeroed before each call. Returns the loss at the unperturbed weights.
        """
        if closure is None:
            raise ValueError(
                "FSAM.step needs a closure (forward + backward, returns the loss); "
                "or call first_step/second_step, as fsam_training_step does"
            )
        closure = torch.enable_grad()(closure)
        self.zero_grad()
        loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["base_optimizer"] = self.base_optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        base_state = state_dict.pop("base_optimizer", None)
        super().load_state_dict(state_dict)
        if base_state is not None:
            self.base_optimizer.load_state_dict(base_state)
        self.base_optimizer.param_groups = self.param_groups


def make_optimizer(
    params: Iterable[Any],
    *,
    kind: str = "fsam",
    lr: float,
    weight_decay: float = 0.05,
    **fsam_kwargs: Any,
) -> torch.optim.Optimizer:
    """AdamW, or F-SAM with AdamW as base. `fsam_kwargs`: rho, sigma, lmbd, adaptive (F-SAM only)."""
    if kind == "adamw":
        if fsam_kwargs:
            raise ValueError(f"make_optimizer(kind='adamw') takes no F-SAM options: {sorted(fsam_kwargs)}")
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "fsam":
        unknown = set(fsam_kwargs) - {"rho", "sigma", "lmbd", "adaptive"}
        if unknown:
            raise ValueError(f"make_optimizer: unknown F-SAM options {sorted(unknown)}")
        return FSAM(params, torch.optim.AdamW, lr=lr, weight_decay=weight_decay, **fsam_kwargs)
    raise ValueError(f"make_optimizer: kind must be 'fsam' or 'adamw', got {kind!r}")


def unwrap_fsam(optimizer: torch.optim.Optimizer) -> FSAM:
    """The FSAM inside `optimizer` (Accelerate's AcceleratedOptimizer keeps it as `.optimizer`)."""
    inner: Any = optimizer
    for _ in range(8):
        if isinstance(inner, FSAM):
            return inner
        if not hasattr(inner, "optimizer"):
            break
        inner = inner.optimizer
    raise TypeError(f"expected an FSAM optimizer (possibly prepared by Accelerate), got {type(optimizer).__name__}")


def _no_sync(model: nn.Module, accelerator: Any):
    if accelerator is not None:
        return accelerator.no_sync(model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return nullcontext()


def _autocast(model: nn.Module, accelerator: Any, dtype: torch.dtype | None):
    if accelerator is not None:
        return accelerator.autocast()
    if dtype is None:
        return nullcontext()
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type=device_type, dtype=dtype)


def fsam_training_step(
    model: nn.Module,
    batch_fn: Callable[[nn.Module, Any], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    micro_batches: Sequence[Any],
    accelerator: Any = None,
    autocast_dtype: torch.dtype | None = None,
    max_grad_norm: float | None = None,
) -> float:
    """One F-SAM optimizer step over `micro_batches`; returns the mean loss at the unperturbed weights.

    `batch_fn(model, micro_batch)` returns the mean loss of one micro-batch; gradients the caller left
    on the parameters are discarded first. Gradient accumulation:
    both passes run over all micro-batches with loss / len(micro_batches), so each pass accumulates the
    gradient of the mean loss; the weights are perturbed once, between the passes, and the base optimizer
    steps once. Under DDP the first pass runs entirely inside `no_sync` (each rank perturbs along its
    own gradient, as SAM's m-sharpness and the usual DDP SAM recipe do; this also skips an all-reduce);
    the second pass syncs on its last micro-batch, so every rank steps with the same averaged gradient
    from the same restored weights and the replicas stay identical.

    `optimizer` is an FSAM or an Accelerate-prepared one. With `accelerator`, backward and autocast go
    through it (mixed_precision "bf16" or "no"); fp16 with a GradScaler is refused, since the scaled
    gradient would be used unscaled. Create the Accelerator with gradient_accumulation_steps=1: this
    function accumulates itself. Without `accelerator`, `autocast_dtype` (e.g. torch.bfloat16) turns on
    torch.autocast. `max_grad_norm` clips the gradient used for the update (second pass).
    """
    fsam = unwrap_fsam(optimizer)
    micro_batches = list(micro_batches)
    if not micro_batches:
        raise ValueError("fsam_training_step: micro_batches is empty")
    if accelerator is not None:
        if getattr(accelerator, "scaler", None) is not None:
            raise ValueError(
                "fsam_training_step: fp16 with a GradScaler is not supported; "
                "use Accelerator(mixed_precision='bf16') or 'no'"
            )
        if getattr(accelerator, "gradient_accumulation_steps", 1) != 1:
            raise ValueError(
                "fsam_training_step accumulates over micro_batches itself; create the Accelerator with "
                f"gradient_accumulation_steps=1 (got {accelerator.gradient_accumulation_steps})"
            )
    count = len(micro_batches)

    def forward_backward(batch: Any) -> torch.Tensor:
        with _autocast(model, accelerator, autocast_dtype):
            loss = batch_fn(model, batch) / count
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        return loss.detach()

    fsam.zero_grad(set_to_none=True)
    total = 0.0
    for batch in micro_batches:
        with _no_sync(model, accelerator):
            total += float(forward_backward(batch))
    fsam.first_step(zero_grad=True)
    for index, batch in enumerate(micro_batches):
        context = _no_sync(model, accelerator) if index < count - 1 else nullcontext()
        with context:
            forward_backward(batch)
    if max_grad_norm is not None:
        params = [p for group in fsam.param_groups for p in group["params"]]
        if accelerator is not None:
            accelerator.clip_grad_norm_(params, max_grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    fsam.second_step(zero_grad=True)
    return float(total)


def adamw_training_step(model: nn.Module, batch_fn: Callable[[nn.Module, Any], torch.Tensor],
                        optimizer: torch.optim.Optimizer, *, micro_batches: Sequence[Any], accelerator: Any,
                        max_grad_norm: float | None = None) -> float:
    """`fsam_training_step` for a plain optimizer (AdamW from `make_optimizer`): one step over
    `micro_batches` with the gradient of their mean loss; DDP syncs on the last one. Returns the loss."""
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
