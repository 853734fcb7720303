"""Training losses for the heads: class-weighted CE, the SelectiveNet loss, and a risk-aware loss.

All losses take raw logits (never probabilities) and integer class targets, and return a scalar mean.
The formulas, and why each choice was made, are written out in docs/selective.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "class_weights_from_labels",
    "class_weighted_ce",
    "selectivenet_loss",
    "risk_aware_loss",
]


def class_weights_from_labels(
    labels: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int = 2
) -> torch.Tensor:
    """Inverse-frequency class weights ``n / (num_classes * n_c)``, float32, shape (num_classes,).

    Balanced data gives all ones; the weighted mean CE then equals the plain mean CE. A class with no
    sample has no finite weight, so it raises instead of silently training without that class.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if isinstance(labels, torch.Tensor):
        arr = labels.detach().cpu().numpy()
    else:
        arr = np.asarray(labels)
    arr = arr.reshape(-1)
    if arr.size == 0:
        raise ValueError("class_weights_from_labels got no labels; pass the training split's labels")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError("labels must be integer class ids in [0, num_classes)")
        arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}); got values from {int(arr.min())} to {int(arr.max())}"
        )
    counts = np.bincount(arr, minlength=num_classes)
    empty = [c for c in range(num_classes) if counts[c] == 0]
    if empty:
        raise ValueError(
            f"class(es) {empty} have 0 samples among {arr.size} labels (counts {counts.tolist()}); "
            "inverse-frequency weights are undefined. Add samples of that class to the training split "
            "or train without class weights."
        )
    weights = arr.size / (num_classes * counts.astype(np.float64))
    return torch.as_tensor(weights, dtype=torch.float32)


def class_weighted_ce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy that keeps the class weights when label smoothing is on.

    timm's ``LabelSmoothingCrossEntropy`` takes no weights, so it drops them; ``F.cross_entropy`` keeps
    them. With ``eps = label_smoothing`` and ``K`` classes, per sample
    ``l_i = (1 - eps) * w[y_i] * (-log p[i, y_i]) + (eps / K) * sum_c w[c] * (-log p[i, c])`` and the
    mean is ``sum_i l_i / sum_i w[y_i]`` (PyTorch's weighted-mean convention).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    weight = None
    if class_weights is not None:
        weight = class_weights.to(device=logits.device, dtype=logits.dtype)
        if weight.shape != (logits.shape[-1],):
            raise ValueError(
                f"class_weights has shape {tuple(weight.shape)}, expected ({logits.shape[-1]},) "
                "to match the logits' class dimension"
            )
    return F.cross_entropy(logits, targets.long(), weight=weight, label_smoothing=label_smoothing)


def selectivenet_loss(
    cls_logits: torch.Tensor,
    gate_logit: torch.Tensor,
    aux_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    coverage: float,
    lam: float = 32.0,
    alpha: float = 0.5,
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SelectiveNet loss (Geifman & El-Yaniv, ICML 2019) for a head with (cls, gate, aux) outputs.

    With ``g_i = sigmoid(gate_logit_i)``, ``ce_i`` the per-sample CE of the classifier head and
    ``w_i = class_weights[y_i]`` (1 without weights):

    - empirical coverage ``phi = mean_i g_i``;
    - selective risk ``r = sum_i g_i w_i ce_i / sum_i g_i w_i`` (= ``sum g ce / sum g`` unweighted);
    - coverage penalty ``lam * max(0, coverage - phi) ** 2``;
    - total ``alpha * (r + penalty) + (1 - alpha) * aux_ce`` where ``aux_ce`` is the (weighted) mean CE
      of the auxiliary head on all samples.

    Coverage division: the risk is divided by the (weighted) gate mass, as in the paper's definition
    of the selective risk and in the PyTorch ports; the authors' Keras code uses ``mean(g * ce)``
    instead. We divide because then scaling every ``g_i`` by the same factor leaves ``r`` unchanged: the
    risk term only teaches the gate *which* samples to accept (gradient ``g'_i (ce_i - r) / sum g``,
    negative for below-average loss), and the coverage level is set by the penalty alone. Without the
    division the risk term rewards shrinking every ``g_i``, so training settles below the target
    coverage and ``r`` is not a risk one can compare with the selective-risk target.

    Returns the loss and a dict of detached floats: loss, selective_risk, coverage, penalty, aux_loss.
    """
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    targets = targets.long()
    gate_logit = gate_logit.reshape(-1)
    if gate_logit.shape[0] != cls_logits.shape[0]:
        raise ValueError(
            f"gate_logit has {gate_logit.shape[0]} entries for {cls_logits.shape[0]} samples; "
            "expected one gate logit per sample, shape (N,) or (N, 1)"
        )
    weight = None
    if class_weights is not None:
        weight = class_weights.to(device=cls_logits.device, dtype=cls_logits.dtype)

    g = torch.sigmoid(gate_logit)
    ce = F.cross_entropy(cls_logits, targets, reduction="none")
    w = weight[targets] if weight is not None else torch.ones_like(ce)
    phi = g.mean()
    selective_risk = (g * w * ce).sum() / (g * w).sum().clamp_min(torch.finfo(g.dtype).tiny)
    penalty = lam * torch.clamp(coverage - phi, min=0.0) ** 2
    aux_loss = F.cross_entropy(aux_logits, targets, weight=weight)
    loss = alpha * (selective_risk + penalty) + (1.0 - alpha) * aux_loss
    stats = {
        "loss": float(loss.detach()),
        "selective_risk": float(selective_risk.detach()),
        "coverage": float(phi.detach()),
        "penalty": float(penalty.detach()),
        "aux_loss": float(aux_loss.detach()),
    }
    return loss, stats


def risk_aware_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    fn_cost: float = 5.0,
    fp_cost: float = 1.0,
    gamma: float = 2.0,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cost-weighted focal loss: confident misses of roadwork cost ``fn_cost / fp_cost`` times more.

    Per sample, with ``p_y`` the predicted probability of the true class and ``q = 1 - p_y`` the
    probability put on the wrong class: ``l_i = cost(y_i) * w(y_i) * q ** gamma * (-log p_y)`` where
    ``cost(1) = fn_cost`` (a missed positive, a false negative), ``cost(0) = fp_cost``, and ``w`` the
    class weights (e.g. ``class_weights_from_labels``; all ones without). The loss is the weighted mean
    ``sum_i l_i / sum_i w(y_i)``, PyTorch's weighted-mean convention as in ``class_weighted_ce``: the
    costs scale the loss, the weights only shift the balance between the classes, and without weights
    it is ``mean_i l_i``. The ``q ** gamma`` factor is the focal modulation (Lin et al. 2017) that
    down-weights easy, correct samples so that confident errors dominate; the class costs are the
    cost-sensitive weighting of Elkan (2001). With ``gamma = 0`` this is cost-weighted CE, whose minimiser
    moves the Bayes threshold on p(roadwork) from 1/2 to ``fp_cost w(0) / (fp_cost w(0) + fn_cost w(1))``
    (``fp_cost / (fp_cost + fn_cost)`` unweighted), the same direction as the FNR constraint: it trades
    false positives for fewer false negatives. Inverse-frequency weights on top of the costs make the
    rare class count as much as the common one before the costs are applied.

    ``logits`` is (N, 2) class logits, or (N,) / (N, 1) single logits for p(roadwork); ``class_weights``
    has shape (2,).
    """
    if fn_cost <= 0 or fp_cost <= 0:
        raise ValueError(f"fn_cost and fp_cost must be > 0, got fn_cost={fn_cost}, fp_cost={fp_cost}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    targets = targets.long().reshape(-1)
    if targets.numel() and (targets.min() < 0 or targets.max() > 1):
        raise ValueError("risk_aware_loss targets must be 0 (no roadwork) or 1 (roadwork)")
    if logits.ndim == 2 and logits.shape[1] == 2:
        log_p_true = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    elif logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
        z = logits.reshape(-1)
        # log sigmoid(z) for y=1, log sigmoid(-z) for y=0
        sign = targets.to(z.dtype) * 2.0 - 1.0
        log_p_true = F.logsigmoid(sign * z)
    else:
        raise ValueError(
            f"risk_aware_loss is binary: logits must be (N, 2), (N,) or (N, 1); got {tuple(logits.shape)}"
        )
    # q = 1 - p_y computed as -expm1(log p_y) to keep precision when p_y is close to 1
    q = (-torch.expm1(log_p_true)).clamp_min(torch.finfo(log_p_true.dtype).tiny)
    cost = torch.where(
        targets == 1,
        torch.full_like(log_p_true, float(fn_cost)),
        torch.full_like(log_p_true, float(fp_cost)),
    )
    per_sample = cost * q.pow(gamma) * (-log_p_true)
    if class_weights is None:
        return per_sample.mean()
    weight = class_weights.to(device=log_p_true.device, dtype=log_p_true.dtype)
    if weight.shape != (2,):
        raise ValueError(
            f"class_weights has shape {tuple(weight.shape)}, expected (2,): one weight per class "
            "(no roadwork, roadwork)"
        )
    w = weight[targets]
    return (w * per_sample).sum() / w.sum()
