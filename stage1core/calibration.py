"""Post-hoc probability calibrators, fitted on the calib split only, and their JSON form.

Three calibrators, each a small object with ``fit``, ``apply``, ``to_json``, ``from_json`` and a
``kind`` string, serialised without pickle and checked against ``schemas/calibration.schema.json``:

- ``PlattScaling`` (Platt 1999): ``p = sigmoid(a * s + b)`` on a 1-d score, fitted with Platt's
  smoothed targets. Also the gate calibrator (``fit_gate_platt``; JSON in ``gateparams.schema.json``).
- ``TemperatureScaling`` (Guo et al. 2017): ``softmax(z / T)`` on logits, one ``T > 0``.
- ``DirichletCalibration`` (Kull et al. 2019): ``softmax(W log p + b)`` with ODIR regularisation; for
  two classes this is beta calibration (Kull, Silva Filho, Flach 2017), fitted under its ``a, b >= 0``
  constraint so that the map is monotone.

Shapes: a 1-d input means the binary positive-class view (a score, a logit margin ``z1 - z0``, or
p(roadwork)) and ``apply`` returns p(roadwork) as 1-d; an (N, K) input returns (N, K) probabilities.
The objectives and gradients are hand-written because sklearn has no temperature, Dirichlet or
soft-target Platt fit; the optimiser is scipy's L-BFGS-B (Brent for the one-parameter temperature).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from scipy import optimize
from scipy.special import expit, log_softmax, softmax

from .schemas import validate_json as _validate_json

__all__ = [
    "SCHEMA_DIR",
    "SCHEMA_VERSION",
    "DirichletCalibration",
    "PlattScaling",
    "TemperatureScaling",
    "fit_gate_platt",
    "load_calibrator",
    "validate_json",
]

logger = logging.getLogger(__name__)

SCHEMA_DIR = Path(__file__).parent / "schemas"
SCHEMA_VERSION = 1


# ---------------------------------------------------------------- schemas


def validate_json(obj: Any, schema_name: str) -> None:
    """Validate ``obj`` against ``SCHEMA_DIR/<schema_name>.schema.json`` (Draft 2020-12); raises a
    ValueError (stage1core.schemas.SchemaError) naming the schema, the location and the problem."""
    _validate_json(obj, schema_name.removesuffix(".json").removesuffix(".schema"), source=schema_name)


# ---------------------------------------------------------------- input checks


def _finite_array(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    bad = ~np.isfinite(arr)
    if bad.any():
        first = np.argwhere(bad)[0].tolist()
        raise ValueError(
            f"{name} has {int(bad.sum())} NaN/inf value(s), first at index {first}; "
            "calibrators need finite inputs: drop or fix those samples upstream"
        )
    return arr


def _labels(y: Any, n: int, num_classes: int) -> np.ndarray:
    arr = np.asarray(y).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"got {arr.shape[0]} labels for {n} samples")
    arr = _finite_array(arr, "labels")
    if not np.all(arr == np.round(arr)) or arr.min() < 0 or arr.max() >= num_classes:
        raise ValueError(f"labels must be integer class ids in [0, {num_classes})")
    return arr.astype(np.int64)


def _two_class_from_1d(x: np.ndarray) -> np.ndarray:
    return np.stack([np.zeros_like(x), x], axis=1)


def _check_probabilities(p: np.ndarray, name: str) -> None:
    if p.min() < 0 or p.max() > 1:
        raise ValueError(f"{name} must be probabilities in [0, 1]; got values in [{p.min()}, {p.max()}]")
    if p.ndim == 2:
        sums = p.sum(axis=1)
        if np.abs(sums - 1).max() > 1e-3:
            worst = int(np.argmax(np.abs(sums - 1)))
            raise ValueError(f"{name} rows must sum to 1; row {worst} sums to {sums[worst]}")


def _require_fitted(obj: Any, attr: str) -> None:
    if getattr(obj, attr) is None:
        raise ValueError(f"{type(obj).__name__} is not fitted: call fit() on the calib split first")


def _document(calibrator: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """A fitted calibrator's JSON: its kind, the schema version and `fields`, checked against the schema."""
    doc = {"kind": calibrator.kind, "schema_version": SCHEMA_VERSION, **fields}
    validate_json(doc, "calibration")
    return doc


def _check_document(d: dict[str, Any], kind: str) -> None:
    """A calibrator JSON about to be read: valid under the schema, and of this kind."""
    validate_json(d, "calibration")
    if d.get("kind") != kind:
        raise ValueError(f"expected a {kind!r} calibrator JSON, got kind {d.get('kind')!r}")


# ---------------------------------------------------------------- Platt scaling


class PlattScaling:
    """Platt scaling (Platt 1999): ``p = sigmoid(a * s + b)`` for a 1-d score ``s``.

    Fitted by minimising the cross-entropy against Platt's smoothed targets ``t+ = (N+ + 1)/(N+ + 2)``
    for positives and ``t- = 1/(N- + 2)`` for negatives, which keeps the fit finite on separable data.
    Note the sign convention: Platt's paper writes ``1 / (1 + exp(A s + B))``, i.e. ``a = -A``, ``b = -B``.
    ``score`` names the input (e.g. ``"logit_margin"``, ``"gate_logit"``), ``target`` what label 1 means.
    """

    kind: ClassVar[str] = "platt"

    def __init__(self, *, score: str = "score", target: str = "roadwork"):
        self.score = score
        self.target = target
        self.a: float | None = None
        self.b: float | None = None
        self.n_pos = 0
        self.n_neg = 0

    def fit(self, scores: Any, labels: Any) -> PlattScaling:
        s = _finite_array(scores, "scores").reshape(-1)
        y = _labels(labels, s.shape[0], 2)
        n_pos, n_neg = int(y.sum()), int((1 - y).sum())
        if n_pos == 0 or n_neg == 0:
            raise ValueError(
                f"Platt scaling needs both classes in the calib split; got {n_pos} positive(s) and "
                f"{n_neg} negative(s)"
            )
        t = np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
        # fit on the standardised score for conditioning, then map back to (a, b) on the raw score
        mu, sd = float(s.mean()), float(s.std())
        sd = sd if sd > 0 else 1.0
        u = (s - mu) / sd

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            z = theta[0] * u + theta[1]
            loss = np.mean(np.logaddexp(0.0, z) - t * z)
            r = (expit(z) - t) / s.shape[0]
            return float(loss), np.array([r @ u, r.sum()])

        res = optimize.minimize(objective, np.zeros(2), jac=True, method="L-BFGS-B", options={"gtol": 1e-10})
        a_std, b_std = (float(v) for v in res.x)
        self.a = a_std / sd
        self.b = b_std - a_std * mu / sd
        self.n_pos, self.n_neg = n_pos, n_neg
        return self

    def logit(self, scores: Any) -> np.ndarray:
        """The calibrated log-odds ``a * s + b``."""
        _require_fitted(self, "a")
        s = _finite_array(scores, "scores").reshape(-1)
        return self.a * s + self.b

    def apply(self, scores: Any) -> np.ndarray:
        """Calibrated probabilities of label 1, shape (N,)."""
        return expit(self.logit(scores))

    def to_json(self) -> dict[str, Any]:
        _require_fitted(self, "a")
        return _document(self, {
            "score": self.score,
            "target": self.target,
            "a": float(self.a),
            "b": float(self.b),
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
        })

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlattScaling:
        _check_document(d, cls.kind)
        obj = cls(score=d["score"], target=d["target"])
        obj.a, obj.b = float(d["a"]), float(d["b"])
        obj.n_pos, obj.n_neg = int(d["n_pos"]), int(d["n_neg"])
        return obj


def fit_gate_platt(gate_logits: Any, correct: Any) -> PlattScaling:
    """Platt-calibrate a SelectiveNet gate: P(classifier correct | gate logit).

    Fit on the calib split. Its ``to_json()`` also validates against ``gateparams.schema.json``.
    """
    correct = np.asarray(correct).astype(np.int64)
    platt = PlattScaling(score="gate_logit", target="correct").fit(gate_logits, correct)
    validate_json(platt.to_json(), "gateparams")
    return platt


# ---------------------------------------------------------------- temperature scaling


class TemperatureScaling:
    """Temperature scaling (Guo et al. 2017): ``softmax(z / T)`` with one ``T > 0`` minimising the NLL.

    Input: (N, K) logits, or a 1-d binary logit margin ``z1 - z0`` (then ``apply`` gives
    ``sigmoid(margin / T)``, the same number). ``T`` is searched as ``log T`` in ``[log t_min, log t_max]``
    with bounded Brent; a fit that lands on a bound is kept and logged (the logits carry little signal).
    """

    kind: ClassVar[str] = "temperature"

    def __init__(self, *, t_min: float = 1e-2, t_max: float = 1e2):
        if not 0 < t_min < t_max:
            raise ValueError(f"need 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = t_min, t_max
        self.temperature: float | None = None
        self.n_calib = 0

    @staticmethod
    def _as_logits(logits: Any) -> tuple[np.ndarray, bool]:
        z = _finite_array(logits, "logits")
        if z.ndim == 1:
            return _two_class_from_1d(z), True
        if z.ndim != 2 or z.shape[1] < 2:
            raise ValueError(f"logits must be (N, K>=2) or a 1-d binary margin; got shape {z.shape}")
        return z, False

    def fit(self, logits: Any, labels: Any) -> TemperatureScaling:
        z, _ = self._as_logits(logits)
        y = _labels(labels, z.shape[0], z.shape[1])
        rows = np.arange(z.shape[0])

        def nll(log_t: float) -> float:
            return float(-np.mean(log_softmax(z * np.exp(-log_t), axis=1)[rows, y]))

        lo, hi = np.log(self.t_min), np.log(self.t_max)
        res = optimize.minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-9})
        if min(res.x - lo, hi - res.x) < 1e-4:
            logger.warning(
                "temperature fit hit the search bound (T=%.3g in [%g, %g]): the logits look uninformative "
                "on the calib split",
                np.exp(res.x),
                self.t_min,
                self.t_max,
            )
        self.temperature = float(np.exp(res.x))
        self.n_calib = int(z.shape[0])
        return self

    def apply(self, logits: Any) -> np.ndarray:
        _require_fitted(self, "temperature")
        z, binary = self._as_logits(logits)
        p = softmax(z / self.temperature, axis=1)
        return p[:, 1] if binary else p

    def to_json(self) -> dict[str, Any]:
        _require_fitted(self, "temperature")
        return _document(self, {
            "temperature": float(self.temperature),
            "n_calib": self.n_calib,
        })

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TemperatureScaling:
        _check_document(d, cls.kind)
        obj = cls()
        obj.temperature = float(d["temperature"])
        obj.n_calib = int(d["n_calib"])
        return obj


# ---------------------------------------------------------------- Dirichlet calibration


class DirichletCalibration:
    """Dirichlet calibration (Kull et al. 2019), matrix scaling on log-probabilities with ODIR.

    ``q = softmax(W log p + b)`` with ``W`` (K, K) and ``b`` (K,), fitted by minimising
    ``mean NLL + reg_lambda / (K (K-1)) * sum_{i != j} W_ij^2 + reg_mu / K * sum_j b_j^2``
    (Off-Diagonal and Intercept Regularisation). Starts at ``W = I, b = 0``, the identity map.
    ``log p`` is taken after clipping ``p`` to ``[eps, 1]``.

    For K = 2 this is beta calibration (Kull, Silva Filho, Flach 2017):
    ``q1 = sigmoid(a ln p - b ln(1 - p) + c)`` with ``a = W11 - W01``, ``b = W00 - W10``,
    ``c = b1 - b0``; ``beta_params()`` returns ``(a, b, c)``. Input: (N, K) probabilities, or 1-d
    p(roadwork) for the binary case (then ``apply`` returns 1-d).

    Binary fits carry beta calibration's constraint ``a >= 0, b >= 0``, which makes the map
    non-decreasing in p (its log-odds have slope ``a / p + b / (1 - p) >= 0``); unconstrained, a
    calib set whose positives thin out at high scores yields ``b < 0`` and a map that turns down.
    Only ``(a, b, c)`` reach the output, and for any ``W, b`` the point ``W = diag(b, a)``,
    intercepts ``(-c/2, c/2)`` gives the same map with no larger ODIR penalty, so the binary fit
    minimises ``mean NLL + reg_mu * c^2 / 4`` over ``(a, b, c)`` with L-BFGS-B bounds ``a, b >= 0``
    and stores that point: the constrained optimum of the objective above, in the same JSON form.
    Monotonicity is what keeps the FNR guarantee intact: the decision is ``p_raw >= t`` with t the
    certified threshold (``guarantees.fnr_threshold``), and for a non-decreasing q every sample
    predicted roadwork has ``q(p_raw) >= q(t)``; deciding on ``q >= q(t)`` instead predicts roadwork
    on the same samples (a superset where q is flat), so its FNR is no larger and
    ``P(FNR <= alpha) >= 1 - delta`` still holds. A non-monotone q would rank some rejected samples
    above accepted ones, and the order-statistic argument would not cover a cut on q.
    For K > 2 the map stays unconstrained, as in Kull et al. (2019): "monotone" has no single
    meaning for a K-class map, and the pipeline calibrates the binary p(roadwork).
    """

    kind: ClassVar[str] = "dirichlet"

    def __init__(self, *, reg_lambda: float = 1e-3, reg_mu: float = 1e-3, eps: float = 1e-12):
        if reg_lambda < 0 or reg_mu < 0:
            raise ValueError(f"reg_lambda and reg_mu must be >= 0, got {reg_lambda}, {reg_mu}")
        if not 0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps}")
        self.reg_lambda, self.reg_mu, self.eps = reg_lambda, reg_mu, eps
        self.weights: np.ndarray | None = None
        self.intercepts: np.ndarray | None = None
        self.n_calib = 0

    def _as_probabilities(self, probs: Any) -> tuple[np.ndarray, bool]:
        p = _finite_array(probs, "probabilities")
        if p.ndim == 1:
            _check_probabilities(p, "probabilities")
            return np.stack([1.0 - p, p], axis=1), True
        if p.ndim != 2 or p.shape[1] < 2:
            raise ValueError(f"probabilities must be (N, K>=2) or 1-d p(roadwork); got shape {p.shape}")
        _check_probabilities(p, "probabilities")
        return p, False

    def _log_features(self, p: np.ndarray) -> np.ndarray:
        return np.log(np.clip(p, self.eps, 1.0))

    def objective(self, theta: np.ndarray, x: np.ndarray, y_onehot: np.ndarray) -> tuple[float, np.ndarray]:
        """ODIR-regularised mean NLL and its gradient; ``theta`` is ``W`` (row-major) then ``b``."""
        n, k = x.shape
        w, b = theta[: k * k].reshape(k, k), theta[k * k :]
        logits = x @ w.T + b
        logq = log_softmax(logits, axis=1)
        off = ~np.eye(k, dtype=bool)
        od_scale = self.reg_lambda / (k * (k - 1))
        mu_scale = self.reg_mu / k
        loss = -np.sum(y_onehot * logq) / n + od_scale * np.sum(w[off] ** 2) + mu_scale * np.sum(b**2)
        resid = (np.exp(logq) - y_onehot) / n
        grad_w = resid.T @ x + 2 * od_scale * np.where(off, w, 0.0)
        grad_b = resid.sum(axis=0) + 2 * mu_scale * b
        return float(loss), np.concatenate([grad_w.ravel(), grad_b])

    def beta_objective(self, theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Binary objective in beta parameters ``theta = (a, b, c)`` and its gradient: mean NLL of
        ``sigmoid(a x1 - b x0 + c)`` (``x = log p``, (N, 2)) plus ``reg_mu * c^2 / 4``, the intercept
        penalty at ``(-c/2, c/2)``; the ODIR term is 0 at ``W = diag(b, a)``."""
        a, b, c = theta
        z = a * x[:, 1] - b * x[:, 0] + c
        n = x.shape[0]
        loss = np.mean(np.logaddexp(0.0, z) - y * z) + self.reg_mu * c**2 / 4
        r = (expit(z) - y) / n
        grad = np.array([r @ x[:, 1], -(r @ x[:, 0]), r.sum() + self.reg_mu * c / 2])
        return float(loss), grad

    def _fit_beta(self, x: np.ndarray, y: np.ndarray) -> None:
        res = optimize.minimize(
            self.beta_objective,
            np.array([1.0, 1.0, 0.0]),  # the identity map
            args=(x, y.astype(np.float64)),
            jac=True,
            method="L-BFGS-B",
            bounds=[(0.0, None), (0.0, None), (None, None)],
            options={"maxiter": 2000, "gtol": 1e-9, "ftol": 1e-14},
        )
        if not np.all(np.isfinite(res.x)):
            raise ValueError(f"beta calibration diverged ({res.message}); raise reg_mu")
        a, b, c = (float(v) for v in res.x)
        self.weights = np.array([[b, 0.0], [0.0, a]])
        self.intercepts = np.array([-c / 2, c / 2])

    def fit(self, probs: Any, labels: Any) -> DirichletCalibration:
        p, _ = self._as_probabilities(probs)
        n, k = p.shape
        y = _labels(labels, n, k)
        x = self._log_features(p)
        if k == 2:
            self._fit_beta(x, y)
            self.n_calib = n
            return self
        y_onehot = np.eye(k)[y]
        theta0 = np.concatenate([np.eye(k).ravel(), np.zeros(k)])
        res = optimize.minimize(
            self.objective,
            theta0,
            args=(x, y_onehot),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 2000, "gtol": 1e-9, "ftol": 1e-14},
        )
        if not np.all(np.isfinite(res.x)):
            raise ValueError(f"Dirichlet calibration diverged ({res.message}); raise reg_lambda/reg_mu")
        self.weights = res.x[: k * k].reshape(k, k).copy()
        self.intercepts = res.x[k * k :].copy()
        self.n_calib = n
        return self

    def apply(self, probs: Any) -> np.ndarray:
        _require_fitted(self, "weights")
        p, binary = self._as_probabilities(probs)
        k = self.weights.shape[0]
        if p.shape[1] != k:
            raise ValueError(f"calibrator was fitted on {k} classes, got probabilities with {p.shape[1]}")
        q = softmax(self._log_features(p) @ self.weights.T + self.intercepts, axis=1)
        return q[:, 1] if binary else q

    def beta_params(self) -> tuple[float, float, float]:
        """For K = 2: ``(a, b, c)`` of the beta map ``sigmoid(a ln p - b ln(1 - p) + c)``."""
        _require_fitted(self, "weights")
        if self.weights.shape != (2, 2):
            raise ValueError("beta_params is defined for the binary (K = 2) case only")
        w, b = self.weights, self.intercepts
        return float(w[1, 1] - w[0, 1]), float(w[0, 0] - w[1, 0]), float(b[1] - b[0])

    def to_json(self) -> dict[str, Any]:
        _require_fitted(self, "weights")
        return _document(self, {
            "num_classes": int(self.weights.shape[0]),
            "weights": [[float(v) for v in row] for row in self.weights],
            "intercepts": [float(v) for v in self.intercepts],
            "reg_lambda": float(self.reg_lambda),
            "reg_mu": float(self.reg_mu),
            "eps": float(self.eps),
            "n_calib": self.n_calib,
        })

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DirichletCalibration:
        _check_document(d, cls.kind)
        k = int(d["num_classes"])
        w = np.asarray(d["weights"], dtype=np.float64)
        b = np.asarray(d["intercepts"], dtype=np.float64)
        if w.shape != (k, k) or b.shape != (k,):
            raise ValueError(
                f"dirichlet calibration JSON: num_classes={k} but weights are {list(w.shape)} and "
                f"intercepts {list(b.shape)}; expected [{k}, {k}] and [{k}]"
            )
        obj = cls(reg_lambda=float(d["reg_lambda"]), reg_mu=float(d["reg_mu"]), eps=float(d["eps"]))
        obj.weights, obj.intercepts, obj.n_calib = w, b, int(d["n_calib"])
        if k == 2 and min(obj.beta_params()[:2]) < 0:
            logger.warning(
                "binary dirichlet calibration JSON has beta parameters a=%.4g, b=%.4g: a negative one makes "
                "the map non-monotone (fitted before the a, b >= 0 constraint); refit it on the calib split",
                *obj.beta_params()[:2],
            )
        return obj


# ---------------------------------------------------------------- dispatch

_CALIBRATORS: dict[str, type] = {
    cls.kind: cls for cls in (PlattScaling, TemperatureScaling, DirichletCalibration)
}


def load_calibrator(d: dict[str, Any]) -> PlattScaling | TemperatureScaling | DirichletCalibration:
    """Build the calibrator a ``to_json()`` dict describes, after validating it against the schema."""
    validate_json(d, "calibration")
    return _CALIBRATORS[d["kind"]].from_json(d)
