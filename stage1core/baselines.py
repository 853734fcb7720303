"""Baselines scored next to the trained head in every run, on the same cached features and split.

- `logistic`: scikit-learn's StandardScaler + LogisticRegressionCV, C chosen by k-fold
  cross-validation on the train split (the plain linear probe a reviewer would try first);
- `knn`: a cosine k-nearest-neighbour classifier with DINOv3's k-NN evaluation weighting (each
  neighbour votes with exp(similarity / T)), k chosen by cross-validation on the train split.

Both are fitted on train only and scored on test at p >= 0.5, like the head's `*_at_0.5` metrics. They
always read the frozen backbone's cached features: after LoRA/DoRA fine-tuning they say whether the
fine-tuned model beats a probe of the backbone it started from.
`compare_with_baselines` says whether the head loses to the best of them by more than a margin; such
a run is flagged, its model version tagged, and `retrain` never promotes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import describe_fields
from .metrics import binary_metrics
from .selection import fold_count

BASELINES = ("logistic", "knn")
# the metrics a head must not lose on (both at the fixed threshold 0.5, the subnet's decision rule)
COMPARED = ("accuracy_at_0.5", "mcc_at_0.5")


@describe_fields
@dataclass(frozen=True)
class BaselineConfig:
    # fit and score the baselines in every run (off: no comparison, nothing flagged)
    enabled: bool = True
    # folds of the cross-validation on train that picks the logistic C and the k of kNN
    cv_folds: int = 5
    # number of C values (log-spaced 1e-4 .. 1e4, scikit-learn's default grid) for the logistic baseline
    logistic_cs: int = 10
    # neighbour counts tried by the kNN baseline (DINOv3's k-NN evaluation uses 10, 20, 100, 200)
    knn_k: tuple[int, ...] = (10, 20, 50)
    # temperature of the kNN vote weights exp(cosine similarity / T) (0.07 in DINOv3)
    knn_temperature: float = 0.07
    # the head "loses" when the best baseline beats it by more than this on test accuracy or MCC at 0.5
    margin: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "knn_k", tuple(self.knn_k))
        if self.cv_folds < 2 or self.logistic_cs < 1:
            raise ValueError(f"BaselineConfig.cv_folds must be >= 2 and logistic_cs >= 1, got "
                             f"{self.cv_folds}, {self.logistic_cs}")
        if not self.knn_k or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.knn_k):
            raise ValueError(f"BaselineConfig.knn_k must be a non-empty list of integers >= 1, got {self.knn_k!r}")
        if self.knn_temperature <= 0 or not 0.0 <= self.margin < 1.0:
            raise ValueError("BaselineConfig.knn_temperature must be > 0 and margin in [0, 1)")


def _folds(y: np.ndarray, wanted: int) -> int:
    """`selection.fold_count`, at least 2 (scikit-learn then warns about a class too rare to split)."""
    return max(2, fold_count(y, wanted))


def fit_logistic(x: np.ndarray, y: np.ndarray, config: BaselineConfig):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=config.logistic_cs, cv=_folds(y, config.cv_folds), scoring="accuracy", max_iter=3000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # scikit-learn 1.9 announces default changes (l1_ratios, scoring, fitted attributes) that do not
        # change this fit: L2 penalty, scoring given explicitly, C_ read through np.ravel
        warnings.simplefilter("ignore", FutureWarning)
        model.fit(x, y)
    return model


def knn_weights(temperature: float):
    """scikit-learn neighbour weights from cosine distances d = 1 - similarity: exp(similarity / T),
    shifted by the row maximum (the vote is scale-free) so that no weight overflows."""

    def weights(distances: np.ndarray) -> np.ndarray:
        sim = 1.0 - np.asarray(distances, dtype=np.float64)
        return np.exp((sim - sim.max(axis=-1, keepdims=True)) / temperature)

    return weights


def fit_knn(x: np.ndarray, y: np.ndarray, config: BaselineConfig):
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    ks = [k for k in config.knn_k if k < len(y)] or [max(1, len(y) // 2)]
    knn = KNeighborsClassifier(metric="cosine", algorithm="brute", weights=knn_weights(config.knn_temperature))
    folds = StratifiedKFold(_folds(y, config.cv_folds), shuffle=True, random_state=0)
    # each CV fold has (k-1)/k of train: a k that fits the full train split may not fit a fold
    fold_size = len(y) * (folds.get_n_splits() - 1) // folds.get_n_splits()
    grid = [k for k in ks if k <= fold_size] or [1]
    search = GridSearchCV(knn, {"n_neighbors": grid}, cv=folds, scoring="neg_brier_score")
    search.fit(x, y)
    return search.best_estimator_


def score_baselines(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                    config: BaselineConfig = BaselineConfig()) -> dict[str, dict[str, Any]]:
    """Per baseline: test metrics at p >= 0.5 (accuracy, MCC, AUROC, Brier, ...) and what CV chose."""
    train_y, test_y = np.asarray(train_y).astype(np.int64), np.asarray(test_y).astype(np.int64)
    out: dict[str, dict[str, Any]] = {}
    for name, fit in (("logistic", fit_logistic), ("knn", fit_knn)):
        model = fit(train_x, train_y, config)
        p = model.predict_proba(test_x)[:, list(model.classes_).index(1)]
        m = binary_metrics(test_y, p, threshold=0.5)
        chosen = (f"C={float(np.ravel(model[-1].C_)[0]):.4g}" if name == "logistic"
                  else f"k={model.n_neighbors}, T={config.knn_temperature:g}")
        out[name] = {"accuracy_at_0.5": m["accuracy"], "mcc_at_0.5": m["mcc"], "auroc": m["auroc"],
                     "brier": m["brier"], "fnr_at_0.5": m["fnr"], "fpr_at_0.5": m["fpr"], "chosen": chosen}
    return out


def compare_with_baselines(head: dict[str, Any], baselines: dict[str, dict[str, Any]], *, margin: float
                           ) -> dict[str, Any]:
    """Head vs the best baseline on each compared metric; `loses` when a baseline is ahead by > margin."""
    gaps = {}
    for key in COMPARED:
        best = max(baselines, key=lambda b: baselines[b][key])
        gaps[key] = {"best_baseline": best, "baseline": float(baselines[best][key]), "head": float(head[key]),
                     "gap": float(baselines[best][key]) - float(head[key])}
    worst = max(gaps, key=lambda k: gaps[k]["gap"])
    loses = gaps[worst]["gap"] > margin
    verdict = (f"head loses to {gaps[worst]['best_baseline']} on test {worst}: {gaps[worst]['head']:.4f} vs "
               f"{gaps[worst]['baseline']:.4f} (margin {margin})" if loses else
               f"head matches or beats the best baseline on test {' and '.join(COMPARED)} (margin {margin})")
    return {"loses": loses, "margin": margin, "gaps": gaps, "verdict": verdict}
