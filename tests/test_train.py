import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from stage1core.heads import STANDARD_CLIP, FeatureView, HeadConfig, build_head, feature_views
from stage1core.selection import Candidate, SelectionConfig, balanced_brier, select_candidate, standard_errors_allowed
from stage1core.train import (
    TrainConfig,
    _halving_rungs,
    fit_head,
    head_grid,
    load_head,
    predict_positive,
    save_head,
)
from tests.common import HANG_TIMEOUT_S

ONE = SelectionConfig(enabled=False)  # one head, trained by the AdamW loop


def blobs(n=600, d=32, seed=0, shift=2.0, pos_fraction=0.5):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < pos_fraction).astype(np.int64)
    x = rng.normal(size=(n, d)).astype(np.float32) * 3 + 5  # off-centre and scaled: the head standardises
    x[:, :4] += shift * y[:, None] * 3
    return x, y


FAST = TrainConfig(epochs=15, batch_size=64, patience=15, lr=5e-3)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_learns_separable_data(kind):
    x, y = blobs()
    xv, yv = blobs(seed=1)
    trained = fit_head(x, y, xv, yv, head=HeadConfig(kind=kind), config=FAST, selection=ONE)
    acc = ((predict_positive(trained.model, xv) >= 0.5) == yv).mean()
    assert acc > 0.9 and trained.kind == kind
    assert len(trained.history) == 15 and trained.history[-1]["train_loss"] < trained.history[0]["train_loss"]


def test_seeded_runs_are_identical_and_seeds_differ():
    x, y = blobs()
    xv, yv = blobs(seed=1)
    # 3 epochs (30 steps with shuffling, dropout and EMA) show determinism as well as 15; only the seed differs
    short = dataclasses.replace(FAST, epochs=3, patience=3)
    a = fit_head(x, y, xv, yv, config=short, selection=ONE)
    b = fit_head(x, y, xv, yv, config=short, selection=ONE)
    c = fit_head(x, y, xv, yv, config=dataclasses.replace(short, seed=1), selection=ONE)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_early_stopping_keeps_best_epoch_after_warmup():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 64)).astype(np.float32)
    y = rng.integers(0, 2, 200)
    xv = rng.normal(size=(100, 64)).astype(np.float32)
    yv = rng.integers(0, 2, 100)  # pure noise: the nearly untrained first epoch scores best on val
    config = TrainConfig(epochs=60, patience=3, lr=3e-3, ema_decay=0.0, warmup_epochs=2, batch_size=64)
    trained = fit_head(x, y, xv, yv, config=config, selection=ONE)
    scores = [h["val_brier"] for h in trained.history]
    assert int(np.argmin(scores)) == 0  # the trap: an epoch inside the LR warmup looks best
    assert len(trained.history) < 60
    # epoch 0 ends inside the warmup (4 steps/epoch, 8 warmup steps); epoch 1 is the first eligible
    assert trained.best_epoch == 1 + int(np.argmin(scores[1:]))
    assert len(trained.history) == trained.best_epoch + 1 + 3


@pytest.mark.slow
def test_class_weighting_raises_recall_of_the_rare_class():
    x, y = blobs(n=1000, shift=0.35, pos_fraction=0.1, seed=2)
    xv, yv = blobs(n=1000, shift=0.35, pos_fraction=0.1, seed=3)
    recall = {}
    for weighting in (False, True):
        cfg = TrainConfig(epochs=10, batch_size=64, patience=10, class_weighting=weighting, label_smoothing=0.1)
        p = predict_positive(fit_head(x, y, xv, yv, config=cfg, selection=ONE).model, xv)
        recall[weighting] = ((p >= 0.5) & (yv == 1)).sum() / (yv == 1).sum()
    assert recall[True] > recall[False] + 0.1


def test_save_and_load_round_trip(tmp_path):
    x, y = blobs()
    trained = fit_head(x, y, x, y, config=TrainConfig(epochs=2))
    sha = save_head(tmp_path / "head", trained)
    assert len(sha) == 64
    loaded = load_head(tmp_path / "head")
    np.testing.assert_array_equal(predict_positive(trained.model, x), predict_positive(loaded.model, x))
    assert (loaded.kind, loaded.view, loaded.grid, loaded.criterion) == (
        trained.kind, trained.view, trained.grid, trained.criterion)
    assert sum(row["chosen"] for row in loaded.grid) == 1


def test_bad_inputs_are_named():
    x, y = blobs(n=50)
    with pytest.raises(ValueError, match="val split needs both classes"):
        fit_head(x, y, x, np.zeros_like(y))
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="train features contain NaN"):
        fit_head(bad, y, x, y)


@pytest.mark.slow
def test_risk_aware_loss_trades_false_alarms_for_fewer_misses():
    x, y = blobs(n=1000, shift=0.5, seed=4)
    xv, yv = blobs(n=2000, shift=0.5, seed=5)
    fnr = {}
    for loss in ("ce", "risk_aware"):
        cfg = TrainConfig(epochs=10, batch_size=64, patience=10, lr=5e-3, loss=loss, fn_cost=5.0)
        p = predict_positive(fit_head(x, y, xv, yv, config=cfg, selection=ONE).model, xv)
        fnr[loss] = ((p < 0.5) & (yv == 1)).sum() / (yv == 1).sum()
    assert fnr["risk_aware"] < fnr["ce"] - 0.05


@pytest.mark.slow
def test_risk_aware_loss_applies_class_weighting():
    # rare positives: with class_weighting the risk-aware loss also counts each positive n / (2 n_1) times
    # (fn_cost on top), so the head misses fewer of them than the same loss unweighted
    x, y = blobs(n=1000, shift=0.35, pos_fraction=0.1, seed=2)
    xv, yv = blobs(n=1000, shift=0.35, pos_fraction=0.1, seed=3)
    heads, recall = {}, {}
    for weighting in (False, True):
        cfg = TrainConfig(epochs=10, batch_size=64, patience=10, class_weighting=weighting, loss="risk_aware",
                          fn_cost=2.0)
        heads[weighting] = fit_head(x, y, xv, yv, config=cfg, selection=ONE).model
        p = predict_positive(heads[weighting], xv)
        recall[weighting] = ((p >= 0.5) & (yv == 1)).sum() / (yv == 1).sum()
    on, off = heads[True].state_dict(), heads[False].state_dict()
    assert not all(torch.equal(on[k], off[k]) for k in on)  # the setting reaches the loss
    assert recall[True] > recall[False] + 0.1


@pytest.mark.slow
def test_selective_head_trains_a_gate_that_ranks_errors():
    from stage1core.train import head_outputs

    def mixed(n, seed):  # half the samples are separable, half are coin flips; feature 5 tells which
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, n)
        easy = rng.random(n) < 0.5
        x = rng.normal(size=(n, 16)).astype(np.float32)
        x[:, :4] += (easy * (2 * y - 1) * 2.0)[:, None]
        x[:, 5] += 3.0 * easy
        return x, y

    x, y = mixed(1500, 6)
    xv, yv = mixed(1500, 7)
    trained = fit_head(x, y, xv, yv, head=HeadConfig(kind="selective", target_coverage=0.6), config=FAST,
                       selection=ONE)
    out = head_outputs(trained.model, xv)
    correct = out["logits"].argmax(1) == yv
    gate = out["gate_logit"]
    top = gate >= np.quantile(gate, 0.5)
    assert correct[top].mean() > correct[~top].mean() + 0.05


# ---------------------------------------------------------------------------------------------------
# robust standardisation (real backbones have dead and near-constant feature dimensions)


def dead_dims(n=600, seed=0):
    """Blobs plus 4 dead dimensions (exactly constant on train) and 4 near-constant ones, whose val and
    test values leave the train range by far more than their train spread."""
    x, y = blobs(n=n, seed=seed)
    rng = np.random.default_rng(seed + 100)
    extra = np.zeros((n, 8), dtype=np.float32)
    extra[:, 4:] = 1.0 + rng.normal(scale=1e-5, size=(n, 4))
    return np.concatenate([x, extra], axis=1), y


def shifted(x, seed):
    """Val/test copies: the dead and near-constant dimensions move by 0.01 (1e3-1e4 train stds)."""
    out = x.copy()
    out[:, -8:] += np.random.default_rng(seed).normal(scale=0.01, size=(len(x), 8))
    return out


def test_standardised_features_stay_bounded_on_dead_and_near_constant_dimensions():
    x, y = dead_dims()
    head = build_head(HeadConfig(kind="linear"), x.shape[1])
    head.norm.set_stats(torch.as_tensor(x))
    z = head.norm(torch.as_tensor(shifted(x, 1)))
    assert torch.isfinite(z).all() and float(z.abs().max()) <= STANDARD_CLIP
    informative = head.norm(torch.as_tensor(x))[:, :4]
    assert float(informative.std(dim=0).min()) > 0.5  # informative dimensions keep their scale
    # a 0.01 shift on a dead dimension is small next to the median feature spread (3), and stays small:
    # with the old 1e-6 floor its z-scores reached ~1e4
    assert float(z[:, -8:-4].abs().max()) < 2.0


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_heads_learn_through_dead_dimensions_and_out_of_range_val_values(kind):
    x, y = dead_dims(seed=0)
    xv, yv = dead_dims(seed=1)
    xv = shifted(xv, 2)
    trained = fit_head(x, y, xv, yv, head=HeadConfig(kind=kind), config=FAST, selection=ONE)
    p = predict_positive(trained.model, xv)
    assert ((p >= 0.5) == yv).mean() > 0.9
    # with the old 1e-6 floor the shifted dimensions gave z-scores near 1e3 and val loss blew up
    assert max(h["val_loss"] for h in trained.history) < 1.0


# ---------------------------------------------------------------------------------------------------
# head selection


def test_grid_has_exact_linear_heads_and_adamw_heads_for_each_view():
    selection = SelectionConfig(lr_factors=(0.5, 2.0), weight_decay_factors=(1.0,), linear_c=(0.01, 1.0))
    views = feature_views("cls+avg", 64)
    grid = head_grid(HeadConfig(kind="auto"), TrainConfig(lr=1e-3, weight_decay=0.05), selection, views)
    assert {(c.kind, c.view.name) for c in grid} == {(k, v) for k in ("linear", "mlp") for v in ("all", "cls", "avg")}
    assert sorted(c.c for c in grid if c.kind == "linear" and c.view.name == "all") == [0.01, 1.0]
    assert sorted(c.lr for c in grid if c.kind == "mlp" and c.view.name == "cls") == [5e-4, 2e-3]
    # a policy that needs the gate trains selective heads only; selection off: one AdamW head
    assert {c.kind for c in head_grid(HeadConfig(), TrainConfig(), selection, views, needs_gate=True)} == {"selective"}
    assert len(head_grid(HeadConfig(), TrainConfig(), ONE, views)) == 1
    # the risk-aware loss has no exact solver: its linear heads train in the AdamW loop
    risk = head_grid(HeadConfig(kind="linear"), TrainConfig(loss="risk_aware"), selection, views[:1])
    assert all(c.lr is not None and c.c is None for c in risk)


def test_exact_linear_head_is_the_l2_logistic_regression_on_standardised_features():
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(n=400, shift=0.4, seed=8)
    xv, yv = blobs(n=400, shift=0.4, seed=9)
    selection = SelectionConfig(linear_c=(0.05,), refit=False)
    trained = fit_head(x, y, xv, yv, head=HeadConfig(kind="linear"), selection=selection)
    assert trained.kind == "linear" and trained.grid[0]["c"] == 0.05
    z = trained.model.norm(torch.as_tensor(x)).double().numpy()
    reference = LogisticRegression(C=0.05, class_weight="balanced", max_iter=5000, tol=1e-8).fit(z, y)
    zv = trained.model.norm(torch.as_tensor(xv)).double().numpy()
    np.testing.assert_allclose(predict_positive(trained.model, xv), reference.predict_proba(zv)[:, 1], atol=2e-3)


@pytest.mark.parametrize("noise_dims, expect_strong_l2", [(1000, True), (0, False)])
def test_linear_c_is_chosen_by_cross_validation_on_train(noise_dims, expect_strong_l2):
    rng = np.random.default_rng(noise_dims)

    def data(n):
        y = rng.integers(0, 2, n)
        x = np.concatenate([rng.normal(size=(n, 3)) + (2 * y - 1)[:, None] * 0.8,
                            rng.normal(size=(n, noise_dims))], axis=1).astype(np.float32)
        return x, y

    (x, y), (xv, yv) = data(160), data(400)
    trained = fit_head(x, y, xv, yv, head=HeadConfig(kind="linear"), selection=SelectionConfig())
    rows = [r for r in trained.grid if r["kind"] == "linear"]
    eligible = [r for r in rows if r["eligible"]]
    assert len(eligible) == 1 and eligible[0]["cv_brier"] == min(r["cv_brier"] for r in rows)
    assert eligible[0]["chosen"] and trained.grid[rows.index(eligible[0])]["c"] == eligible[0]["c"]
    # many useless dimensions on 160 images need a strong L2; three clean ones do not
    assert eligible[0]["c"] <= 0.03 if expect_strong_l2 else eligible[0]["c"] >= 0.1
    # and the C that cross-validation on train picked is close to the best on 400 other images
    assert eligible[0]["val_brier"] <= min(r["val_brier"] for r in rows) + 0.01


def test_one_standard_error_rule_prefers_the_simpler_head_unless_the_gain_is_clear():
    y = np.tile([0, 1], 100)
    sign = np.where(y == 1, 1.0, -1.0)
    linear = Candidate("linear", FeatureView("all", 0, 8), c=0.1)
    mlp = Candidate("mlp", FeatureView("all", 0, 8), lr=1e-3, weight_decay=0.05)
    steady = 0.5 + 0.3 * sign  # squared error 0.04 on every image
    # much better on half the images, much worse on the other half, a little better on average:
    # squared errors 0.0025 and 0.0729 (mean 0.0377); the paired differences have mean -0.0023, SE 0.0025
    half = (np.arange(200) // 2) % 2 == 0
    erratic = 0.5 + sign * np.where(half, 0.45, 0.23)
    chosen, ses = select_candidate([linear, mlp], [steady, erratic], y)
    assert balanced_brier(erratic, y) < balanced_brier(steady, y)
    assert chosen == 0 and ses[1] == 0.0 and ses[0] > 0
    clearly_better = 0.5 + 0.47 * sign
    chosen, _ = select_candidate([linear, mlp], [steady, clearly_better], y)
    assert chosen == 1
    # a candidate that is not eligible (a C that cross-validation did not pick) never wins
    chosen, _ = select_candidate([linear, mlp], [clearly_better, steady], y, eligible=[False, True])
    assert chosen == 1


def test_selection_picks_the_view_that_carries_the_signal():
    rng = np.random.default_rng(3)

    def cls_avg(n, seed):  # the "cls" half separates the classes, the "avg" half is noise
        r = np.random.default_rng(seed)
        y = r.integers(0, 2, n)
        x = r.normal(size=(n, 32)).astype(np.float32)
        x[:, :4] += (2 * y - 1)[:, None] * 1.5
        return x, y

    x, y = cls_avg(600, 4)
    xv, yv = cls_avg(600, 5)
    trained = fit_head(x, y, xv, yv, head=HeadConfig(kind="linear"), views=feature_views("cls+avg", 32),
                       selection=SelectionConfig(linear_c=(0.01, 0.1)))
    assert trained.view.name == "cls"
    probe = xv.copy()
    probe[:, 16:] = rng.normal(size=(len(xv), 16)) * 100  # the chosen head never reads the avg half
    np.testing.assert_array_equal(predict_positive(trained.model, xv), predict_positive(trained.model, probe))


@pytest.mark.slow
def test_default_selection_matches_or_beats_a_single_head_and_records_the_grid():
    x, y = blobs(n=800, shift=0.3, seed=10)
    xv, yv = blobs(n=800, shift=0.3, seed=11)
    xs, ys = blobs(n=2000, shift=0.3, seed=12)
    config = TrainConfig(epochs=12, batch_size=64, patience=4)
    grid = fit_head(x, y, xv, yv, config=config)
    single = fit_head(x, y, xv, yv, config=config, selection=ONE)
    brier = {name: balanced_brier(predict_positive(t.model, xs), ys) for name, t in (("grid", grid), ("one", single))}
    assert brier["grid"] <= brier["one"] + 0.01
    assert len(grid.grid) == 7 + 3 * 2 and sum(r["chosen"] for r in grid.grid) == 1
    chosen = next(r for r in grid.grid if r["chosen"])
    assert chosen["kind"] == grid.kind and chosen["best_epoch"] == grid.best_epoch
    assert all(r["best_epoch"] >= 1 for r in grid.grid if r["kind"] == "mlp")  # never a warmup epoch


def test_adamw_candidates_compete_with_their_last_epoch_by_default():
    """One val score per candidate (the end of its schedule), as the linear heads have: the minimum
    over every epoch's noisy val score would flatter the AdamW heads. "best" keeps early stopping (as
    the single head with selection off does: test_early_stopping_keeps_best_epoch_after_warmup)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 16)).astype(np.float32), rng.integers(0, 2, 200)
    xv, yv = rng.normal(size=(100, 16)).astype(np.float32), rng.integers(0, 2, 100)  # noise: early epochs win
    config = TrainConfig(epochs=12, patience=2, lr=3e-3, ema_decay=0.0, warmup_epochs=1, batch_size=64)
    head = HeadConfig(kind="mlp", hidden=16)
    logged = []
    last = fit_head(x, y, xv, yv, head=head, config=config, log_fn=lambda m, epoch: logged.append(epoch))
    assert logged == list(range(12))  # the training curve is logged every epoch, not only at the end
    assert SelectionConfig().adamw_epoch == "last"
    # successive halving: after a quarter of the schedule (3 of 12 epochs) only the best 2 train on,
    # after twice that (6 epochs) the best 1
    survivors = [row for row in last.grid if row["pruned_after_epoch"] is None]
    assert len(survivors) == 1 and all((r["best_epoch"], r["epochs_run"]) == (11, 12) for r in survivors)
    stops = sorted((r["pruned_after_epoch"], r["best_epoch"], r["epochs_run"]) for r in last.grid
                   if r["pruned_after_epoch"] is not None)
    assert stops == [(2, 2, 3)] * 4 + [(5, 5, 6)]
    assert "only the best 2 on val after epoch 3, then the best 1 on val after epoch 6 trained on" in last.criterion
    unpruned = fit_head(x, y, xv, yv, head=head, config=config, selection=SelectionConfig(adamw_prune_at=0))
    assert all((r["best_epoch"], r["epochs_run"], r["pruned_after_epoch"]) == (11, 12, None) for r in unpruned.grid)
    best = fit_head(x, y, xv, yv, head=head, config=config, selection=SelectionConfig(adamw_epoch="best"))
    assert any(row["epochs_run"] < 12 and row["best_epoch"] < 11 for row in best.grid)  # stopped early
    # the recorded criterion (head.json, model card) names the rule that was applied
    assert "AdamW heads: their last epoch" in last.criterion and "their best epoch" in best.criterion
    assert f"{standard_errors_allowed(len(last.grid)):.2f} standard errors" in last.criterion
    with pytest.raises(ValueError, match="adamw_epoch"):
        SelectionConfig(adamw_epoch="first")


def test_successive_halving_keeps_the_best_adamw_heads_on_val_and_counts_the_pruned_ones():
    """After `adamw_prune_at` of the epochs the AdamW candidates are ranked on val and all but the best
    `adamw_keep` stop there: they keep that epoch's score in the grid table, cannot be chosen, and
    still count in the one-SE allowance (the winner was picked among them too)."""
    x, y = blobs(n=300, d=16, shift=0.3, seed=4)
    xv, yv = blobs(n=200, d=16, shift=0.3, seed=5)
    config = TrainConfig(epochs=8, batch_size=64, warmup_epochs=1, lr=3e-3)
    selection = SelectionConfig(adamw_prune_at=0.5, adamw_keep=3)
    trained = fit_head(x, y, xv, yv, head=HeadConfig(kind="mlp", hidden=16), config=config, selection=selection)
    rows = trained.grid
    pruned = [r for r in rows if r["pruned_after_epoch"] is not None]
    kept = [r for r in rows if r["pruned_after_epoch"] is None]
    assert len(pruned) == 3 and len(kept) == 3
    assert all(r["pruned_after_epoch"] == 3 and r["epochs_run"] == 4 and not r["eligible"] for r in pruned)
    assert all(r["epochs_run"] == 8 and r["eligible"] for r in kept) and any(r["chosen"] for r in kept)
    # the survivors are the candidates with the best val scores at the rung
    from stage1core.train import _fit_adamw

    candidates = head_grid(HeadConfig(kind="mlp"), config, selection, [FeatureView("all", 0, 16)])
    logged = {}
    fitted = _fit_adamw(torch.as_tensor(x), y, torch.as_tensor(xv), yv, candidates, range(6),
                        head=HeadConfig(kind="mlp", hidden=16), config=config,
                        log_fn=lambda metrics, epoch: logged.__setitem__(epoch, metrics),
                        last_epoch=True, rungs={3: 3})
    at_rung = {i: r["history"][3]["val_brier"] for i, r in fitted.items()}
    gone = [i for i, r in fitted.items() if r.get("pruned") == 3]
    assert len(gone) == 3 and max(at_rung[i] for i in at_rung if i not in gone) <= min(at_rung[i] for i in gone)
    assert all(fitted[i]["score"] == at_rung[i] and len(fitted[i]["history"]) == 4 for i in gone)
    # the logged curve after the rung is the survivors' (a pruned head's old score is not this epoch's)
    for epoch in range(4, 8):
        assert logged[epoch]["candidates_active"] == 3
        assert logged[epoch]["best_val_brier"] == min(r["history"][epoch]["val_brier"] for i, r in fitted.items()
                                                      if i not in gone)
    assert f"{standard_errors_allowed(6):.2f} standard errors" in trained.criterion
    assert "only the best 3 on val after epoch 4 trained on" in trained.criterion
    # the survivors halve each time the epochs done double, down to one; a rung needs an epoch after it
    assert _halving_rungs(SelectionConfig(), TrainConfig(), 6) == {9: 2, 19: 1}
    assert _halving_rungs(SelectionConfig(adamw_keep=5), TrainConfig(), 6) == {9: 5, 19: 3}
    assert _halving_rungs(SelectionConfig(), TrainConfig(epochs=4), 6) == {2: 2}  # past the 2 warmup epochs
    assert _halving_rungs(SelectionConfig(adamw_keep=6), TrainConfig(), 6) == {}
    assert _halving_rungs(SelectionConfig(adamw_prune_at=0), TrainConfig(), 6) == {}
    # no rung past the LR warmup before the end, or as many to keep as there are: nobody is pruned
    short = fit_head(x, y, xv, yv, head=HeadConfig(kind="mlp", hidden=16),
                     config=dataclasses.replace(config, epochs=2), selection=selection)
    assert all(r["pruned_after_epoch"] is None for r in short.grid)
    for bad in ({"adamw_prune_at": 1.0}, {"adamw_keep": 0}):
        with pytest.raises(ValueError, match="adamw_prune_at"):
            SelectionConfig(**bad)


def test_more_candidates_need_a_clearer_gain_to_beat_the_simplest():
    """The best of many noisy val scores beats the simplest head by one SE by luck far more often
    than one rival does: the allowance grows with the number of candidates (Bonferroni)."""
    assert standard_errors_allowed(2) == 1.0
    assert standard_errors_allowed(7) == pytest.approx(1.936, abs=1e-3)
    assert standard_errors_allowed(3) < standard_errors_allowed(7) < standard_errors_allowed(13)
    y = np.tile([0, 1], 100)
    sign = np.where(y == 1, 1.0, -1.0)
    half = (np.arange(200) // 2) % 2 == 0
    linear = Candidate("linear", FeatureView("all", 0, 8), c=0.1)
    mlps = [Candidate("mlp", FeatureView("all", 0, 8), lr=lr, weight_decay=0.05) for lr in (1e-4, 3e-4, 1e-3,
                                                                                            3e-3, 1e-2, 3e-2)]
    steady = 0.5 + 0.3 * sign
    lucky = 0.5 + sign * np.where(half, 0.425, 0.24)  # 1.54 SE better than `steady` on these images
    worse = 0.5 + 0.2 * sign
    chosen, ses = select_candidate([linear, mlps[0]], [steady, lucky], y)
    assert chosen == 1  # one rival: 1.54 SE is a clear gain
    chosen, _ = select_candidate([linear, *mlps], [steady, lucky, *[worse] * 5], y)
    assert chosen == 0  # the best of six rivals: within 1.94 SE, the linear head stays


def test_the_chosen_head_is_fitted_again_on_train_and_val():
    """Val only chooses: the chosen linear head is the L2 logistic regression on train + val (norm
    stats and C cross-validated on both), the grid keeps the val scores of the train-only fit, and an
    AdamW head trains its whole schedule again on both (not when judged at its best val epoch)."""
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(n=300, shift=0.4, seed=8)
    xv, yv = blobs(n=300, shift=0.4, seed=9)
    xs, _ = blobs(n=300, shift=0.4, seed=10)
    xa, ya = np.concatenate([x, xv]), np.concatenate([y, yv])
    linear = HeadConfig(kind="linear")
    refitted = fit_head(x, y, xv, yv, head=linear, selection=SelectionConfig(linear_c=(0.05,)))
    kept = fit_head(x, y, xv, yv, head=linear, selection=SelectionConfig(linear_c=(0.05,), refit=False))
    row = refitted.grid[0]
    assert (row["refit_images"], row["refit_c"]) == (600, 0.05) and "refit_images" not in kept.grid[0]
    np.testing.assert_allclose(refitted.model.norm.mean.numpy(), xa.mean(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(kept.model.norm.mean.numpy(), x.mean(0), rtol=1e-5, atol=1e-4)
    z = refitted.model.norm(torch.as_tensor(xa)).double().numpy()
    reference = LogisticRegression(C=0.05, class_weight="balanced", max_iter=5000, tol=1e-8).fit(z, ya)
    zs = refitted.model.norm(torch.as_tensor(xs)).double().numpy()
    np.testing.assert_allclose(predict_positive(refitted.model, xs), reference.predict_proba(zs)[:, 1], atol=2e-3)
    assert np.abs(predict_positive(refitted.model, xs) - predict_positive(kept.model, xs)).max() > 1e-3
    assert row["val_brier"] == pytest.approx(balanced_brier(predict_positive(kept.model, xv), yv), abs=1e-9)
    assert "fitted again on train + val" in refitted.criterion and "again" not in kept.criterion

    config = TrainConfig(epochs=4, batch_size=64, lr=3e-3, warmup_epochs=1)
    mlp = HeadConfig(kind="mlp", hidden=16)
    again = fit_head(x, y, xv, yv, head=mlp, config=config)
    chosen = next(r for r in again.grid if r["chosen"])
    assert (chosen["refit_images"], chosen["refit_epochs"]) == (600, 4)
    best = fit_head(x, y, xv, yv, head=mlp, config=config, selection=SelectionConfig(adamw_epoch="best"))
    assert not any("refit_images" in r for r in best.grid)


def test_a_rare_class_never_vanishes_from_the_capped_rows_and_too_few_of_it_are_refused():
    from stage1core.selection import MIN_PER_CLASS, capped_rows

    y = np.array([0] * 9000 + [1] * 12)
    rows = capped_rows(y, 400, seed=0)
    assert len(rows) == 400 and np.bincount(y[rows]).tolist() == [400 - MIN_PER_CLASS, MIN_PER_CLASS]
    x, _ = blobs(n=60, seed=3)
    one = np.array([1] + [0] * 59)
    with pytest.raises(ValueError, match="at least 2 images of each class"):
        fit_head(x, one, x[:20], np.arange(20) % 2, head=HeadConfig(kind="linear"))


def test_capped_rows_is_a_seeded_stratified_subsample():
    from stage1core.selection import capped_rows

    y = np.array([0] * 900 + [1] * 100)
    rows = capped_rows(y, 200, seed=3)
    assert len(rows) == 200 and np.all(np.diff(rows) > 0)
    assert np.bincount(y[rows]).tolist() == [180, 20]  # the class ratio of all rows
    assert np.array_equal(rows, capped_rows(y, 200, seed=3)) and not np.array_equal(rows, capped_rows(y, 200, seed=4))
    assert capped_rows(y, 1000, seed=0) is None and capped_rows(y, 0, seed=0) is None
    with pytest.raises(ValueError, match="max_rows"):
        SelectionConfig(max_rows=10)


def test_stratified_folds_partition_the_rows_and_keep_each_class_share():
    from stage1core.selection import stratified_folds

    y = np.array([0] * 53 + [1] * 12)
    folds = stratified_folds(y, 5, seed=1)
    held = np.concatenate([h for _, h in folds])
    assert len(folds) == 5 and sorted(held.tolist()) == list(range(65))  # every row held out exactly once
    for fit, h in folds:
        assert sorted(np.concatenate([fit, h]).tolist()) == list(range(65))
        assert np.bincount(y[h], minlength=2)[1] in (2, 3) and len(h) == 13  # 12 / 5, and 65 / 5
    again = stratified_folds(y, 5, seed=1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, stratified_folds(y, 5, seed=2), strict=True))


def test_head_selection_does_not_import_scikit_learn():
    """The grid's folds and subsample are numpy: importing scikit-learn costs 1.2 s, more than the
    linear heads' whole cross-validation (the baselines import it where they run)."""
    code = ("import sys, numpy as np; from stage1core.train import fit_head; rng = np.random.default_rng(0); "
            "x = rng.normal(size=(200, 8)).astype('float32'); y = np.arange(200) % 2; "
            "fit_head(x, y, x[:60], y[:60], config=__import__('stage1core.train').train.TrainConfig(epochs=2)); "
            "print(sorted(m for m in sys.modules if m.startswith('sklearn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_grid_trains_on_at_most_max_rows_and_the_chosen_head_on_all_of_them():
    """At scale the grid sees a stratified subsample (its cost stops growing with the data); the chosen
    head is then fitted on every row: all of train, or train + val with refit."""
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(n=900, shift=0.3, seed=8)
    xv, yv = blobs(n=300, shift=0.3, seed=9)
    linear = HeadConfig(kind="linear")
    capped = SelectionConfig(linear_c=(0.05,), max_rows=300, refit=False)
    trained = fit_head(x, y, xv, yv, head=linear, selection=capped)
    row = trained.grid[0]
    assert (row["refit_images"], row["refit_c"]) == (900, 0.05)
    assert "subsample of 300 of the 900 train rows" in trained.criterion
    assert "fitted again on all of train" in trained.criterion
    # the final head is the logistic regression on all of train ...
    np.testing.assert_allclose(trained.model.norm.mean.numpy(), x.mean(0), rtol=1e-5, atol=1e-4)
    z = trained.model.norm(torch.as_tensor(x)).double().numpy()
    reference = LogisticRegression(C=0.05, class_weight="balanced", max_iter=5000, tol=1e-8).fit(z, y)
    zv = trained.model.norm(torch.as_tensor(xv)).double().numpy()
    np.testing.assert_allclose(predict_positive(trained.model, xv), reference.predict_proba(zv)[:, 1], atol=2e-3)
    # ... while the grid's val score is that of a head fitted on 300 rows
    uncapped = fit_head(x, y, xv, yv, head=linear, selection=dataclasses.replace(capped, max_rows=0))
    assert row["val_brier"] != pytest.approx(uncapped.grid[0]["val_brier"], abs=1e-6)
    assert np.abs(predict_positive(trained.model, xv) - predict_positive(uncapped.model, xv)).max() < 2e-3
    # with refit: train + val; AdamW heads of the grid train on the subsample, the chosen one on all rows
    config = TrainConfig(epochs=3, batch_size=64, lr=3e-3, warmup_epochs=1)
    mlp = fit_head(x, y, xv, yv, head=HeadConfig(kind="mlp", hidden=16), config=config,
                   selection=SelectionConfig(max_rows=300, lr_factors=(1.0,), weight_decay_factors=(1.0,)))
    chosen = next(r for r in mlp.grid if r["chosen"])
    assert (chosen["refit_images"], chosen["refit_epochs"]) == (1200, 3)
    assert mlp.history[-1]["step"] == 3 * 5  # 300 rows in batches of 64: 5 steps per epoch in the grid


def test_under_the_row_cap_selection_is_unchanged():
    x, y = blobs(n=300, shift=0.4, seed=8)
    xv, yv = blobs(n=300, shift=0.4, seed=9)
    config = TrainConfig(epochs=3, batch_size=64, lr=3e-3, warmup_epochs=1)
    head = HeadConfig(kind="auto", hidden=16)
    small = SelectionConfig(lr_factors=(1.0,), weight_decay_factors=(1.0,))
    a = fit_head(x, y, xv, yv, head=head, config=config, selection=small)
    b = fit_head(x, y, xv, yv, head=head, config=config, selection=dataclasses.replace(small, max_rows=0))
    assert [r["val_brier"] for r in a.grid] == [r["val_brier"] for r in b.grid]
    for (name, va), (_, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(va, vb), name
    # the refit solves only the chosen C on all rows: the weights of the whole path's cross-validated C
    # (what the refit fitted before the cap), solved on train + val (to the solver's tolerance: solved
    # alone or beside six others, a problem may take other BLAS kernels)
    from stage1core.train import _fit_exact_linear

    linear, path = HeadConfig(kind="linear"), SelectionConfig(linear_c=(0.001, 0.01, 0.1, 1.0))
    refitted = fit_head(x, y, xv, yv, head=linear, selection=path)
    candidates = head_grid(linear, TrainConfig(), path, [FeatureView("all", 0, x.shape[1])])
    whole = _fit_exact_linear(torch.as_tensor(np.concatenate([x, xv])), np.concatenate([y, yv]),
                              torch.as_tensor(xv), yv, candidates, range(len(candidates)), class_weighting=True,
                              cv_folds=path.cv_folds, seed=0)
    (kept,) = [r for r in whole.values() if r["eligible"]]
    assert next(r for r in refitted.grid if r["chosen"])["refit_c"] == candidates[
        next(i for i, r in whole.items() if r["eligible"])].c
    for name, value in refitted.model.state_dict().items():
        torch.testing.assert_close(value, kept["state"][name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_rare_class_in_the_capped_refit_still_cross_validates(monkeypatch):
    """The refit's C cross-validation runs on at most max_rows rows: its folds follow the rarer class
    there (3 of 100 rows here), not in all rows (27 of 900), so that every fold fits on both classes."""
    import stage1core.train as train_module

    made = []
    original = train_module.stratified_folds

    def recording(y, folds, seed):
        made.append((np.asarray(y), original(y, folds, seed)))
        return made[-1][1]

    monkeypatch.setattr(train_module, "stratified_folds", recording)
    x, y = blobs(n=900, shift=0.5, seed=8, pos_fraction=0.03)
    xv, yv = blobs(n=300, shift=0.5, seed=9, pos_fraction=0.2)
    trained = fit_head(x, y, xv, yv, head=HeadConfig(kind="linear"),
                       selection=SelectionConfig(linear_c=(0.01, 0.1), max_rows=100, refit=False))
    assert made and all(len(rows) == 100 for rows, _ in made)  # the grid's and the refit's, both capped
    for rows, folds in made:
        assert len(folds) == min(5, int(np.bincount(rows).min()))
        assert all(set(rows[fit].tolist()) == {0, 1} and set(rows[held].tolist()) == {0, 1} for fit, held in folds)
    chosen = next(r for r in trained.grid if r["chosen"])
    assert chosen["refit_images"] == 900 and chosen["refit_c"] in (0.01, 0.1)
