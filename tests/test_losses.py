"""Tests for stage1core.losses: values against hand computations, gradients, and error paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stage1core.losses import (
    class_weighted_ce,
    class_weights_from_labels,
    risk_aware_loss,
    selectivenet_loss,
)

# ---------------------------------------------------------------- class weights


def test_class_weights_inverse_frequency():
    w = class_weights_from_labels([0, 0, 0, 1])
    assert w.dtype == torch.float32
    # n / (K n_c): 4 / (2*3), 4 / (2*1)
    torch.testing.assert_close(w, torch.tensor([4 / 6, 2.0]))
    torch.testing.assert_close(class_weights_from_labels(np.array([0, 1, 0, 1])), torch.ones(2))
    three = class_weights_from_labels(torch.tensor([0, 1, 2, 2]), num_classes=3)
    torch.testing.assert_close(three, torch.tensor([4 / 3, 4 / 3, 2 / 3]))


def test_class_weights_missing_class_is_clear_error():
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] have 0 samples"):
        class_weights_from_labels([0, 0, 0])
    with pytest.raises(ValueError, match="lie in"):
        class_weights_from_labels([0, 2])
    with pytest.raises(ValueError, match="no labels"):
        class_weights_from_labels([])


# ---------------------------------------------------------------- class-weighted CE


def _hand_weighted_smoothed_ce(logits, targets, w, eps):
    logp = torch.log_softmax(logits.double(), dim=1)
    k = logits.shape[1]
    total, denom = 0.0, 0.0
    for i in range(logits.shape[0]):
        y = int(targets[i])
        li = (1 - eps) * w[y] * -logp[i, y] + (eps / k) * sum(w[c] * -logp[i, c] for c in range(k))
        total += float(li)
        denom += float(w[y])
    return total / denom


def test_class_weighted_ce_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(7, 2)
    targets = torch.tensor([0, 1, 1, 0, 0, 0, 1])
    w = torch.tensor([0.6, 2.5])
    for eps in (0.0, 0.1, 0.3):
        got = class_weighted_ce(logits, targets, class_weights=w, label_smoothing=eps)
        assert float(got) == pytest.approx(_hand_weighted_smoothed_ce(logits, targets, w, eps), rel=1e-5)
    # no weights, no smoothing: plain CE
    assert float(class_weighted_ce(logits, targets)) == pytest.approx(float(F.cross_entropy(logits, targets)))


def test_class_weights_still_matter_with_label_smoothing():
    torch.manual_seed(1)
    logits = torch.randn(16, 2)
    targets = torch.tensor([0] * 12 + [1] * 4)
    w = class_weights_from_labels(targets)
    plain = class_weighted_ce(logits, targets, label_smoothing=0.1)
    weighted = class_weighted_ce(logits, targets, class_weights=w, label_smoothing=0.1)
    assert abs(float(plain) - float(weighted)) > 1e-3
    # the weighted loss's gradient puts more total weight on the rare class's samples
    lg = logits.clone().requires_grad_(True)
    class_weighted_ce(lg, targets, class_weights=w, label_smoothing=0.1).backward()
    grad_w = lg.grad.abs().sum(1)
    lg2 = logits.clone().requires_grad_(True)
    class_weighted_ce(lg2, targets, label_smoothing=0.1).backward()
    grad_p = lg2.grad.abs().sum(1)
    ratio_rare = grad_w[12:].sum() / grad_p[12:].sum()
    ratio_common = grad_w[:12].sum() / grad_p[:12].sum()
    assert ratio_rare > ratio_common * 2


def test_class_weighted_ce_rejects_bad_inputs():
    with pytest.raises(ValueError, match="label_smoothing"):
        class_weighted_ce(torch.zeros(2, 2), torch.tensor([0, 1]), label_smoothing=1.0)
    with pytest.raises(ValueError, match="class_weights has shape"):
        class_weighted_ce(torch.zeros(2, 2), torch.tensor([0, 1]), class_weights=torch.ones(3))


# ---------------------------------------------------------------- SelectiveNet


def _toy_selective(dtype=torch.float64, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cls = torch.randn(n, 2, generator=gen, dtype=dtype)
    gate = torch.randn(n, generator=gen, dtype=dtype)
    aux = torch.randn(n, 2, generator=gen, dtype=dtype)
    y = torch.tensor([0, 1] * (n // 2))
    return cls, gate, aux, y


def test_selectivenet_loss_value_matches_formula():
    cls, gate, aux, y = _toy_selective()
    loss, stats = selectivenet_loss(cls, gate, aux, y, coverage=0.9, lam=32.0, alpha=0.5)
    g = torch.sigmoid(gate)
    ce = F.cross_entropy(cls, y, reduction="none")
    r = (g * ce).sum() / g.sum()
    pen = 32.0 * max(0.0, 0.9 - float(g.mean())) ** 2
    aux_ce = F.cross_entropy(aux, y)
    expected = 0.5 * (float(r) + pen) + 0.5 * float(aux_ce)
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert stats["coverage"] == pytest.approx(float(g.mean()))
    assert stats["selective_risk"] == pytest.approx(float(r))
    assert stats["penalty"] == pytest.approx(pen)
    assert stats["aux_loss"] == pytest.approx(float(aux_ce))
    assert all(isinstance(v, float) for v in stats.values())


def test_selectivenet_risk_is_invariant_to_uniform_gate_scaling():
    # the coverage division: r depends on which samples the gate accepts, not on its overall level
    cls, _, aux, y = _toy_selective()
    g = torch.tensor([0.2, 0.4, 0.6, 0.1, 0.3, 0.5], dtype=torch.float64)
    _, s1 = selectivenet_loss(cls, torch.logit(g), aux, y, coverage=0.01)
    _, s2 = selectivenet_loss(cls, torch.logit(g * 1.5), aux, y, coverage=0.01)
    assert s1["selective_risk"] == pytest.approx(s2["selective_risk"], rel=1e-12)


def test_selectivenet_gradcheck_float64():
    cls, gate, aux, y = _toy_selective()
    w = torch.tensor([0.7, 1.8], dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_(True) for t in (cls, gate, aux))

    def fn(c, g, a):
        return selectivenet_loss(c, g, a, y, coverage=0.8, lam=32.0, alpha=0.5, class_weights=w)[0]

    # coverage 0.8 keeps the toy case inside the penalty's active region (phi below target)
    assert float(torch.sigmoid(gate).mean()) < 0.8
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_selectivenet_gate_gradient_by_hand():
    # equal per-sample CE: the risk term is flat in g, so the gate gradient is the penalty's alone:
    # dL/dz_i = alpha * (-2 lam (c - phi)) * g_i (1 - g_i) / n  < 0 when phi < c
    n = 4
    cls = torch.zeros(n, 2, dtype=torch.float64)
    aux = torch.zeros(n, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    gate = torch.tensor([-1.0, 0.0, 0.5, -2.0], dtype=torch.float64, requires_grad=True)
    c, lam, alpha = 0.8, 32.0, 0.5
    loss, _ = selectivenet_loss(cls, gate, aux, y, coverage=c, lam=lam, alpha=alpha)
    loss.backward()
    g = torch.sigmoid(gate.detach())
    phi = g.mean()
    expected = alpha * (-2 * lam * (c - phi)) * g * (1 - g) / n
    torch.testing.assert_close(gate.grad, expected)
    assert torch.all(gate.grad < 0)  # raising any gate (coverage below target) lowers the loss

    # once coverage exceeds the target, the penalty is off and the gate gradient vanishes here
    gate2 = torch.full((n,), 3.0, dtype=torch.float64, requires_grad=True)
    selectivenet_loss(cls, gate2, aux, y, coverage=c)[0].backward()
    torch.testing.assert_close(gate2.grad, torch.zeros(n, dtype=torch.float64))


def test_selectivenet_gate_gradient_ranks_samples_by_loss():
    # risk-term gradient: dr/dz_i = g_i (1 - g_i) (ce_i - r) / sum g: a high-loss sample's gate is pushed down
    cls = torch.tensor([[3.0, -3.0], [3.0, -3.0], [-3.0, 3.0]], dtype=torch.float64)  # third is wrong
    y = torch.tensor([0, 0, 0])
    gate = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    aux = torch.zeros(3, 2, dtype=torch.float64)
    selectivenet_loss(cls, gate, aux, y, coverage=0.1, alpha=1.0)[0].backward()  # penalty inactive
    g = torch.full((3,), 0.5, dtype=torch.float64)
    ce = F.cross_entropy(cls, y, reduction="none")
    r = (g * ce).sum() / g.sum()
    torch.testing.assert_close(gate.grad, g * (1 - g) * (ce - r) / g.sum())
    assert gate.grad[2] > 0 > gate.grad[0]


def test_selectivenet_rejects_bad_arguments():
    cls, gate, aux, y = _toy_selective()
    with pytest.raises(ValueError, match="coverage"):
        selectivenet_loss(cls, gate, aux, y, coverage=0.0)
    with pytest.raises(ValueError, match="one gate logit per sample"):
        selectivenet_loss(cls, gate[:3], aux, y, coverage=0.5)


# ---------------------------------------------------------------- risk-aware loss


def test_risk_aware_loss_matches_formula():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.2], [-1.0, 3.0], [1.5, -0.5]], dtype=torch.float64)
    y = torch.tensor([1, 0, 1, 0])
    got = risk_aware_loss(logits, y, fn_cost=5.0, fp_cost=1.0, gamma=2.0)
    p = torch.softmax(logits, 1)
    total = 0.0
    for i in range(4):
        py = float(p[i, y[i]])
        cost = 5.0 if int(y[i]) == 1 else 1.0
        total += cost * (1 - py) ** 2 * -math.log(py)
    assert float(got) == pytest.approx(total / 4, rel=1e-10)
    # the single-logit form gives the same value
    z = logits[:, 1] - logits[:, 0]
    assert float(risk_aware_loss(z, y)) == pytest.approx(float(got), rel=1e-10)
    # gamma=0, equal costs: plain CE
    assert float(risk_aware_loss(logits, y, fn_cost=1.0, fp_cost=1.0, gamma=0.0)) == pytest.approx(
        float(F.cross_entropy(logits, y)), rel=1e-10
    )


def test_risk_aware_loss_penalises_missed_roadwork_more():
    # a confident miss of a positive costs fn_cost/fp_cost times a mirrored confident false alarm
    miss = risk_aware_loss(torch.tensor([[3.0, -3.0]]), torch.tensor([1]))
    false_alarm = risk_aware_loss(torch.tensor([[-3.0, 3.0]]), torch.tensor([0]))
    assert float(miss) == pytest.approx(5.0 * float(false_alarm), rel=1e-6)
    # focal modulation: a confident error costs far more than the CE ratio relative to an easy correct one
    easy = risk_aware_loss(torch.tensor([[-3.0, 3.0]]), torch.tensor([1]))
    ce_ratio = float(F.cross_entropy(torch.tensor([[3.0, -3.0]]), torch.tensor([1]))) / float(
        F.cross_entropy(torch.tensor([[-3.0, 3.0]]), torch.tensor([1]))
    )
    assert float(miss) / float(easy) > 100 * ce_ratio


def test_risk_aware_loss_gradcheck_and_threshold_shift():
    logits = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 0, 1, 1, 0])
    assert torch.autograd.gradcheck(lambda x: risk_aware_loss(x, y), (logits,), eps=1e-6, atol=1e-6)
    # gamma=0: the loss-minimising constant p(roadwork) for true frequency 0.5 is fn/(fn+fp) = 5/6,
    # i.e. the Bayes threshold on the true probability moves to fp/(fp+fn) = 1/6
    z = torch.logit(torch.tensor([5 / 6], dtype=torch.float64)).requires_grad_(True)
    yy = torch.tensor([0, 1])
    risk_aware_loss(z.expand(2), yy, gamma=0.0).backward()
    assert abs(float(z.grad)) < 1e-12
    z2 = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # p = 1/2 is not the minimiser
    risk_aware_loss(z2.expand(2), yy, gamma=0.0).backward()
    assert float(z2.grad) < -0.5  # the loss still falls as p(roadwork) rises past 1/2


def test_risk_aware_loss_applies_class_weights_as_a_weighted_mean():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.2], [-1.0, 3.0], [1.5, -0.5], [0.3, 0.1]], dtype=torch.float64)
    y = torch.tensor([1, 0, 0, 0, 0])
    weights = class_weights_from_labels(y).double()  # [5/8, 5/2]: the rare positive counts 4x
    got = risk_aware_loss(logits, y, fn_cost=5.0, fp_cost=1.0, gamma=2.0, class_weights=weights)
    p = torch.softmax(logits, 1)
    num = den = 0.0
    for i in range(5):
        py = float(p[i, y[i]])
        w = float(weights[y[i]])
        num += w * (5.0 if int(y[i]) == 1 else 1.0) * (1 - py) ** 2 * -math.log(py)
        den += w
    assert float(got) == pytest.approx(num / den, rel=1e-10)
    plain = risk_aware_loss(logits, y, fn_cost=5.0, fp_cost=1.0, gamma=2.0)
    assert float(got) > 1.5 * float(plain)  # the missed positive weighs more: the weights are not ignored
    # all-ones weights are the unweighted mean; the single-logit form agrees
    assert float(risk_aware_loss(logits, y, class_weights=torch.ones(2))) == pytest.approx(float(plain), rel=1e-12)
    z = logits[:, 1] - logits[:, 0]
    assert float(risk_aware_loss(z, y, class_weights=weights)) == pytest.approx(float(got), rel=1e-10)
    # gamma=0, equal costs: class-weighted CE, PyTorch's weighted mean
    assert float(risk_aware_loss(logits, y, fn_cost=1.0, fp_cost=1.0, gamma=0.0, class_weights=weights)) == (
        pytest.approx(float(F.cross_entropy(logits, y, weight=weights)), rel=1e-10))
    with pytest.raises(ValueError, match=r"class_weights has shape \(3,\), expected \(2,\)"):
        risk_aware_loss(logits, y, class_weights=torch.ones(3))


def test_risk_aware_loss_rejects_bad_inputs():
    with pytest.raises(ValueError, match="binary"):
        risk_aware_loss(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="fn_cost"):
        risk_aware_loss(torch.zeros(2, 2), torch.tensor([0, 1]), fn_cost=0.0)
    with pytest.raises(ValueError, match="0 \\(no roadwork\\) or 1"):
        risk_aware_loss(torch.zeros(2, 2), torch.tensor([0, 2]))
