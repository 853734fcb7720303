"""L2-regularised logistic regressions solved side by side (the linear heads' C path and its folds).

Each problem k is scikit-learn's binary `LogisticRegression` objective, scaled as scikit-learn's
L-BFGS solver scales it (`_logistic_regression_path`): with row weights a_k (0: the row is not in
the problem; class-balanced weights for `class_weight="balanced"`) and A_k = sum(a_k),

    F_k(w, b) = sum_i a_ki * log(1 + exp(-y'_i (z_i . w + b))) / A_k + |w|^2 / (2 C_k A_k),

the intercept b unpenalised. Every problem runs its own L-BFGS (its own history, step and stopping
test: the largest gradient entry at most `tol`, or a relative decrease of F under `ftol`, the tests
scipy's L-BFGS-B applies for scikit-learn), but their function and gradient evaluations share two
matrix products over all unfinished problems: (n x d+1) by (d+1 x K). One scikit-learn solve of such
a problem spends most of its time in fixed per-call costs (a 1,281-dimensional L-BFGS-B step costs
more than the 700 x 1,280 products it waits for, profiled), so 5 folds x 7 C values solved one by
one cost 11.6-13.1 times what the batched solve costs (`bench/head_training.py` part D, two runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit


@dataclass(frozen=True)
class LogisticFits:
    coef: np.ndarray  # (K, d)
    intercept: np.ndarray  # (K,)
    n_iter: np.ndarray  # (K,) L-BFGS iterations
    converged: np.ndarray  # (K,) bool: a stopping test held before max_iter

    def probability(self, k: int, z: np.ndarray) -> np.ndarray:
        """p(class 1) of problem k's solution for the rows of z."""
        return expit(np.asarray(z, dtype=np.float64) @ self.coef[k] + self.intercept[k])


def balanced_weights(y: np.ndarray, rows: np.ndarray | None = None, *, balanced: bool = True) -> np.ndarray:
    """Row weights of one problem over all len(y) rows: 0 outside `rows` (None: all rows), inside it
    1, or with `balanced` n / (2 n_class) over the problem's rows (scikit-learn's "balanced")."""
    from .losses import class_weights_from_labels

    y = np.asarray(y)
    inside = np.zeros(len(y), dtype=bool)
    inside[slice(None) if rows is None else rows] = True
    if not balanced:
        return inside.astype(np.float64)
    per_class = class_weights_from_labels(y[inside]).double().numpy()  # the heads' training weights
    return np.where(inside, per_class[y], 0.0)


def fit_logistic_batch(z: np.ndarray, y: np.ndarray, weights: np.ndarray, cs: np.ndarray, *, tol: float = 1e-4,
                       ftol: float = 64 * np.finfo(float).eps, max_iter: int = 2000, memory: int = 10
                       ) -> LogisticFits:
    """Solve K problems on the rows of `z` (n, d): `weights` (K, n) row weights, `cs` (K,) inverse L2
    strengths; labels `y` (n,) in {0, 1}. Starts from zero, like scikit-learn without warm start."""
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    cs = np.asarray(cs, dtype=np.float64).reshape(-1)
    n, d = z.shape
    k_all = len(cs)
    if weights.shape != (k_all, n):
        raise ValueError(f"weights must have shape ({k_all}, {n}), got {weights.shape}")
    if np.any(cs <= 0) or np.any(weights < 0) or np.any(weights.sum(1) <= 0):
        raise ValueError("every problem needs C > 0 and non-negative row weights with a positive sum")
    design = np.concatenate([z, np.ones((n, 1))], axis=1)  # the intercept is the last coordinate
    total = weights.sum(1)
    penalty = 1.0 / (cs * total)  # per problem, on the first d coordinates
    scaled = (weights / total[:, None]).T  # (n, K): row weights over their sum, per problem

    def evaluate(theta: np.ndarray, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = design @ theta.T  # (n, len(ks))
        a = scaled[:, ks]
        f = (a * (np.logaddexp(0.0, t) - y[:, None] * t)).sum(0) + 0.5 * penalty[ks] * (theta[:, :d] ** 2).sum(1)
        g = (design.T @ (a * (expit(t) - y[:, None]))).T
        g[:, :d] += penalty[ks, None] * theta[:, :d]
        return f, g

    dim = d + 1
    theta = np.zeros((k_all, dim))
    every = np.arange(k_all)
    f, g = evaluate(theta, every)
    s_hist = np.zeros((k_all, memory, dim))
    y_hist = np.zeros((k_all, memory, dim))
    rho = np.zeros((k_all, memory))  # 0: an empty or skipped slot, which the recursion passes over
    gamma = np.ones(k_all)
    n_iter = np.zeros(k_all, dtype=np.int64)
    converged = np.abs(g).max(1) <= tol
    active = ~converged
    for it in range(max_iter):
        ks = np.flatnonzero(active)
        if len(ks) == 0:
            break
        # two-loop recursion, newest pair first (slots of a ring buffer written once per iteration)
        q = g[ks].copy()
        slots = [(it - 1 - j) % memory for j in range(min(it, memory))]
        alphas = []
        for slot in slots:
            alpha = rho[ks, slot] * np.einsum("kd,kd->k", s_hist[ks, slot], q)
            q -= alpha[:, None] * y_hist[ks, slot]
            alphas.append(alpha)
        r = gamma[ks, None] * q
        for slot, alpha in zip(reversed(slots), reversed(alphas), strict=True):
            beta = rho[ks, slot] * np.einsum("kd,kd->k", y_hist[ks, slot], r)
            r += (alpha - beta)[:, None] * s_hist[ks, slot]
        direction = -r
        slope = np.einsum("kd,kd->k", g[ks], direction)
        uphill = slope >= 0  # not a descent direction (rounding): fall back to steepest descent
        direction[uphill] = -g[ks][uphill]
        slope[uphill] = -np.einsum("kd,kd->k", g[ks][uphill], g[ks][uphill])
        step = np.ones(len(ks))
        if it == 0:
            step = 1.0 / np.maximum(1.0, np.sqrt(-slope))
        # backtracking (Armijo) line search, each problem its own step
        new_f, new_g = np.empty(len(ks)), np.empty((len(ks), dim))
        pending = np.arange(len(ks))
        for _ in range(50):
            trial_f, trial_g = evaluate(theta[ks[pending]] + step[pending, None] * direction[pending], ks[pending])
            ok = trial_f <= f[ks[pending]] + 1e-4 * step[pending] * slope[pending]
            new_f[pending[ok]], new_g[pending[ok]] = trial_f[ok], trial_g[ok]
            pending = pending[~ok]
            if len(pending) == 0:
                break
            step[pending] *= 0.5
        stuck = np.zeros(len(ks), dtype=bool)
        stuck[pending] = True  # no decrease found within 50 halvings: as far as rounding allows
        moved = ~stuck
        km = ks[moved]
        s = step[moved, None] * direction[moved]
        yy = new_g[moved] - g[km]
        sy = np.einsum("kd,kd->k", s, yy)
        curvature = sy > 1e-10 * np.sqrt(np.einsum("kd,kd->k", s, s) * np.einsum("kd,kd->k", yy, yy))
        slot = it % memory
        s_hist[km, slot], y_hist[km, slot] = s, yy
        rho[km, slot] = np.where(curvature, 1.0 / np.where(curvature, sy, 1.0), 0.0)
        gamma[km] = np.where(curvature, sy / np.maximum(np.einsum("kd,kd->k", yy, yy), 1e-300), gamma[km])
        rho[ks[stuck], slot] = 0.0
        decrease = f[km] - new_f[moved]
        theta[km] += s
        f[km], g[km] = new_f[moved], new_g[moved]
        n_iter[ks] += 1
        done = (np.abs(g[km]).max(1) <= tol) | (decrease <= ftol * np.maximum.reduce(
            [np.abs(f[km] + decrease), np.abs(f[km]), np.ones(len(km))]))
        converged[km[done]] = True
        converged[ks[stuck]] = np.abs(g[ks[stuck]]).max(1) <= tol
        active[km[done]] = False
        active[ks[stuck]] = False
    return LogisticFits(coef=theta[:, :d].copy(), intercept=theta[:, d].copy(), n_iter=n_iter, converged=converged)
