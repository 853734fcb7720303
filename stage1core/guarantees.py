"""Decision thresholds that carry finite-sample statistical guarantees, fitted on the calib split.

Two procedures (derivations in docs/guarantees.md):

- `fnr_threshold`: predict roadwork iff score >= t, with P(FNR(t) <= alpha) >= 1 - delta over draws of
  the calibration set. t is an order statistic of the positive calib scores; the bound is the exact
  binomial (Clopper-Pearson) one, equivalently Learn-then-Test with fixed-sequence testing.
- `fit_scrc` / `apply_scrc`: selective conformal risk control, inductive PAC variant (SCRC-I, Xu, Guo
  and Wei 2025): abstain on low confidence, otherwise output a prediction set, so that with probability
  >= 1 - delta the acceptance rate is >= xi and the false-negative rate among accepted samples is
  <= alpha.

The binomial tails come from scipy.stats; the search procedures are hand-written because no maintained
library implements them for these decision rules (MAPIE's controllers are used as a cross-check in the
tests).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import binom

from .config import describe_fields

__all__ = [
    "GuaranteeConfig",
    "InsufficientCalibrationData",
    "FNRThreshold",
    "min_positives_for",
    "fnr_threshold",
    "SCRCConfig",
    "SCRCInfeasible",
    "SCRCParams",
    "dkw_margin",
    "min_accepted_positives_for",
    "fit_scrc",
    "apply_scrc",
    "evaluate_scrc",
]


def _check_unit_interval(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < float(value) < 1.0):
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")


def _finite_1d(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} NaN/inf value(s) (first at index {first}: {arr[first]!r}); "
            "scores must be finite. Check the model outputs or drop those samples before calibrating."
        )
    return arr


@describe_fields
@dataclass(frozen=True)
class GuaranteeConfig:
    """Targets of the FNR guarantee: P(FNR <= alpha) >= 1 - delta over calib draws."""

    alpha: float = 0.02  # max false-negative rate (missed roadwork)
    delta: float = 0.05  # allowed probability that the calib draw breaks the bound

    def __post_init__(self) -> None:
        _check_unit_interval("alpha", self.alpha)
        _check_unit_interval("delta", self.delta)


class InsufficientCalibrationData(ValueError):
    """The calibration split is too small to certify the requested (alpha, delta)."""


def min_positives_for(alpha: float, delta: float) -> int:
    """Smallest n1 for which any threshold can be certified: (1 - alpha)^n1 <= delta.

    With k = 1 (t = the smallest positive score) the violation bound is BinomCDF(0; n1, alpha) =
    (1 - alpha)^n1, the smallest it can be, so n1 >= log(delta) / log(1 - alpha) is necessary and
    sufficient. Defaults alpha=0.02, delta=0.05 give 149.
    """
    _check_unit_interval("alpha", alpha)
    _check_unit_interval("delta", delta)
    n = max(1, math.ceil(math.log(delta) / math.log1p(-alpha)))
    # guard the ceil against floating-point error at exact integer ratios
    while n > 1 and binom.cdf(0, n - 1, alpha) <= delta:
        n -= 1
    while binom.cdf(0, n, alpha) > delta:
        n += 1
    return n


@dataclass(frozen=True)
class FNRThreshold:
    """A fitted FNR threshold and the numbers that certify it (all JSON-serialisable)."""

    threshold: float  # predict roadwork iff score >= threshold
    k: int  # threshold is the k-th smallest positive calib score (1-based)
    n_positives: int  # n1, positive calib samples used
    alpha: float
    delta: float
    violation_bound: float  # BinomCDF(k-1; n1, alpha) >= P(FNR(threshold) > alpha); <= delta
    calib_fnr: float  # empirical FNR on the calib positives at threshold ((k-1)/n1, less with ties)

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """Decisions (bool array): True = roadwork."""
        return np.asarray(scores, dtype=np.float64) >= self.threshold

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> FNRThreshold:
        expected = {"threshold", "k", "n_positives", "alpha", "delta", "violation_bound", "calib_fnr"}
        missing, extra = expected - set(d), set(d) - expected
        if missing or extra:
            raise ValueError(
                f"FNR threshold JSON has missing keys {sorted(missing)} and unknown keys {sorted(extra)}"
            )
        return cls(
            threshold=float(d["threshold"]),
            k=int(d["k"]),
            n_positives=int(d["n_positives"]),
            alpha=float(d["alpha"]),
            delta=float(d["delta"]),
            violation_bound=float(d["violation_bound"]),
            calib_fnr=float(d["calib_fnr"]),
        )


def fnr_threshold(positive_scores: np.ndarray, config: GuaranteeConfig) -> FNRThreshold:
    """Largest threshold t = s_(k) with P(FNR(t) <= alpha) >= 1 - delta over calib draws.

    positive_scores: scores of the positive (roadwork) calib samples only; higher = more roadwork.
    k is the largest index with BinomCDF(k - 1; n1, alpha) <= delta. For continuous scores
    FNR(s_(k)) ~ Beta(k, n1 - k + 1), whose upper tail at alpha is exactly that binomial CDF; ties
    only lower the FNR, so the bound stays valid. Note that k depends on (n1, alpha, delta) only.
    Raises InsufficientCalibrationData when n1 < min_positives_for(alpha, delta).
    """
    scores = _finite_1d("positive_scores", positive_scores)
    n1 = int(scores.size)
    needed = min_positives_for(config.alpha, config.delta)
    if n1 < needed:
        raise InsufficientCalibrationData(
            f"the calibration split has {n1} positive (roadwork) samples, but certifying "
            f"FNR <= {config.alpha} with probability >= {1 - config.delta:g} needs at least {needed} "
            f"(= ceil(log(delta) / log(1 - alpha)) for alpha={config.alpha}, delta={config.delta}). "
            "Add labelled roadwork images, enlarge the calib split ratio, or relax alpha/delta."
        )
    # BinomCDF(j; n1, alpha) for j = k - 1 = 0 .. n1 - 1 is nondecreasing in j
    cdf = binom.cdf(np.arange(n1), n1, config.alpha)
    k = int(np.searchsorted(cdf, config.delta, side="right"))  # number of j with cdf[j] <= delta
    sorted_scores = np.sort(scores)
    threshold = float(sorted_scores[k - 1])
    return FNRThreshold(
        threshold=threshold,
        k=k,
        n_positives=n1,
        alpha=float(config.alpha),
        delta=float(config.delta),
        violation_bound=float(cdf[k - 1]),
        calib_fnr=float(np.count_nonzero(sorted_scores < threshold) / n1),
    )


# ----------------------------------------------------------------------------------------------------
# SCRC-I: selective conformal risk control, inductive (calibration-only) PAC variant


@dataclass(frozen=True)
class SCRCConfig:
    """Targets and search grid of SCRC-I. Guarantee, over calib draws, with probability >= 1 - delta:
    acceptance rate >= xi AND P(1 not in set | y = 1, accepted) <= alpha.

    The grids are fixed by this config before any data is seen, which the risk test requires.
    """

    alpha: float = 0.02  # max FNR among accepted samples (missed roadwork when not abstaining)
    delta: float = 0.05  # allowed probability that the calib draw breaks either bound
    xi: float = 0.8  # min acceptance rate (coverage), certified by a DKW lower bound
    delta_split: float = 0.5  # share of delta spent on the coverage bound; the risk test gets the rest
    grid_size: int = 20  # selection thresholds l1, evenly spaced in [conf_low, conf_high); Bonferroni divisor
    conf_low: float = 0.0  # range of the confidence score: 0 for a gate prob, 0.5 for max(p, 1 - p)
    conf_high: float = 1.0
    n_set_thresholds: int = 100  # l2 grid: 0, then geometric 1e-4..0.5 (fixed sequence, no multiplicity cost)

    def __post_init__(self) -> None:
        _check_unit_interval("alpha", self.alpha)
        _check_unit_interval("delta", self.delta)
        _check_unit_interval("xi", self.xi)
        _check_unit_interval("delta_split", self.delta_split)
        if self.delta * self.delta_split > 0.5:
            raise ValueError("delta * delta_split must be <= 0.5 (one-sided DKW/Massart bound)")
        if not (isinstance(self.grid_size, int) and self.grid_size >= 1):
            raise ValueError(f"grid_size must be a positive int, got {self.grid_size!r}")
        if not (isinstance(self.n_set_thresholds, int) and self.n_set_thresholds >= 2):
            raise ValueError(f"n_set_thresholds must be an int >= 2, got {self.n_set_thresholds!r}")
        low, high = float(self.conf_low), float(self.conf_high)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"need finite conf_low < conf_high, got {self.conf_low}, {self.conf_high}")

    @property
    def delta_coverage(self) -> float:
        return self.delta * self.delta_split

    @property
    def delta_risk(self) -> float:
        return self.delta * (1.0 - self.delta_split)

    def selection_thresholds(self) -> np.ndarray:
        """l1 grid, ascending (l1[0] = conf_low accepts everything in range)."""
        return self.conf_low + (self.conf_high - self.conf_low) * np.arange(self.grid_size) / self.grid_size

    def set_thresholds(self) -> np.ndarray:
        """l2 grid, ascending: the fixed-sequence order, from the safest (l2=0: set always holds 1)."""
        return np.r_[0.0, np.geomspace(1e-4, 0.5, self.n_set_thresholds - 1)]


class SCRCInfeasible(InsufficientCalibrationData):
    """The calibration split cannot certify (alpha, delta, xi) for SCRC-I."""


@dataclass(frozen=True)
class SCRCParams:
    """Fitted SCRC-I thresholds and the calib numbers that certify them (all JSON-serialisable)."""

    selection_threshold: float  # l1: accept iff conf >= l1, else abstain
    set_threshold: float  # l2: label y is in the set iff p_y >= l2 (p_1 = p, p_0 = 1 - p); l2 <= 0.5
    alpha: float
    delta: float
    xi: float
    delta_coverage: float  # spent on the DKW coverage bound
    delta_risk: float  # spent on the risk test (Bonferroni over grid_size fixed-sequence chains)
    grid_size: int
    n_calib: int
    n_accepted_positives: int  # positives with conf >= l1 in calib
    calib_coverage: float  # empirical acceptance rate at l1
    coverage_lower_bound: float  # calib_coverage - DKW margin; >= xi
    calib_selective_fnr: float  # empirical FNR among accepted calib positives
    risk_p_value: float  # BinomCDF(misses; n_accepted_positives, alpha); <= delta_risk / grid_size
    calib_mean_set_size: float  # among accepted calib samples, in [1, 2]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> SCRCParams:
        names = set(cls.__dataclass_fields__)
        missing, extra = names - set(d), set(d) - names
        if missing or extra:
            raise ValueError(f"SCRC JSON has missing keys {sorted(missing)} and unknown keys {sorted(extra)}")
        ints = {"grid_size", "n_calib", "n_accepted_positives"}
        return cls(**{k: (int(v) if k in ints else float(v)) for k, v in d.items()})


def dkw_margin(n: int, delta: float) -> float:
    """One-sided DKW (Massart 1990) margin: P(sup_t (S_n(t) - S(t)) > eps) <= delta for eps below."""
    return math.sqrt(math.log(1.0 / delta) / (2.0 * n))


def _scrc_inputs(p: Any, conf: Any, y: Any | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    p = _finite_1d("p", p)
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError("p must hold probabilities p(roadwork) in [0, 1] (apply the calibrator first)")
    c = np.maximum(p, 1.0 - p) if conf is None else _finite_1d("conf", conf)
    if c.size != p.size:
        raise ValueError(f"p has {p.size} entries but conf has {c.size}")
    if y is None:
        return p, c, None
    labels = np.asarray(y)
    if labels.shape != p.shape or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"y must be a 0/1 array with one entry per sample ({p.size}), got {labels.shape}")
    return p, c, labels.astype(bool)


def _scrc_tables(p: np.ndarray, conf: np.ndarray, y: np.ndarray, config: SCRCConfig) -> dict[str, np.ndarray]:
    """Counts for every grid pair (j, k) in O(n log n + J K), without a J x K x n tensor.

    accepted[j] = #{conf >= l1_j}; pos_accepted[j] = #{y=1, conf >= l1_j};
    misses[j, k] = #{y=1, conf >= l1_j, p < l2_k}; two_label[j, k] = #{conf >= l1_j, min(p, 1-p) >= l2_k}.
    """
    l1, l2 = config.selection_thresholds(), config.set_thresholds()
    n_j, n_k = l1.size, l2.size
    a = np.searchsorted(l1, conf, side="right")  # accepted at j < a
    b = np.searchsorted(l2, p, side="right")  # 1 in set at k < b, missed at k >= b
    d = np.minimum(b, np.searchsorted(l2, 1.0 - p, side="right"))  # both labels at k < d

    def tail_over_a(hist: np.ndarray) -> np.ndarray:  # row j sums hist rows a > j
        return np.cumsum(hist[::-1], axis=0)[::-1][1:]

    acc_hist = np.bincount(a, minlength=n_j + 1)
    pos_hist = np.bincount(a[y], minlength=n_j + 1)
    miss_hist = np.zeros((n_j + 1, n_k + 1), dtype=np.int64)
    np.add.at(miss_hist, (a[y], b[y]), 1)
    two_hist = np.zeros((n_j + 1, n_k + 1), dtype=np.int64)
    np.add.at(two_hist, (a, d), 1)
    return {
        "accepted": tail_over_a(acc_hist[:, None])[:, 0],
        "pos_accepted": tail_over_a(pos_hist[:, None])[:, 0],
        "misses": tail_over_a(np.cumsum(miss_hist, axis=1)[:, :n_k]),  # b <= k
        "two_label": tail_over_a(np.cumsum(two_hist[:, ::-1], axis=1)[:, ::-1][:, 1:]),  # d > k
    }


def min_accepted_positives_for(config: SCRCConfig) -> int:
    """Accepted calib positives a chain needs before even its safest set (l2 = 0) can pass the risk test."""
    return min_positives_for(config.alpha, config.delta_risk / config.grid_size)


def fit_scrc(p: Any, conf: Any, y: Any, config: SCRCConfig) -> SCRCParams:
    """Choose (l1, l2) on calib so that, with probability >= 1 - delta over calib draws, the acceptance
    rate is >= xi and the FNR among accepted samples is <= alpha; among certified pairs, minimise the
    mean prediction-set size of accepted calib samples (ties: the larger coverage).

    p: calibrated p(roadwork); conf: confidence (higher = accept first), or None for max(p, 1 - p)
    (then use conf_low=0.5); y: 0/1 labels. Procedure (derivation in docs/guarantees.md):
    coverage: keep l1 with empirical acceptance - DKW margin(n, delta_coverage) >= xi (uniform in l1).
    risk: for each l1 on the grid (Bonferroni: level delta_risk / grid_size), test l2 in ascending order
    (fixed sequence) with the exact binomial p-value BinomCDF(misses; accepted positives, alpha), stop at
    the first failure. Raises SCRCInfeasible when no pair passes both.
    """
    p, c, labels = _scrc_inputs(p, conf, y)
    n = p.size
    if n == 0:
        raise SCRCInfeasible("the calibration split is empty; SCRC needs labelled calib samples")
    tables = _scrc_tables(p, c, labels, config)
    l1, l2 = config.selection_thresholds(), config.set_thresholds()
    eps = dkw_margin(n, config.delta_coverage)
    coverage = tables["accepted"] / n
    coverage_ok = coverage - eps >= config.xi
    if not coverage_ok.any():
        raise SCRCInfeasible(
            f"cannot certify coverage >= {config.xi}: the largest acceptance rate over the selection grid is "
            f"{coverage.max():.4f} and the DKW margin with n={n} calib samples and "
            f"delta_coverage={config.delta_coverage:g} is {eps:.4f}, so the acceptance rate must reach "
            f"{config.xi + eps:.4f}. Lower xi, add calib samples (the margin shrinks as 1/sqrt(n)), raise "
            "delta_split, or check conf_low/conf_high cover the confidence scores."
        )
    pos_acc = tables["pos_accepted"]
    level = config.delta_risk / config.grid_size
    with np.errstate(invalid="ignore"):
        tail = binom.cdf(tables["misses"], pos_acc[:, None], config.alpha)
    p_values = np.where(pos_acc[:, None] > 0, tail, 1.0)  # no accepted positive: nothing certified
    n_passed = np.cumprod(p_values <= level, axis=1).sum(axis=1)  # fixed sequence: stop at first failure
    candidates = np.flatnonzero(coverage_ok & (n_passed > 0))
    if candidates.size == 0:
        need = min_accepted_positives_for(config)
        most = int(pos_acc[coverage_ok].max())
        raise SCRCInfeasible(
            f"cannot certify FNR <= {config.alpha} among accepted samples: selection thresholds with "
            f"certified coverage >= {config.xi} accept at most {most} calib positives, but the risk test at "
            f"level delta_risk/grid_size = {level:.3g} needs at least {need} "
            "(= ceil(log(level) / log(1 - alpha))). Add labelled roadwork images to calib, lower xi, "
            "raise alpha or delta, or use a smaller grid_size."
        )
    k_best = n_passed[candidates] - 1
    accepted = tables["accepted"][candidates]
    mean_size = 1.0 + tables["two_label"][candidates, k_best] / accepted
    i = int(np.argmin(mean_size))  # first minimum = smallest l1 = largest coverage among ties
    j, k = int(candidates[i]), int(k_best[i])
    return SCRCParams(
        selection_threshold=float(l1[j]),
        set_threshold=float(l2[k]),
        alpha=float(config.alpha),
        delta=float(config.delta),
        xi=float(config.xi),
        delta_coverage=float(config.delta_coverage),
        delta_risk=float(config.delta_risk),
        grid_size=int(config.grid_size),
        n_calib=int(n),
        n_accepted_positives=int(pos_acc[j]),
        calib_coverage=float(coverage[j]),
        coverage_lower_bound=float(coverage[j] - eps),
        calib_selective_fnr=float(tables["misses"][j, k] / pos_acc[j]),
        risk_p_value=float(p_values[j, k]),
        calib_mean_set_size=float(mean_size[i]),
    )


def apply_scrc(params: SCRCParams, p: Any, conf: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: accepted (bool) and the set code: -1 abstain, 0 = {0}, 1 = {1}, 2 = {0, 1}.

    conf=None means max(p, 1 - p), as in fit_scrc. Label y is in the set iff p_y >= set_threshold.
    """
    p, c, _ = _scrc_inputs(p, conf)
    accepted = c >= params.selection_threshold
    has_pos = p >= params.set_threshold
    has_neg = 1.0 - p >= params.set_threshold
    sets = np.where(has_pos & has_neg, 2, np.where(has_pos, 1, 0)).astype(np.int64)
    sets[~accepted] = -1
    return accepted, sets


def evaluate_scrc(params: SCRCParams, p: Any, conf: Any, y: Any) -> dict[str, float]:
    """Coverage, FNR among accepted, and set sizes of fitted SCRC thresholds on labelled data (e.g. test)."""
    p, c, labels = _scrc_inputs(p, conf, y)
    accepted, sets = apply_scrc(params, p, c)
    pos_acc = labels & accepted
    n_acc = int(accepted.sum())
    nan = float("nan")
    return {
        "coverage": float(accepted.mean()) if p.size else nan,
        "selective_fnr": float(np.mean(sets[pos_acc] == 0)) if pos_acc.any() else nan,
        "mean_set_size": float(np.mean(np.where(sets[accepted] == 2, 2, 1))) if n_acc else nan,
        "two_label_rate": float(np.mean(sets[accepted] == 2)) if n_acc else nan,
        "n": int(p.size),
        "n_accepted": n_acc,
    }
