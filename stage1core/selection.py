"""Head selection: the grid's candidates, the validation criterion and the rule that picks one.

The criterion is the class-balanced Brier score (`balanced_brier`); `select_candidate` applies the
one-standard-error rule with an allowance that grows with the number of candidates
(`standard_errors_allowed`). docs/selection.md explains each choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .config import describe_fields
from .heads import FeatureView


@describe_fields
@dataclass(frozen=True)
class SelectionConfig:
    """Head selection on cached features, as DINOv3's linear evaluation does it: a small grid of heads,
    the best kept by a bounded validation criterion (class-balanced Brier score; docs/selection.md)."""

    # train the grid and keep the best head; off: one head trained with train.lr and train.weight_decay
    enabled: bool = True
    # MLP and selective heads (AdamW, trained side by side on the same batches): learning rates tried,
    # train.lr times each factor
    lr_factors: tuple[float, ...] = (0.3, 1.0, 3.0)
    # ... and AdamW weight decays tried, train.weight_decay times each factor
    weight_decay_factors: tuple[float, ...] = (1.0, 10.0)
    # linear heads: the convex problem is solved exactly (L-BFGS) for each inverse L2 strength C
    # (scikit-learn's convention: sum of the per-image losses + |w|^2 / (2C)); no learning rate applies
    linear_c: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    # ... and C is chosen per feature view by this many folds of cross-validation on train
    cv_folds: int = 5
    # with cls+avg features, also try the CLS token alone and the patch mean alone
    pooling_views: bool = True
    # the grid trains (and C is cross-validated) on a class-stratified random subsample of at most this
    # many train rows, so that its cost stops growing with the data; the chosen head is then fitted on
    # all rows (train + val with refit, all of train without). 0: no cap
    max_rows: int = 4000

    # which epoch of an AdamW candidate competes: "last" (the end of its cosine schedule, EMA weights:
    # one val score per candidate, as the exactly solved linear heads have) or "best" (its best eligible
    # epoch; the minimum over ~40 noisy val scores flatters AdamW heads against the linear ones)
    adamw_epoch: Literal["last", "best"] = "last"
    # successive halving of the AdamW candidates (with adamw_epoch="last"): after this fraction of the
    # epochs they are ranked on val (the same criterion, EMA weights) and only the best `adamw_keep`
    # train on; each time the epochs done double, the survivors halve again (rounded up) until one is
    # left. The others leave the comparison where they stop. 0: all train to the end
    adamw_prune_at: float = 0.25
    # ... and how many AdamW candidates train on after the first rung
    adamw_keep: int = 2
    # after the choice, fit the chosen head again on train + val (val only chose; the head then learns
    # from every image outside calib and test): a linear head with C chosen again by the same
    # cross-validation on train + val (on at most max_rows of them), an AdamW head with its lr, weight
    # decay and whole schedule (only with adamw_epoch="last": a best epoch found on val cannot be found
    # again once val is trained on)
    refit: bool = True

    def __post_init__(self) -> None:
        if self.adamw_epoch not in ("last", "best"):
            raise ValueError(f"SelectionConfig.adamw_epoch must be 'last' or 'best', got {self.adamw_epoch!r}")
        for name in ("lr_factors", "weight_decay_factors", "linear_c"):
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)  # a JSON form gives lists
            if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values):
                raise ValueError(f"SelectionConfig.{name} must be a non-empty list of numbers >= 0, got {values!r}")
        if any(v == 0 for v in self.lr_factors + self.linear_c):
            raise ValueError("SelectionConfig.lr_factors and linear_c must be > 0")
        if not 0.0 <= self.adamw_prune_at < 1.0 or isinstance(self.adamw_keep, bool) or not isinstance(
                self.adamw_keep, int) or self.adamw_keep < 1:
            raise ValueError(f"SelectionConfig.adamw_prune_at must be in [0, 1) and adamw_keep an integer >= 1, got "
                             f"{self.adamw_prune_at!r}, {self.adamw_keep!r}")
        if self.cv_folds < 2:
            raise ValueError(f"SelectionConfig.cv_folds must be >= 2, got {self.cv_folds}")
        if isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int) or self.max_rows < 0 or (
                0 < self.max_rows < 100):
            raise ValueError(f"SelectionConfig.max_rows must be 0 (no cap) or an integer >= 100, got {self.max_rows!r}")


@dataclass(frozen=True)
class Candidate:
    """One point of the head grid: an AdamW-trained head (lr, weight_decay) or an exactly solved
    linear head (c)."""

    kind: str
    view: FeatureView
    lr: float | None = None
    weight_decay: float | None = None
    c: float | None = None

    @property
    def exact(self) -> bool:
        return self.c is not None

    def label(self) -> str:
        knobs = f"C={self.c:g}" if self.exact else f"lr={self.lr:g} wd={self.weight_decay:g}"
        return f"{self.kind} {knobs} view={self.view.name}"


def selection_criterion(selection: SelectionConfig, n_eligible: int, *, grid_rows: tuple[int, int] | None = None,
                        rungs: dict[int, int] | None = None) -> str:
    """The rule that chose the head, in words (head.json, the model card, the run summary). `grid_rows`:
    (rows the grid trained on, train rows) when the grid saw a subsample; `rungs`: the successive
    halving rungs that pruned AdamW candidates ({0-based epoch: how many trained on after it});
    `n_eligible`: the candidates the one-SE rule counts (pruned ones included)."""
    if not selection.enabled:
        return "one head; class-balanced Brier score on the val split, its best epoch after the LR warmup"
    adamw = "their last epoch" if selection.adamw_epoch == "last" else "their best epoch after the LR warmup"
    if rungs:
        adamw += "; only " + ", then ".join(f"the best {keep} on val after epoch {epoch + 1}"
                                             for epoch, keep in sorted(rungs.items())) + " trained on"
    refit = ""
    if selection.refit:
        refit = ("; the chosen head is then fitted again on train + val (linear: C chosen again by CV"
                 + (", AdamW: the same schedule)" if selection.adamw_epoch == "last" else "; AdamW heads are kept)"))
    elif grid_rows is not None:
        refit = "; the chosen head is then fitted again on all of train"
    if grid_rows is not None:
        refit = (f"; the grid trained on a stratified subsample of {grid_rows[0]} of the {grid_rows[1]} train "
                 f"rows (selection.max_rows)" + refit)
    return (f"class-balanced Brier score on the val split (linear heads: C by {selection.cv_folds}-fold CV on "
            f"train; AdamW heads: {adamw}); the simplest of {n_eligible} candidates within "
            f"{standard_errors_allowed(n_eligible):.2f} standard errors of the best wins (linear before mlp, "
            f"fewer feature dimensions first){refit}")


# a capped subsample keeps at least this many rows of each class (all of them when it has fewer)
MIN_PER_CLASS = 10


def capped_rows(y: np.ndarray, cap: int, seed: int) -> np.ndarray | None:
    """Sorted indices of a class-stratified random subsample of at most `cap` rows (seeded), or None
    when all rows fit (or `cap` is 0). Each class keeps its share of `cap` (largest remainders), but
    never fewer than min(its rows, `MIN_PER_CLASS`) rows, taken from the largest class: a rare class
    must not vanish from the rows the grid trains and cross-validates on."""
    y = np.asarray(y)
    if cap <= 0 or len(y) <= cap:
        return None
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    share = counts * cap / len(y)
    take = np.floor(share).astype(np.int64)
    for c in np.argsort(-(share - take), kind="stable")[: cap - int(take.sum())]:
        take[c] += 1
    floor = np.minimum(counts, MIN_PER_CLASS)
    short = np.maximum(floor - take, 0)
    take += short
    take[np.argmax(take)] -= int(short.sum())
    rows = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(rows))


def fold_count(y: np.ndarray, wanted: int) -> int:
    """As many stratified folds as asked, but no more than the rarer class has rows: each fold then
    fits on, and holds out, both classes."""
    return int(min(wanted, np.bincount(np.asarray(y), minlength=2).min()))


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit rows, held-out rows) of `folds`-fold cross-validation: each class's rows shuffled (seeded)
    and dealt round the folds, so every fold holds each class's share to within one row. (The head
    grid's folds; scikit-learn's StratifiedKFold would cost a 1.2 s import on a path that needs
    nothing else from it.)"""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        fold_of[rows] = (offset + np.arange(len(rows))) % folds
        offset += len(rows)  # the next class starts where this one stopped: fold sizes stay even
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(folds)]


def balanced_brier(p: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error of p(roadwork), averaged within each class, then over the classes.

    The selection criterion: each image contributes at most 1, so one wildly wrong prediction (or one
    epoch with a few blown-up logits) cannot swamp it the way it swamps the log loss; it is a proper
    scoring rule, so it rewards ranking and calibration together; averaging per class matches the
    class-weighted training loss.
    """
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y)
    per_class = [np.mean((p[y == c] - c) ** 2) for c in (0, 1) if np.any(y == c)]
    return float(np.mean(per_class))


def _brier_terms(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-image terms whose mean is `balanced_brier`: squared error times n / (2 n_class)."""
    y = np.asarray(y)
    counts = np.bincount(y, minlength=2).astype(np.float64)
    weights = len(y) / (2.0 * np.maximum(counts, 1.0))
    return weights[y] * (np.asarray(p, dtype=np.float64) - y) ** 2


def complexity(candidate: Candidate) -> tuple[float, ...]:
    """Order of simplicity for the one-standard-error rule: linear before the rest, fewer input
    dimensions first, then (linear) stronger L2 first; AdamW candidates of one kind and view tie."""
    return (0.0 if candidate.kind == "linear" else 1.0, float(candidate.view.dim), candidate.c or 0.0)


def select_candidate(candidates: Sequence[Candidate], val_p: Sequence[np.ndarray], val_y: np.ndarray, *,
                     eligible: Sequence[bool] | None = None, competed: int | None = None) -> tuple[int, list[float]]:
    """The one-standard-error rule (Breiman et al. 1984; Hastie et al., ESL 7.10) on val Brier terms.

    The candidate with the lowest balanced Brier score is the reference; every candidate whose mean
    paired difference to it is within `standard_errors_allowed` standard errors of that difference
    (one for a single rival, more for many) qualifies, and the
    simplest qualifying one (`complexity`, then grid order) wins. On a small val split the
    differences between heads are mostly noise, and this rule then keeps the more regularised head
    instead of the one that was luckiest on these images. Only `eligible` candidates take part (the
    linear heads whose C cross-validation did not pick are not). `competed`: how many candidates the
    allowance counts, when more competed than are eligible (AdamW heads pruned on the same val split
    before the end of their schedule: the winner was still picked among them). Returns (index, SE of
    each difference).
    """
    terms = [_brier_terms(p, val_y) for p in val_p]
    means = [float(t.mean()) for t in terms]
    allowed = [i for i in range(len(terms)) if eligible is None or eligible[i]]
    best = min(allowed, key=lambda i: (means[i], i))
    ses = []
    for t in terms:
        d = t - terms[best]
        ses.append(float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0)
    z = standard_errors_allowed(max(len(allowed), competed or 0))
    ok = [i for i in allowed if means[i] - means[best] <= z * ses[i] + 1e-12]
    return min(ok, key=lambda i: (complexity(candidates[i]), means[i], i)), ses


def standard_errors_allowed(n_candidates: int) -> float:
    """How many standard errors a candidate may trail the best by and still qualify. One, for a single
    comparison (the one-standard-error rule: a one-sided level of 1 - Phi(1) = 0.159). With m
    candidates the best is the minimum of m noisy scores, and the chance that one of the m - 1 others
    beats the simplest by one SE only by luck grows with m; the level is therefore split over them
    (Bonferroni): z = Phi^-1(1 - 0.159 / (m - 1)); 1.94 SE for the default grid's 7 eligible heads."""
    from statistics import NormalDist

    if n_candidates <= 2:
        return 1.0
    one_se_level = 1.0 - NormalDist().cdf(1.0)
    return NormalDist().inv_cdf(1.0 - one_se_level / (n_candidates - 1))
