"""Evaluation metrics for the binary roadwork classifier and for selective (abstaining) prediction.

Conventions used throughout:

- `y` holds labels in {0, 1} (1 = roadwork); `p_pos` holds p(roadwork) in [0, 1].
- A decision at `threshold` is "roadwork iff p_pos >= threshold".
- Rates whose denominator is empty (FNR with no positives, precision with no predicted positives,
  AUROC with one class, selective risk with nothing accepted) are float('nan'), never 0.
- ECE is the top-label ECE of Guo et al. 2017 (see `ece`).

Selective metrics take any confidence score (higher = more confident, accepted first) and any
per-sample 0/1 loss, following Geifman & El-Yaniv 2017 (risk-coverage curve, AURC), Geifman et al.
2019 (E-AURC) and Traub et al. 2024 (AUGRC, and the tie-aware curve points of their fd-shifts code).
They are hand-written because no maintained dependency provides them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# scipy.integrate and sklearn.metrics are imported where used: the pipeline imports this module on every
# run, and a fully cached run computes no metric (docs/benchmarks.md, start-up)

__all__ = [
    "binary_metrics",
    "ece",
    "ReliabilityCurve",
    "reliability_curve",
    "fnr_fpr_curve",
    "risk_coverage_curve",
    "generalized_risk_coverage_curve",
    "aurc",
    "e_aurc",
    "augrc",
    "risk_at_coverage",
    "coverage_at_risk",
    "selective_fnr",
]

NLL_EPS = 1e-12  # probabilities are clipped to [eps, 1 - eps] before the log


def _labels_and_probs(y_true: Any, p_pos: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(p_pos, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1:
        raise ValueError(f"y and p_pos must be 1-D, got shapes {y.shape} and {p.shape}")
    if y.size != p.size:
        raise ValueError(f"y has {y.size} entries but p_pos has {p.size}; they must match sample by sample")
    if y.size == 0:
        raise ValueError("cannot compute metrics on an empty set of samples (check the split is not empty)")
    if not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"labels must be 0 or 1, found {bad.tolist()}")
    if not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("p_pos must be finite probabilities in [0, 1] (apply the calibrator/sigmoid first)")
    return y.astype(np.int64), p


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def binary_metrics(y_true: Any, p_pos: Any, threshold: float = 0.5) -> dict[str, float | int]:
    """Headline metrics of the decision "roadwork iff p_pos >= threshold", plus probability quality.

    Returns a flat dict of Python floats/ints: accuracy, mcc, auroc, fnr, fpr, precision, recall (of the
    thresholded decision); ece (top-label, 15 equal-width bins, see `ece`), nll (mean negative
    log-likelihood, probabilities clipped to [1e-12, 1 - 1e-12]), brier (mean (p - y)^2) of the
    probabilities; n, n_pos, threshold.
    With a single class in y, auroc is NaN (undefined) and so is fnr/recall (no positives) or fpr (no
    negatives); mcc is 0 when undefined (sklearn's convention). Raises ValueError on empty input.
    """
    y, p = _labels_and_probs(y_true, p_pos)
    pred = p >= threshold
    pos, neg = y == 1, y == 0
    tp = int(np.count_nonzero(pred & pos))
    fp = int(np.count_nonzero(pred & neg))
    fn = int(np.count_nonzero(~pred & pos))
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    p_clip = np.clip(p, NLL_EPS, 1.0 - NLL_EPS)
    nll = -np.mean(np.where(pos, np.log(p_clip), np.log1p(-p_clip)))
    return {
        "accuracy": float(np.mean(pred == pos)),
        "mcc": float(_sk().matthews_corrcoef(y, pred.astype(np.int64))),
        "auroc": float(_sk().roc_auc_score(y, p)) if 0 < n_pos < y.size else float("nan"),
        "fnr": _ratio(fn, n_pos),
        "fpr": _ratio(fp, n_neg),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, n_pos),
        "ece": ece(y, p),
        "nll": float(nll),
        "brier": float(np.mean((p - y) ** 2)),
        "n": int(y.size),
        "n_pos": n_pos,
        "threshold": float(threshold),
    }


def _sk():
    import sklearn.metrics

    return sklearn.metrics


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    from scipy.integrate import trapezoid

    return trapezoid(y, x)


@dataclass(frozen=True)
class ReliabilityCurve:
    """Non-empty bins of a top-label reliability diagram (arrays of equal length)."""

    bin_lower: np.ndarray  # bin is (bin_lower, bin_upper], the first bin also holds 0
    bin_upper: np.ndarray
    confidence: np.ndarray  # mean top-label confidence max(p, 1 - p) in the bin
    accuracy: np.ndarray  # fraction of samples in the bin whose top label is right
    count: np.ndarray  # samples in the bin


def reliability_curve(y_true: Any, p_pos: Any, n_bins: int = 15) -> ReliabilityCurve:
    """Top-label reliability curve: the per-bin terms that `ece` averages.

    Top label = 1 iff p_pos >= 0.5; confidence = max(p_pos, 1 - p_pos) in [0.5, 1]. Bins are n_bins
    equal-width intervals (lo, hi] over [0, 1], as in Guo et al. 2017's reference code, so with the
    default 15 bins only the upper 8 can hold samples. Empty bins are dropped.
    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _labels_and_probs(y_true, p_pos)
    top = (p >= 0.5).astype(np.int64)
    conf = np.maximum(p, 1.0 - p)
    correct = (top == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)  # (lo, hi] bins
    count = np.bincount(idx, minlength=n_bins)
    keep = count > 0
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_acc = np.bincount(idx, weights=correct, minlength=n_bins)
    return ReliabilityCurve(
        bin_lower=edges[:-1][keep],
        bin_upper=edges[1:][keep],
        confidence=sum_conf[keep] / count[keep],
        accuracy=sum_acc[keep] / count[keep],
        count=count[keep],
    )


def ece(y_true: Any, p_pos: Any, n_bins: int = 15) -> float:
    """Top-label expected calibration error (Guo et al. 2017).

    ECE = sum over bins b of (|B_b| / n) * |acc(B_b) - conf(B_b)|, with confidence max(p, 1 - p) of the
    top label (1 iff p >= 0.5), n_bins equal-width bins (lo, hi] over [0, 1], weighted by bin count.
    """
    curve = reliability_curve(y_true, p_pos, n_bins)
    weights = curve.count / curve.count.sum()
    return float(np.sum(weights * np.abs(curve.accuracy - curve.confidence)))


def fnr_fpr_curve(y_true: Any, p_pos: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FNR and FPR of "roadwork iff p_pos >= t" at every distinct score t (ascending).

    Returns (thresholds, fnr, fpr). fnr is NaN everywhere when y has no positives, fpr when it has no
    negatives. Same points as sklearn's roc_curve(drop_intermediate=False) without its +inf threshold.
    """
    y, p = _labels_and_probs(y_true, p_pos)
    thresholds = np.unique(p)
    pos_sorted = np.sort(p[y == 1])
    neg_sorted = np.sort(p[y == 0])
    n_pos, n_neg = pos_sorted.size, neg_sorted.size
    missed = np.searchsorted(pos_sorted, thresholds, side="left")  # positives with p < t
    false_alarms = n_neg - np.searchsorted(neg_sorted, thresholds, side="left")  # negatives with p >= t
    fnr = missed / n_pos if n_pos else np.full(thresholds.size, np.nan)
    fpr = false_alarms / n_neg if n_neg else np.full(thresholds.size, np.nan)
    return thresholds, fnr.astype(np.float64), fpr.astype(np.float64)


# ----------------------------------------------------------------------------------------------------
# Selective prediction


def _selective_inputs(y_true: Any, pred: Any, conf: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    yhat = np.asarray(pred)
    c = np.asarray(conf, dtype=np.float64)
    if not (y.ndim == yhat.ndim == c.ndim == 1) or not (y.size == yhat.size == c.size):
        raise ValueError(
            f"y, pred and conf must be 1-D arrays of one length, got {y.shape}, {yhat.shape}, {c.shape}"
        )
    if y.size == 0:
        raise ValueError("cannot compute selective metrics on an empty set of samples")
    if not np.isfinite(c).all():
        raise ValueError("conf contains NaN/inf; confidence scores must be finite")
    return (yhat != y).astype(np.float64), c


def _curves(loss: np.ndarray, conf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Points at each distinct confidence threshold t (accept iff conf >= t), thresholds descending.

    Returns (thresholds, coverage, selective_risk, generalized_risk); coverage ascending in (0, 1].
    Tied confidences are accepted or rejected together, so the curve does not depend on tie order.
    """
    n = loss.size
    order = np.argsort(-conf, kind="stable")
    c_sorted, l_sorted = conf[order], loss[order]
    last_of_group = np.r_[c_sorted[1:] != c_sorted[:-1], True]
    accepted = np.arange(1, n + 1)[last_of_group]
    errors = np.cumsum(l_sorted)[last_of_group]
    return c_sorted[last_of_group], accepted / n, errors / accepted, errors / n


def risk_coverage_curve(y_true: Any, pred: Any, conf: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Selective risk (error rate among accepted) against coverage, accepting iff conf >= t.

    Returns (coverage, risk, thresholds), one point per distinct confidence value, coverage ascending
    (thresholds descending). Loss is the 0/1 error pred != y.
    """
    loss, c = _selective_inputs(y_true, pred, conf)
    thresholds, coverage, risk, _ = _curves(loss, c)
    return coverage, risk, thresholds


def generalized_risk_coverage_curve(
    y_true: Any, pred: Any, conf: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generalized risk P(error and accepted) against coverage (Traub et al. 2024); as risk_coverage_curve."""
    loss, c = _selective_inputs(y_true, pred, conf)
    thresholds, coverage, _, grisk = _curves(loss, c)
    return coverage, grisk, thresholds


def _aurc_from_loss(loss: np.ndarray, conf: np.ndarray) -> float:
    _, coverage, risk, _ = _curves(loss, conf)
    # trapezoids between curve points, with the curve held flat from the lowest coverage down to 0
    return float(_trapezoid(np.r_[risk[0], risk], np.r_[0.0, coverage]))


def aurc(y_true: Any, pred: Any, conf: Any) -> float:
    """Area under the selective risk-coverage curve (Geifman & El-Yaniv 2017), in [0, 1], lower is better.

    Trapezoidal rule over the tie-aware curve points, with the risk held constant from the smallest
    coverage down to 0 (the "linear" AURC of Traub et al.'s fd-shifts). Without ties it differs from the
    plain mean over k of top-k risks only by the trapezoid averaging of adjacent points.
    """
    loss, c = _selective_inputs(y_true, pred, conf)
    return _aurc_from_loss(loss, c)


def e_aurc(y_true: Any, pred: Any, conf: Any) -> float:
    """Excess AURC: AURC minus the AURC of an oracle confidence that ranks every correct sample first.

    The oracle is evaluated with the same discretisation (one point per sample), not the continuous
    approximation err + (1 - err) log(1 - err). With heavy confidence ties it can be slightly negative.
    """
    loss, c = _selective_inputs(y_true, pred, conf)
    oracle_conf = -np.arange(loss.size, dtype=np.float64)  # strictly decreasing, no ties
    return _aurc_from_loss(loss, c) - _aurc_from_loss(np.sort(loss), oracle_conf)


def augrc(y_true: Any, pred: Any, conf: Any) -> float:
    """Area under the generalized risk-coverage curve (Traub et al. 2024), in [0, 0.5], lower is better.

    Generalized risk at a threshold is P(error and accepted) = errors among accepted / n. Trapezoidal
    rule over the tie-aware curve points plus the origin (coverage 0, risk 0), as in fd-shifts. A
    perfect ranking with error rate e scores e^2 / 2; a random one e / 2.
    """
    loss, c = _selective_inputs(y_true, pred, conf)
    _, coverage, _, grisk = _curves(loss, c)
    return float(_trapezoid(np.r_[0.0, grisk], np.r_[0.0, coverage]))


def risk_at_coverage(y_true: Any, pred: Any, conf: Any, coverage: float) -> float:
    """Selective risk at the smallest achievable coverage >= `coverage` (thresholds on conf only)."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    cov, risk, _ = risk_coverage_curve(y_true, pred, conf)
    i = int(np.searchsorted(cov, coverage - 1e-12, side="left"))
    return float(risk[min(i, cov.size - 1)])


def coverage_at_risk(y_true: Any, pred: Any, conf: Any, risk: float) -> float:
    """Largest coverage whose selective risk is <= `risk`; 0.0 when no threshold achieves it."""
    if not 0.0 <= risk <= 1.0:
        raise ValueError(f"risk must be in [0, 1], got {risk}")
    cov, r, _ = risk_coverage_curve(y_true, pred, conf)
    ok = r <= risk + 1e-12
    return float(cov[ok].max()) if ok.any() else 0.0


def selective_fnr(y_true: Any, pred: Any, accepted: Any) -> float:
    """FNR among accepted samples: P(pred = 0 | y = 1, accepted); NaN with no accepted positives.

    For SCRC prediction sets pass pred = (set contains 1), e.g. `sets >= 1` with the 0/1/2 coding.
    """
    y = np.asarray(y_true)
    yhat = np.asarray(pred).astype(bool)
    acc = np.asarray(accepted).astype(bool)
    if not (y.shape == yhat.shape == acc.shape) or y.ndim != 1:
        raise ValueError(
            f"y, pred and accepted must be 1-D of one length, got {y.shape}, {yhat.shape}, {acc.shape}"
        )
    pos_acc = (y == 1) & acc
    return _ratio(np.count_nonzero(pos_acc & ~yhat), np.count_nonzero(pos_acc))
