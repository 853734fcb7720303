"""Head training on cached features: one explicit loop through Accelerate.

AdamW, timm's cosine schedule with warmup (stepped per update), timm's ModelEmaV3 with warmup,
class-weighted cross-entropy (weights kept under label smoothing), early stopping on the validation
split, selection of the best EMA weights. Seeded and deterministic on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .comparison import mcc_from_counts
from .config import describe_fields
from .fingerprint import fingerprint, sha256_file
from .heads import FeatureView, HeadConfig, SelectiveHead, build_head, positive_probability
from .loop import EarlyStopping, LogFn, cosine_schedule, judged_model, no_log, weight_ema
from .losses import class_weighted_ce, class_weights_from_labels, risk_aware_loss, selectivenet_loss
from .selection import (
    Candidate,
    SelectionConfig,
    balanced_brier,
    capped_rows,
    fold_count,
    select_candidate,
    selection_criterion,
    stratified_folds,
)
from .storage import atomic_dir

log = logging.getLogger(__name__)

@describe_fields
@dataclass(frozen=True)
class TrainConfig:
    # passes over the train split (early stopping may end sooner)
    epochs: int = 40
    # feature vectors per optimizer step
    batch_size: int = 128
    # peak learning rate of AdamW after warmup
    lr: float = 1e-3
    # AdamW decoupled weight decay
    weight_decay: float = 0.05
    # linear warmup length, in epochs (converted to optimizer steps)
    warmup_epochs: float = 2.0
    # floor of the cosine schedule
    min_lr: float = 1e-6
    # label smoothing of the cross-entropy; class weights still apply
    label_smoothing: float = 0.1
    # weight classes by inverse frequency in the train split
    class_weighting: bool = True
    # EMA of the weights (timm ModelEmaV3); 0 disables it
    ema_decay: float = 0.995
    # EMA warmup: the effective decay ramps up over the first steps
    ema_warmup: bool = True
    # stop after this many epochs past the LR warmup without a better val score (class-balanced Brier)
    patience: int = 8
    # seed of initialisation and batch order
    seed: int = 0
    # ce (class-weighted cross-entropy) or risk_aware (cost-weighted focal loss that punishes confident
    # missed roadwork fn_cost times more than confident false alarms; docs/selective.md); the selective
    # head always trains with the SelectiveNet loss
    loss: Literal["ce", "risk_aware"] = "ce"
    fn_cost: float = 5.0  # risk_aware loss: cost of a confident miss relative to a false alarm

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.min_lr < 0:
            raise ValueError("lr must be > 0; weight_decay and min_lr >= 0")
        if not 0.0 <= self.label_smoothing < 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("label_smoothing and ema_decay must be in [0, 1)")
        if self.patience < 1 or self.warmup_epochs < 0:
            raise ValueError("patience must be >= 1 and warmup_epochs >= 0")
        if self.loss not in ("ce", "risk_aware") or self.fn_cost <= 0:
            raise ValueError(f"loss must be 'ce' or 'risk_aware' and fn_cost > 0, got {self.loss!r}, {self.fn_cost}")


@dataclass
class TrainedHead:
    model: nn.Module  # the chosen weights (EMA when enabled), on CPU, eval mode
    head: HeadConfig
    in_dim: int  # dimension of the stored features the head reads (its view may use part of them)
    history: list[dict[str, float]]  # per epoch, of the chosen candidate
    best_epoch: int  # the chosen epoch of the chosen candidate
    kind: str = "mlp"  # the concrete kind of `model`
    view: FeatureView | None = None
    # every candidate trained: kind, lr, weight_decay, view, best_epoch, epochs_run, val metrics at
    # its best epoch; the chosen one has chosen=True
    grid: list[dict[str, Any]] = field(default_factory=list)
    criterion: str = ""


def _check_inputs(name: str, x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"{name}: features {x.shape} and labels {y.shape} do not match")
    if len(x) == 0:
        raise ValueError(f"{name} split is empty")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} features contain NaN or inf")
    if set(np.unique(y).tolist()) != {0, 1}:
        raise ValueError(f"{name} split needs both classes, has labels {sorted(set(np.unique(y).tolist()))}")


def head_loss(model: nn.Module, head: HeadConfig, x: torch.Tensor, y: torch.Tensor, *,
              class_weights: torch.Tensor | None, label_smoothing: float = 0.0, loss: str = "ce",
              fn_cost: float = 5.0, kind: str | None = None) -> torch.Tensor:
    """The training loss of a head kind (`kind`, default the config's): class-weighted CE (with label
    smoothing) or the class-weighted risk-aware loss, or for the selective head the SelectiveNet loss
    on plain class-weighted CE (docs/selective.md). `class_weights=None` means unweighted."""
    if (kind or head.kind) == "selective":
        cls, gate, aux = model(x, return_all=True)
        loss, _ = selectivenet_loss(cls, gate, aux, y, coverage=head.target_coverage, lam=head.coverage_lambda,
                                    alpha=head.selective_alpha, class_weights=class_weights)
        return loss
    if loss == "risk_aware":
        return risk_aware_loss(model(x), y, fn_cost=fn_cost, class_weights=class_weights)
    return class_weighted_ce(model(x), y, class_weights=class_weights, label_smoothing=label_smoothing)


def head_grid(head: HeadConfig, config: TrainConfig, selection: SelectionConfig, views: Sequence[FeatureView], *,
              needs_gate: bool = False) -> list[Candidate]:
    """The candidates: per feature view and head kind, linear heads for each C (solved exactly; with
    the risk-aware loss, which has no exact solver here, they train like the others) and AdamW heads
    for each learning rate x weight decay. One AdamW candidate when selection is off."""
    kinds = head.kinds(selection=selection.enabled, needs_gate=needs_gate)
    if not selection.enabled:
        return [Candidate(kinds[0], views[0], lr=config.lr, weight_decay=config.weight_decay)]
    if not selection.pooling_views:
        views = views[:1]
    out = []
    for view in views:
        for kind in kinds:
            if kind == "linear" and config.loss == "ce":
                out += [Candidate(kind, view, c=c) for c in selection.linear_c]
            else:
                out += [Candidate(kind, view, lr=config.lr * f_lr, weight_decay=config.weight_decay * f_wd)
                        for f_lr in selection.lr_factors for f_wd in selection.weight_decay_factors]
    return out


def fit_head(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    head: HeadConfig = HeadConfig(),
    config: TrainConfig = TrainConfig(),
    selection: SelectionConfig = SelectionConfig(),
    views: Sequence[FeatureView] | None = None,
    needs_gate: bool = False,
    log_fn: LogFn = no_log,
) -> TrainedHead:
    """Train every candidate of the head grid (`head_grid`) and keep the best on val.

    Each candidate is scored on val by `balanced_brier`: AdamW heads after every epoch, competing with
    their last epoch (`selection.adamw_epoch="last"`) or their best eligible one ("best"); exactly
    solved linear heads once. `select_candidate` then picks the simplest candidate within one standard
    error of the best. With selection off this is one head, early-stopped on the same criterion.
    """
    _check_inputs("train", train_x, train_y)
    _check_inputs("val", val_x, val_y)
    in_dim = int(train_x.shape[1])
    views = list(views) if views else [FeatureView("all", 0, in_dim)]
    candidates = head_grid(head, config, selection, views, needs_gate=needs_gate)
    xt = torch.as_tensor(train_x, dtype=torch.float32)
    xv = torch.as_tensor(val_x, dtype=torch.float32)
    yt, yv = np.asarray(train_y), np.asarray(val_y)
    # the grid's rows: all of train, or a stratified subsample of selection.max_rows (its cost is then
    # bounded); the chosen head is fitted on all rows afterwards
    rows = capped_rows(yt, selection.max_rows, config.seed) if selection.enabled else None
    xs, ys = (xt, yt) if rows is None else (xt[torch.as_tensor(rows)], yt[rows])
    results: dict[int, dict[str, Any]] = {}
    exact = [i for i, c in enumerate(candidates) if c.exact]
    looped = [i for i, c in enumerate(candidates) if not c.exact]
    if exact:
        results.update(_fit_exact_linear(xs, ys, xv, yv, candidates, exact, class_weighting=config.class_weighting,
                                         cv_folds=selection.cv_folds, seed=config.seed))
    rungs = _halving_rungs(selection, config, len(looped))
    if looped:
        results.update(_fit_adamw(xs, ys, xv, yv, candidates, looped, head=head, config=config, log_fn=log_fn,
                                  last_epoch=selection.enabled and selection.adamw_epoch == "last", rungs=rungs))

    pruned = [results[i].get("pruned") is not None for i in range(len(candidates))]
    eligible = [results[i].get("eligible", True) and not pruned[i] for i in range(len(candidates))]
    competed = sum(eligible) + sum(pruned)
    chosen, ses = select_candidate(candidates, [results[i]["val_p"] for i in range(len(candidates))], yv,
                                   eligible=eligible, competed=competed)
    c, won = candidates[chosen], results[chosen]
    refitted = None
    if selection.enabled and (selection.refit or rows is not None):
        x_all, y_all = (torch.cat([xt, xv]), np.concatenate([yt, yv])) if selection.refit else (xt, yt)
        refitted = _refit(candidates, chosen, x_all, y_all, xv, yv, head=head, config=config, selection=selection)
    final = build_head(head, in_dim, kind=c.kind, view=c.view)
    final.load_state_dict(refitted["state"] if refitted else won["state"])
    final.eval()
    grid = [{"kind": cand.kind, "view": cand.view.name, "lr": cand.lr, "weight_decay": cand.weight_decay,
             "c": cand.c, "best_epoch": results[i]["epoch"], "epochs_run": len(results[i]["history"]),
             "chosen": i == chosen, "eligible": eligible[i], "pruned_after_epoch": results[i].get("pruned"),
             "val_brier_se": ses[i],
             "cv_brier": results[i]["row"].get("cv_brier"), **{k: results[i]["row"][k] for k in VAL_KEYS}}
            for i, cand in enumerate(candidates)]
    if refitted:
        grid[chosen].update({f"refit_{k}": v for k, v in refitted["summary"].items()})
    if len(candidates) > 1:
        log.info("head selection: %s chosen of %d candidates (val Brier %.4f, epoch %d)", c.label(),
                 len(candidates), won["score"], won["epoch"])
    return TrainedHead(model=final, head=head, in_dim=in_dim, history=won["history"], best_epoch=won["epoch"],
                       kind=c.kind, view=c.view, grid=grid,
                       criterion=selection_criterion(selection, competed,
                                                     grid_rows=None if rows is None else (len(rows), len(yt)),
                                                     rungs=rungs))


def _halving_rungs(selection: SelectionConfig, config: TrainConfig, n_adamw: int) -> dict[int, int]:
    """Successive halving of the AdamW candidates: {epoch (0-based): how many train on after it}.

    The first rung comes after `selection.adamw_prune_at` of the epochs (and at least one epoch past the
    LR warmup) and keeps the best `selection.adamw_keep`; then, each time the epochs done double, the
    survivors halve (rounded up) until one is left. A rung needs an epoch after it. Empty: no pruning
    (off, judged at their best epoch, or no more candidates than `adamw_keep`)."""
    if (not selection.enabled or selection.adamw_epoch != "last" or selection.adamw_prune_at <= 0
            or n_adamw <= selection.adamw_keep):
        return {}
    rungs: dict[int, int] = {}
    done = max(math.ceil(selection.adamw_prune_at * config.epochs), math.ceil(config.warmup_epochs) + 1)
    keep = selection.adamw_keep
    while done < config.epochs:
        rungs[done - 1] = keep
        if keep == 1:
            break
        done, keep = 2 * done, math.ceil(keep / 2)
    return rungs


VAL_KEYS = ("val_brier", "val_loss", "val_accuracy", "val_mcc")


def _refit(candidates: Sequence[Candidate], chosen: int, x: torch.Tensor, y: np.ndarray, xv: torch.Tensor,
           yv: np.ndarray, *, head: HeadConfig, config: TrainConfig, selection: SelectionConfig
           ) -> dict[str, Any] | None:
    """The chosen candidate fitted again on `x` (train + val with `SelectionConfig.refit`, else all of
    train when the grid saw a subsample): its weights and a summary for the grid table (images, and the
    C the cross-validation on these rows chose). None for an AdamW head judged at its best epoch. The
    val scores in the table stay those of the selection."""
    c = candidates[chosen]
    if not c.exact and selection.adamw_epoch != "last":
        return None
    if c.exact:  # the C path of this view again, cross-validated on (at most max_rows of) these rows
        members = [i for i, other in enumerate(candidates) if other.exact and other.view == c.view]
        fitted = _fit_exact_linear(x, y, xv, yv, candidates, members, class_weighting=config.class_weighting,
                                   cv_folds=selection.cv_folds, seed=config.seed, cv_rows=selection.max_rows,
                                   chosen_only=True)
        (pick,) = fitted
        return {"state": fitted[pick]["state"], "summary": {"images": int(len(y)), "c": candidates[pick].c}}
    fitted = _fit_adamw(x, y, xv, yv, candidates, [chosen], head=head, config=config, log_fn=no_log,
                        last_epoch=True)[chosen]
    return {"state": fitted["state"], "summary": {"images": int(len(y)), "epochs": len(fitted["history"])}}


def _score(model: nn.Module, head: HeadConfig, kind: str, xv: torch.Tensor, yv: np.ndarray,
           val_weights: torch.Tensor) -> dict[str, Any]:
    """Val metrics of one head (the selection criterion and what the grid table shows) and its val
    probabilities (`val_p`, for the one-standard-error rule)."""
    with torch.no_grad():
        logits = model(xv)
        p = positive_probability(logits).double().cpu().numpy()
        y = torch.as_tensor(yv, dtype=torch.long, device=xv.device)
        loss = float(head_loss(model, head, xv, y, class_weights=val_weights, kind=kind) if kind == "selective"
                     else class_weighted_ce(logits, y, class_weights=val_weights))  # the logits of this forward
    return {"val_brier": balanced_brier(p, yv), "val_loss": loss, "val_accuracy": float(np.mean((p >= 0.5) == yv)),
            "val_mcc": _mcc(p >= 0.5, yv), "val_p": p}


def _fit_exact_linear(xt: torch.Tensor, yt: np.ndarray, xv: torch.Tensor, yv: np.ndarray,
                      candidates: Sequence[Candidate], indices: Sequence[int], *, class_weighting: bool,
                      cv_folds: int, seed: int, cv_rows: int = 0, chosen_only: bool = False
                      ) -> dict[int, dict[str, Any]]:
    """Linear heads as L2-regularised (class-weighted) logistic regressions on the standardised
    features, solved to a gradient tolerance of `LINEAR_TOL` (`stage1core.logistic`: every fold and C
    of a view solved side by side), then copied into a LinearHead: logits (-s/2, s/2) give softmax
    p(roadwork) = sigmoid(s), s = w.z + b.

    Per feature view, C is chosen by stratified k-fold cross-validation on train (mean balanced
    Brier score; on a stratified subsample of `cv_rows` rows when there are more): for a convex model
    that is cheap and far less noisy than the val split, which then only judges the CV-chosen linear
    head against the AdamW heads. The other C values are fitted on all rows for the grid table but are
    not eligible (`eligible=False`); with `chosen_only` only the chosen C is fitted and returned."""
    from .logistic import balanced_weights, fit_logistic_batch

    head = HeadConfig(kind="linear")
    val_weights = class_weights_from_labels(yv)
    out: dict[int, dict[str, Any]] = {}
    by_view: dict[FeatureView, list[int]] = {}
    for i in indices:
        by_view.setdefault(candidates[i].view, []).append(i)
    for view, members in by_view.items():
        members = sorted(members, key=lambda j: candidates[j].c)
        cs = [candidates[j].c for j in members]
        model = build_head(head, int(xt.shape[1]), kind="linear", view=view)
        model.norm.set_stats(xt)
        with torch.no_grad():
            z = model.norm(xt).double().numpy()
        sub = capped_rows(yt, cv_rows, seed)
        zc, yc = (z, yt) if sub is None else (z[sub], yt[sub])
        folds = fold_count(yc, cv_folds)  # of the rows it splits
        if folds < 2:
            raise ValueError(f"head selection: the linear heads' C cross-validation needs at least 2 images of "
                             f"each class in the rows it splits, has {folds} of one class ({len(yc)} rows)")
        splits = stratified_folds(yc, folds, seed)
        fits = fit_logistic_batch(zc, yc, np.stack([balanced_weights(yc, fit_rows, balanced=class_weighting)
                                                    for fit_rows, _ in splits for _ in cs]),
                                  np.array([c for _ in splits for c in cs]), tol=LINEAR_TOL)
        cv = np.zeros(len(cs))
        for f, (_, held) in enumerate(splits):
            for k in range(len(cs)):
                cv[k] += balanced_brier(fits.probability(f * len(cs) + k, zc[held]), yc[held]) / folds
        best = int(np.argmin(cv))  # ties: the smaller C (stronger L2)
        kept = [best] if chosen_only else list(range(len(cs)))
        full = fit_logistic_batch(z, yt, np.stack([balanced_weights(yt, balanced=class_weighting)] * len(kept)),
                                  np.array([cs[k] for k in kept]), tol=LINEAR_TOL)
        for slot, k in enumerate(kept):
            _set_linear(model, full.coef[slot], full.intercept[slot])
            row = {"epoch": 0, "step": int(full.n_iter[slot]), "cv_brier": float(cv[k]),
                   **_score(model, head, "linear", xv, yv, val_weights)}
            val_p = row.pop("val_p")
            state = {name: v.detach().clone() for name, v in model.state_dict().items()}
            out[members[k]] = {"score": row["val_brier"], "epoch": 0, "state": state, "row": row, "history": [row],
                               "val_p": val_p, "eligible": k == best}
    return out


# gradient tolerance of the linear heads' solver (largest entry of the gradient of scikit-learn's
# scaled objective): scikit-learn's default of 1e-4 left fitted probabilities up to 0.09 away from the
# optimum in the C cross-validation on 843 demo images x 1,280 features, 1e-6 about 1e-3
# (bench/head_training.py part D)
LINEAR_TOL = 1e-6


def _set_linear(model: nn.Module, coef: np.ndarray, intercept: float) -> None:
    """Copy a binary logistic regression (w, b) into a LinearHead (eval mode): logits (-s/2, s/2) with
    s = w.z + b give softmax p(roadwork) = sigmoid(s)."""
    w = torch.as_tensor(coef, dtype=torch.float32)
    b = float(intercept)
    with torch.no_grad():
        model.fc.weight.copy_(torch.stack([-w / 2, w / 2]))
        model.fc.bias.copy_(torch.tensor([-b / 2, b / 2]))
    model.eval()


# one explicit training loop (set-up, epochs, per-candidate scoring and keep rule), read top to bottom
def _fit_adamw(xt: torch.Tensor, yt: np.ndarray, xv: torch.Tensor, yv: np.ndarray,
               candidates: Sequence[Candidate], indices: Sequence[int], *, head: HeadConfig,
               config: TrainConfig, log_fn: LogFn, last_epoch: bool = False, rungs: dict[int, int] | None = None
               ) -> dict[int, dict[str, Any]]:
    """The AdamW candidates trained side by side: the same shuffled batches, one parameter group per
    candidate (its lr and weight decay) under one cosine schedule with warmup, one EMA per candidate.

    After every epoch each candidate's EMA weights are scored on val and its `EarlyStopping` decides
    (the rule `fit_backbone` uses too): epochs that end inside the LR warmup are not eligible, and a
    candidate stops after `config.patience` eligible epochs without a better score; the loop ends
    when all have stopped (a stopped candidate's parameters get no gradient, so AdamW skips them).
    With `last_epoch`, every candidate trains the whole schedule and its last epoch is the one kept
    (no early stopping): each candidate then brings one val score to the comparison. With `rungs`
    (successive halving, Jamieson & Talwalkar 2016; `_halving_rungs`), after each rung's epoch only
    its number of candidates with the best val scores go on; the others keep that epoch's weights and
    score, marked `pruned` with that epoch.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    set_seed(config.seed)
    accelerator = Accelerator()
    device = accelerator.device
    heads = nn.ModuleList([build_head(head, int(xt.shape[1]), kind=candidates[i].kind, view=candidates[i].view)
                           for i in indices])
    for module in heads:
        module.norm.set_stats(xt)
    optimizer = torch.optim.AdamW([
        {"params": list(m.parameters()), "lr": candidates[i].lr, "weight_decay": candidates[i].weight_decay}
        for m, i in zip(heads, indices, strict=True)],
        # on CPU one fused kernel over all parameters instead of torch's per-tensor default (the same
        # update rule; 1.03-1.24x faster for the grid's 6 MLPs, bench/head_training.py part C); on GPUs
        # torch's default (foreach), which no GPU run here has replaced untested
        fused=True if device.type == "cpu" else None)
    loader = DataLoader(TensorDataset(xt, torch.as_tensor(yt, dtype=torch.long)), batch_size=config.batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(config.seed))
    steps_per_epoch = len(loader)
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    scheduler = cosine_schedule(optimizer, total_steps=config.epochs * steps_per_epoch, warmup_steps=warmup_steps,
                                min_lr=config.min_lr)
    heads, optimizer, loader = accelerator.prepare(heads, optimizer, loader)
    plain = accelerator.unwrap_model(heads)
    # one EMA per candidate, so that a stopped or pruned candidate's frozen weights are not averaged on
    emas = [weight_ema(module, decay=config.ema_decay, warmup=config.ema_warmup) for module in plain]
    train_weights = class_weights_from_labels(yt).to(device) if config.class_weighting else None
    val_weights = class_weights_from_labels(yv).to(device)
    xv = xv.to(device)

    n = len(indices)
    rungs = rungs or {}
    kinds = [candidates[i].kind for i in indices]
    stopping = [EarlyStopping(patience=config.patience, warmup_steps=warmup_steps) for _ in range(n)]
    best: list[dict[str, Any]] = [
        {"score": float("inf"), "epoch": -1, "state": None, "row": None, "history": [], "val_p": None}
        for _ in range(n)]
    step = 0
    for epoch in range(config.epochs):
        plain.train()
        active = [not s.stopped for s in stopping]
        running, seen = np.zeros(n), 0
        for xb, yb in loader:
            losses = [head_loss(plain[j], head, xb, yb, class_weights=train_weights, kind=kinds[j],
                                label_smoothing=config.label_smoothing, loss=config.loss, fn_cost=config.fn_cost)
                      if active[j] else None for j in range(n)]
            accelerator.backward(torch.stack([v for v in losses if v is not None]).sum())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            scheduler.step_update(step)
            for j in (j for j in range(n) if active[j] and emas[j] is not None):
                emas[j].update(plain[j], step=step)
            running += np.array([0.0 if v is None else float(v.detach()) for v in losses]) * len(yb)
            seen += len(yb)
        judged = [judged_model(plain[j], emas[j]) for j in range(n)]
        for j in (j for j in range(n) if active[j]):
            judged[j].eval()
            row = {"epoch": epoch, "step": step, "train_loss": running[j] / seen,
                   "lr": optimizer.param_groups[j]["lr"], **_score(judged[j], head, kinds[j], xv, yv, val_weights)}
            val_p = row.pop("val_p")
            best[j]["history"].append(row)
            final = epoch == config.epochs - 1
            kept = final or epoch in rungs if last_epoch else stopping[j].update(
                row["val_brier"], step=step, epoch=epoch, last=final)
            if kept:
                state = {k: v.detach().cpu().clone() for k, v in judged[j].state_dict().items()}
                best[j].update(score=row["val_brier"], epoch=epoch, state=state, row=row, val_p=val_p)
        if epoch in rungs:
            # a diverged candidate's NaN score ranks last
            ranked = sorted((j for j in range(n) if active[j]),
                            key=lambda j: (np.nan_to_num(best[j]["score"], nan=np.inf), j))
            for j in ranked[rungs[epoch]:]:
                stopping[j].stopped = True  # no loss and no gradient from here on: AdamW skips it
                best[j]["pruned"] = epoch
        # the curve logged per epoch: the best candidate's kept row so far or, when only the last epoch
        # is kept, the best of this epoch's rows (a pruned candidate has none after its rung)
        rows = ([best[j]["history"][-1] for j in range(n) if best[j]["history"]
                 and best[j]["history"][-1]["epoch"] == epoch] if last_epoch else
                [best[j]["row"] for j in range(n) if best[j]["row"] is not None])
        if rows:
            top = min(rows, key=lambda r: r["val_brier"])
            log_fn({"candidates_active": float(sum(not s.stopped for s in stopping)),
                    "best_val_brier": top["val_brier"], "best_val_accuracy": top["val_accuracy"]}, epoch)
        if all(s.stopped for s in stopping):
            break
    if device.type != "cpu":  # its gc.collect() costs ~0.2 s and frees nothing a return does not
        accelerator.free_memory()
    return dict(zip(indices, best, strict=True))


def _mcc(pred: np.ndarray, y: np.ndarray) -> float:
    """MCC from the confusion counts (scored after every epoch for every candidate: sklearn's input
    checks cost more than the head's forward pass here)."""
    pred, y = np.asarray(pred, dtype=bool), np.asarray(y, dtype=bool)
    return float(mcc_from_counts((pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum(), (~pred & ~y).sum()))


def head_outputs(model: nn.Module, features: np.ndarray, *, batch_size: int = 4096) -> dict[str, np.ndarray]:
    """Class logits (n, 2) for any head, plus the gate logit (n,) for a selective head."""
    model.eval()
    logits, gates = [], []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            xb = torch.as_tensor(features[start:start + batch_size], dtype=torch.float32)
            if isinstance(model, SelectiveHead):
                cls, gate, _ = model(xb, return_all=True)
                gates.append(gate.double().numpy())
            else:
                cls = model(xb)
            logits.append(cls.double().numpy())
    out = {"logits": np.concatenate(logits) if logits else np.zeros((0, 2))}
    if gates:
        out["gate_logit"] = np.concatenate(gates)
    return out


def predict_positive(model: nn.Module, features: np.ndarray, *, batch_size: int = 4096) -> np.ndarray:
    """p(roadwork) for cached features, as float64."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            xb = torch.as_tensor(features[start:start + batch_size], dtype=torch.float32)
            out.append(positive_probability(model(xb)).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


HEAD_WEIGHTS = "head.safetensors"
HEAD_META = "head.json"


def save_head(directory: str | Path, trained: TrainedHead, *, extra: dict[str, Any] | None = None) -> str:
    """Write head.safetensors + head.json atomically; return the weights' sha256."""
    from safetensors.torch import save_file

    directory = Path(directory)
    view = trained.view or FeatureView("all", 0, trained.in_dim)
    with atomic_dir(directory, replace=True) as tmp:
        save_file({k: v.contiguous() for k, v in trained.model.state_dict().items()}, str(tmp / HEAD_WEIGHTS))
        meta = {
            "head": dataclasses.asdict(trained.head), "kind": trained.kind, "in_dim": trained.in_dim,
            "view": dataclasses.asdict(view), "history": trained.history, "best_epoch": trained.best_epoch,
            "grid": trained.grid, "criterion": trained.criterion, **(extra or {}),
        }
        (tmp / HEAD_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return sha256_file(directory / HEAD_WEIGHTS)


def load_head(directory: str | Path) -> TrainedHead:
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = json.loads((directory / HEAD_META).read_text())
    head = HeadConfig(**meta["head"])
    # heads written before selection existed name their kind in the config and read every column
    kind = meta.get("kind", head.kind)
    view = FeatureView(**meta["view"]) if "view" in meta else FeatureView("all", 0, meta["in_dim"])
    model = build_head(head, meta["in_dim"], kind=kind, view=view)
    model.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)))
    model.eval()
    return TrainedHead(model=model, head=head, in_dim=meta["in_dim"], history=meta["history"],
                       best_epoch=meta["best_epoch"], kind=kind, view=view, grid=meta.get("grid", []),
                       criterion=meta.get("criterion", ""))


def head_fingerprint(features_fingerprint: str, split_fingerprint: str, head: HeadConfig,
                     config: TrainConfig, selection: SelectionConfig, *, needs_gate: bool = False) -> str:
    return fingerprint("head", features_fingerprint, split_fingerprint, head, config, selection, needs_gate)
