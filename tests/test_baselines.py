"""The baselines scored next to the head: logistic regression (C by CV) and cosine kNN (DINOv3's vote)."""

import numpy as np
import pytest

from stage1core.baselines import BaselineConfig, compare_with_baselines, knn_weights, score_baselines


def blobs(n, seed, shift=1.0, d=16):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, :3] += (2 * y - 1)[:, None] * shift
    return x, y


def test_baselines_learn_separable_data_and_report_what_cv_chose():
    x, y = blobs(400, 0)
    xs, ys = blobs(400, 1)
    out = score_baselines(x, y, xs, ys, BaselineConfig(knn_k=(5, 15)))
    assert set(out) == {"logistic", "knn"}
    assert out["logistic"]["accuracy_at_0.5"] > 0.9 and out["logistic"]["auroc"] > 0.95
    assert out["knn"]["accuracy_at_0.5"] > 0.85
    assert out["logistic"]["chosen"].startswith("C=") and out["knn"]["chosen"] in ("k=5, T=0.07", "k=15, T=0.07")
    # no signal: no better than chance (within noise)
    noise_x, noise_y = np.random.default_rng(2).normal(size=(300, 16)), np.random.default_rng(3).integers(0, 2, 300)
    chance = score_baselines(noise_x[:150], noise_y[:150], noise_x[150:], noise_y[150:])
    assert all(m["auroc"] < 0.7 for m in chance.values())


def test_knn_votes_with_exp_similarity_over_temperature():
    weights = knn_weights(0.1)
    w = weights(np.array([[0.0, 0.1, 0.5]]))  # cosine distances = 1 - similarity
    np.testing.assert_allclose(w[0] / w[0, 0], np.exp(np.array([0.0, -0.1, -0.5]) / 0.1))
    assert np.isfinite(knn_weights(1e-4)(np.array([[0.0, 2.0]]))).all()  # shifted: no overflow


def test_comparison_flags_a_head_that_loses_by_more_than_the_margin():
    baselines = {"logistic": {"accuracy_at_0.5": 0.90, "mcc_at_0.5": 0.80}, "knn": {"accuracy_at_0.5": 0.85,
                                                                                  "mcc_at_0.5": 0.82}}
    ok = compare_with_baselines({"accuracy_at_0.5": 0.89, "mcc_at_0.5": 0.81}, baselines, margin=0.02)
    assert not ok["loses"] and ok["gaps"]["mcc_at_0.5"]["best_baseline"] == "knn"
    bad = compare_with_baselines({"accuracy_at_0.5": 0.91, "mcc_at_0.5": 0.79}, baselines, margin=0.02)
    assert bad["loses"] and "knn" in bad["verdict"] and "mcc_at_0.5" in bad["verdict"]
    assert bad["gaps"]["mcc_at_0.5"]["gap"] == pytest.approx(0.03)


def test_config_is_validated():
    with pytest.raises(ValueError, match="knn_k"):
        BaselineConfig(knn_k=(0,))
    with pytest.raises(ValueError, match="cv_folds"):
        BaselineConfig(cv_folds=1)
