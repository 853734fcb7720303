"""Heads on cached features: bounded standardisation, feature views, kinds and their outputs."""

from __future__ import annotations

import pytest
import torch

from stage1core.heads import (
    STANDARD_CLIP,
    STD_FLOOR_FRACTION,
    FeatureView,
    HeadConfig,
    LinearHead,
    MLPHead,
    SelectiveHead,
    build_head,
    feature_views,
    positive_probability,
)


def test_config_validates_and_names_the_kinds_to_train():
    for bad in [dict(kind="svm"), dict(dropout=1.0), dict(hidden=0), dict(target_coverage=0.0),
                dict(selective_alpha=1.5), dict(coverage_lambda=-1.0)]:
        with pytest.raises(ValueError):
            HeadConfig(**bad)
    auto = HeadConfig()
    assert auto.kinds(selection=True) == ("linear", "mlp")
    assert auto.kinds(selection=False) == ("mlp",)
    assert auto.kinds(selection=True, needs_gate=True) == ("selective",)
    assert HeadConfig(kind="linear").kinds(selection=True, needs_gate=True) == ("linear",)


def test_feature_views_split_cls_and_patch_mean():
    assert feature_views("cls", 6) == [FeatureView("all", 0, 6)]
    views = feature_views("cls+avg", 8)
    assert [(v.name, v.start, v.stop, v.dim) for v in views] == [("all", 0, 8, 8), ("cls", 0, 4, 4),
                                                                  ("avg", 4, 8, 4)]
    with pytest.raises(ValueError, match="even"):
        feature_views("cls+avg", 7)


def test_standardisation_floors_dead_dimensions_and_clips():
    torch.manual_seed(0)
    train = torch.randn(200, 4)
    train[:, 3] = 0.0  # a dead dimension: std exactly 0
    head = build_head(HeadConfig(kind="linear"), 4)
    head.norm.set_stats(train)
    median_std = float(train.double().std(dim=0).median())  # over all dimensions, the dead one included
    assert float(head.norm.std[3]) == pytest.approx(STD_FLOOR_FRACTION * median_std, rel=1e-5)
    z = head.norm(torch.tensor([[0.0, 0.0, 0.0, 1e4]]))
    assert float(z[0, 3]) == STANDARD_CLIP  # bounded, not 1e4 / 1e-6
    moved = train.clone()
    moved[:, 0] += 3 * float(train[:, 0].std())
    assert float(head.norm(moved)[:, 0].mean()) == pytest.approx(3.0, abs=0.05)


@pytest.mark.parametrize("kind", ["linear", "mlp", "selective"])
def test_a_head_reads_only_its_view(kind):
    torch.manual_seed(1)
    head = build_head(HeadConfig(kind=kind, hidden=8, dropout=0.0), 8, view=FeatureView("avg", 4, 8))
    assert isinstance(head, {"linear": LinearHead, "mlp": MLPHead, "selective": SelectiveHead}[kind])
    x = torch.randn(16, 8)
    head.norm.set_stats(x)
    head.eval()
    other = x.clone()
    other[:, :4] = torch.randn(16, 4) * 100  # the CLS half, which this head does not read
    torch.testing.assert_close(head(other), head(x))
    own = x.clone()
    own[:, 4:] += 1.0
    assert not torch.allclose(head(own), head(x))
    with pytest.raises(ValueError, match="does not fit"):
        build_head(HeadConfig(kind=kind), 6, view=FeatureView("avg", 4, 8))


def test_selective_head_returns_cls_gate_and_aux():
    torch.manual_seed(2)
    head = build_head(HeadConfig(kind="selective", hidden=8, dropout=0.0), 5).eval()
    x = torch.randn(3, 5)
    cls, gate, aux = head(x, return_all=True)
    assert cls.shape == (3, 2) and gate.shape == (3,) and aux.shape == (3, 2)
    torch.testing.assert_close(head(x), cls)
    assert build_head(HeadConfig(kind="auto", hidden=8), 5).__class__ is MLPHead  # auto alone means mlp


def test_positive_probability_is_the_softmax_of_the_roadwork_logit():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [3.0, 3.0]], dtype=torch.float64)
    p = positive_probability(logits)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, torch.sigmoid(logits[:, 1] - logits[:, 0]).float())
