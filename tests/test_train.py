import numpy as np
import pytest
import torch

from stage1core.heads import HeadConfig
from stage1core.train import TrainConfig, fit_head, load_head, predict_positive, save_head


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
    trained = fit_head(x, y, xv, yv, head=HeadConfig(kind=kind), config=FAST)
    acc = ((predict_positive(trained.model, xv) >= 0.5) == yv).mean()
    assert acc > 0.9
    assert len(trained.history) == 15 and trained.history[-1]["train_loss"] < trained.history[0]["train_loss"]


def test_seeded_runs_are_identical_and_seeds_differ():
    x, y = blobs()
    xv, yv = blobs(seed=1)
    a = fit_head(x, y, xv, yv, config=FAST)
    b = fit_head(x, y, xv, yv, config=FAST)
    c = fit_head(x, y, xv, yv, config=TrainConfig(epochs=15, batch_size=64, patience=15, seed=1))
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_early_stopping_keeps_best_epoch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 64)).astype(np.float32)
    y = rng.integers(0, 2, 200)
    xv = rng.normal(size=(100, 64)).astype(np.float32)
    yv = rng.integers(0, 2, 100)  # pure noise: validation loss stops improving quickly
    trained = fit_head(x, y, xv, yv, config=TrainConfig(epochs=60, patience=3, lr=3e-3, ema_decay=0.0))
    assert len(trained.history) < 60
    losses = [h["val_loss"] for h in trained.history]
    assert trained.best_epoch == int(np.argmin(losses))
    assert len(trained.history) == trained.best_epoch + 1 + 3


def test_class_weighting_raises_recall_of_the_rare_class():
    x, y = blobs(n=1000, shift=0.35, pos_fraction=0.1, seed=2)
    xv, yv = blobs(n=1000, shift=0.35, pos_fraction=0.1, seed=3)
    recall = {}
    for weighting in (False, True):
        cfg = TrainConfig(epochs=10, batch_size=64, patience=10, class_weighting=weighting, label_smoothing=0.1)
        p = predict_positive(fit_head(x, y, xv, yv, config=cfg).model, xv)
        recall[weighting] = ((p >= 0.5) & (yv == 1)).sum() / (yv == 1).sum()
    assert recall[True] > recall[False] + 0.1


def test_save_and_load_round_trip(tmp_path):
    x, y = blobs()
    trained = fit_head(x, y, x, y, config=TrainConfig(epochs=2))
    sha = save_head(tmp_path / "head", trained)
    assert len(sha) == 64
    loaded = load_head(tmp_path / "head")
    np.testing.assert_array_equal(predict_positive(trained.model, x), predict_positive(loaded.model, x))


def test_bad_inputs_are_named():
    x, y = blobs(n=50)
    with pytest.raises(ValueError, match="val split needs both classes"):
        fit_head(x, y, x, np.zeros_like(y))
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="train features contain NaN"):
        fit_head(bad, y, x, y)


def test_risk_aware_loss_trades_false_alarms_for_fewer_misses():
    x, y = blobs(n=1000, shift=0.5, seed=4)
    xv, yv = blobs(n=2000, shift=0.5, seed=5)
    fnr = {}
    for loss in ("ce", "risk_aware"):
        cfg = TrainConfig(epochs=10, batch_size=64, patience=10, lr=5e-3, loss=loss, fn_cost=5.0)
        p = predict_positive(fit_head(x, y, xv, yv, config=cfg).model, xv)
        fnr[loss] = ((p < 0.5) & (yv == 1)).sum() / (yv == 1).sum()
    assert fnr["risk_aware"] < fnr["ce"] - 0.05


def test_risk_aware_loss_applies_class_weighting():
    # rare positives: with class_weighting the risk-aware loss also counts each positive n / (2 n_1) times
    # (fn_cost on top), so the head misses fewer of them than the same loss unweighted
    x, y = blobs(n=1000, shift=0.35, pos_fraction=0.1, seed=2)
    xv, yv = blobs(n=1000, shift=0.35, pos_fraction=0.1, seed=3)
    heads, recall = {}, {}
    for weighting in (False, True):
        cfg = TrainConfig(epochs=10, batch_size=64, patience=10, class_weighting=weighting, loss="risk_aware",
                          fn_cost=2.0)
        heads[weighting] = fit_head(x, y, xv, yv, config=cfg).model
        p = predict_positive(heads[weighting], xv)
        recall[weighting] = ((p >= 0.5) & (yv == 1)).sum() / (yv == 1).sum()
    on, off = heads[True].state_dict(), heads[False].state_dict()
    assert not all(torch.equal(on[k], off[k]) for k in on)  # the setting reaches the loss
    assert recall[True] > recall[False] + 0.1


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
    trained = fit_head(x, y, xv, yv, head=HeadConfig(kind="selective", target_coverage=0.6), config=FAST)
    out = head_outputs(trained.model, xv)
    correct = out["logits"].argmax(1) == yv
    gate = out["gate_logit"]
    top = gate >= np.quantile(gate, 0.5)
    assert correct[top].mean() > correct[~top].mean() + 0.05
