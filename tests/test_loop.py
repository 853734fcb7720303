"""The pieces both training loops share: the selection/early-stopping rule, the schedule, the EMA."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from stage1core.loop import EarlyStopping, cosine_schedule, judged_model, weight_ema


def test_an_evaluation_inside_the_warmup_never_wins():
    """The failure this rule exists for: the warm-up model scores best, later evaluations (at the full
    learning rate) look worse; the warm-up model must still not be kept."""
    rule = EarlyStopping(patience=5, warmup_steps=10)
    assert not rule.update(0.05, step=5, epoch=0)  # best score of the run, but inside the warmup
    assert rule.best_step == -1 and rule.stale == 0  # not even counted against patience
    assert rule.update(0.30, step=10, epoch=1)
    assert not rule.update(0.35, step=15, epoch=2)
    assert rule.update(0.20, step=20, epoch=3)
    assert (rule.best_score, rule.best_step, rule.best_epoch, rule.stale) == (0.20, 20, 3, 0)


def test_the_last_evaluation_is_eligible_even_inside_the_warmup():
    rule = EarlyStopping(patience=1, warmup_steps=100)
    assert not rule.update(0.1, step=40, epoch=0)
    assert rule.update(0.3, step=80, epoch=1, last=True)
    assert rule.best_step == 80 and not rule.stopped


def test_patience_counts_eligible_evaluations_without_a_real_improvement():
    rule = EarlyStopping(patience=2, warmup_steps=0)
    assert rule.update(0.5, step=1, epoch=0)
    assert not rule.update(0.5 - 1e-12, step=2, epoch=1)  # float noise is no improvement
    assert not rule.stopped and rule.stale == 1
    assert not rule.update(0.6, step=3, epoch=2)
    assert rule.stopped and rule.best_step == 1


def test_state_round_trips_through_json():
    fresh = EarlyStopping(patience=3, warmup_steps=4)
    again = EarlyStopping.from_json(json.loads(json.dumps(fresh.to_json())))
    assert again == fresh and math.isinf(again.best_score)
    fresh.update(0.123456789012345, step=5, epoch=1)
    fresh.update(0.2, step=6, epoch=2)
    again = EarlyStopping.from_json(json.loads(json.dumps(fresh.to_json())))
    assert again == fresh  # the score is bit-exact: a resumed run decides as the uninterrupted one


def test_cosine_schedule_warms_up_linearly_then_decays_to_the_floor():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-2)
    scheduler = cosine_schedule(optimizer, total_steps=100, warmup_steps=10, min_lr=1e-5)
    lrs = []
    for step in range(101):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[5] == pytest.approx(1e-5 + 0.5 * (1e-2 - 1e-5))
    assert lrs.index(max(lrs)) == 10
    # after the warmup, timm's cosine over the whole run (not restarted at the warmup's end)
    for step in (10, 50, 90, 100):
        cosine = 1e-5 + 0.5 * (1e-2 - 1e-5) * (1 + math.cos(math.pi * step / 100))
        assert lrs[step] == pytest.approx(cosine)


def test_weight_ema_is_optional_and_judged_when_present():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    assert weight_ema(model, decay=0.0, warmup=True) is None
    assert judged_model(model, None) is model
    ema = weight_ema(model, decay=0.9, warmup=False)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=100)  # past timm's first update, which copies the weights
    assert judged_model(model, ema) is ema.module
    # the EMA moved a tenth of the way toward the new weights
    torch.testing.assert_close(ema.module.weight, before + 0.1)
