"""Tests of stage1core.guarantees: hand cases, errors, MAPIE cross-check, and calibrate-then-test
simulations that count how often the guarantee is violated.

The simulations print their figures; rerun them with
    python -m pytest -q -s tests/test_guarantees.py -k simulation
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy.stats import beta, binom

from stage1core.guarantees import (
    FNRThreshold,
    GuaranteeConfig,
    InsufficientCalibrationData,
    SCRCConfig,
    SCRCInfeasible,
    SCRCParams,
    _scrc_tables,
    apply_scrc,
    dkw_margin,
    evaluate_scrc,
    fit_scrc,
    fnr_threshold,
    min_accepted_positives_for,
    min_positives_for,
)

# ----------------------------------------------------------------------------------------------------
# FNR threshold: hand cases


def test_min_positives_defaults_is_149():
    # (0.98)^148 = 0.0503 > 0.05 >= (0.98)^149 = 0.0493
    assert min_positives_for(0.02, 0.05) == 149
    assert 0.98**148 > 0.05 >= 0.98**149


@pytest.mark.parametrize(
    ("alpha", "delta", "expected"),
    [(0.1, 0.1, 22), (0.5, 0.25, 2), (0.5, 0.5, 1), (0.01, 0.01, 459)],
)
def test_min_positives_matches_formula_and_exact_boundaries(alpha, delta, expected):
    n = min_positives_for(alpha, delta)
    assert n == expected
    assert (1 - alpha) ** n <= delta + 1e-15  # enough ((0.5)^2 == 0.25 exactly is enough)
    assert n == 1 or (1 - alpha) ** (n - 1) > delta  # and minimal
    assert n == max(1, math.ceil(math.log(delta) / math.log(1 - alpha) - 1e-12))


def test_hand_case_k2():
    # n1=5, alpha=0.5: BinomCDF(0)=1/32, BinomCDF(1)=6/32=0.1875 <= 0.2 < BinomCDF(2)=16/32 -> k=2
    fit = fnr_threshold(np.array([0.9, 0.1, 0.5, 0.3, 0.7]), GuaranteeConfig(alpha=0.5, delta=0.2))
    assert fit.k == 2
    assert fit.threshold == 0.3
    assert fit.n_positives == 5
    assert fit.violation_bound == pytest.approx(6 / 32)
    assert fit.calib_fnr == pytest.approx(1 / 5)
    assert fit.predict(np.array([0.29, 0.3, 0.31])).tolist() == [False, True, True]


def test_ties_only_lower_the_calib_fnr():
    fit = fnr_threshold(np.array([0.3, 0.3, 0.3, 0.7, 0.9]), GuaranteeConfig(alpha=0.5, delta=0.2))
    assert fit.k == 2 and fit.threshold == 0.3
    assert fit.calib_fnr == 0.0  # (k-1)/n1 = 0.2 without ties


def test_exactly_minimum_positives_takes_the_smallest_score():
    scores = np.linspace(0.2, 0.99, 149)[::-1]
    fit = fnr_threshold(scores, GuaranteeConfig())
    assert fit.k == 1
    assert fit.threshold == pytest.approx(0.2)
    assert fit.violation_bound == pytest.approx(0.98**149)
    assert fit.violation_bound <= 0.05


def test_k_is_largest_index_with_binomial_bound():
    n1, cfg = 1000, GuaranteeConfig(alpha=0.02, delta=0.05)
    fit = fnr_threshold(np.random.default_rng(0).random(n1), cfg)
    assert binom.cdf(fit.k - 1, n1, cfg.alpha) <= cfg.delta < binom.cdf(fit.k, n1, cfg.alpha)
    assert fit.violation_bound == pytest.approx(binom.cdf(fit.k - 1, n1, cfg.alpha))


def test_too_few_positives_says_how_many_are_needed():
    with pytest.raises(InsufficientCalibrationData) as err:
        fnr_threshold(np.random.default_rng(0).random(148), GuaranteeConfig())
    message = str(err.value)
    assert "148" in message and "149" in message
    assert "calib" in message
    assert isinstance(err.value, ValueError)
    with pytest.raises(InsufficientCalibrationData, match="has 0 positive"):
        fnr_threshold(np.array([]), GuaranteeConfig())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_rejected(bad):
    scores = np.random.default_rng(0).random(300)
    scores[17] = bad
    with pytest.raises(ValueError, match="index 17"):
        fnr_threshold(scores, GuaranteeConfig())


@pytest.mark.parametrize("kwargs", [{"alpha": 0.0}, {"alpha": 1.0}, {"delta": -0.1}, {"delta": 1.5}])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        GuaranteeConfig(**kwargs)


def test_json_round_trip():
    fit = fnr_threshold(np.random.default_rng(3).random(500), GuaranteeConfig())
    restored = FNRThreshold.from_json(json.loads(json.dumps(fit.to_json())))
    assert restored == fit
    with pytest.raises(ValueError, match="missing keys"):
        FNRThreshold.from_json({"threshold": 0.5})


# ----------------------------------------------------------------------------------------------------
# FNR threshold: simulation


@pytest.mark.parametrize(
    ("n1", "alpha", "delta"), [(149, 0.02, 0.05), (400, 0.02, 0.05), (1500, 0.02, 0.05), (300, 0.1, 0.1)]
)
def test_fnr_simulation(n1, alpha, delta):
    """Calibrate on 2,000 independent calib draws; the true FNR of each threshold is exact (Beta cdf).

    The violation rate must be <= delta + 3 MC standard errors, and (since k depends only on n1) match
    the exact violation probability BinomCDF(k-1; n1, alpha) within 4 standard errors, so the bound is
    tight, not merely valid. The mean true FNR must exceed alpha/4 (not trivially conservative).
    """
    draws, a, b = 2000, 5.0, 2.0  # positive scores ~ Beta(5, 2): FNR(t) = P(S < t) = beta.cdf(t)
    cfg = GuaranteeConfig(alpha=alpha, delta=delta)
    rng = np.random.default_rng(n1)
    fits = [fnr_threshold(scores, cfg) for scores in rng.beta(a, b, size=(draws, n1))]
    true_fnr = beta.cdf(np.array([f.threshold for f in fits]), a, b)
    rate = float(np.mean(true_fnr > alpha))
    bound = fits[0].violation_bound
    se = math.sqrt(bound * (1 - bound) / draws)
    print(
        f"\nFNR sim n1={n1} alpha={alpha} delta={delta}: k={fits[0].k} violation rate={rate:.4f} "
        f"(exact {bound:.4f}, MC se {se:.4f}), mean true FNR={true_fnr.mean():.4f}, "
        f"median {np.median(true_fnr):.4f}"
    )
    assert rate <= delta + 3 * se
    assert abs(rate - bound) <= 4 * se
    assert true_fnr.mean() > alpha / 4


def test_fnr_simulation_with_tied_scores_stays_valid():
    """Scores rounded to 2 decimals (heavy ties): the guarantee must still hold (ties are conservative)."""
    n1, draws, cfg = 400, 2000, GuaranteeConfig()
    rng = np.random.default_rng(7)
    grid = np.round(np.linspace(0, 1, 101), 2)
    pmf = np.diff(beta.cdf(np.r_[-1e-9, (grid[1:] + grid[:-1]) / 2, 1.0], 5, 2))  # P(rounded = grid[i])
    cdf_strict = np.r_[0.0, np.cumsum(pmf)[:-1]]  # FNR(t) = P(S < t) at t = grid[i]
    fits = [fnr_threshold(np.round(s, 2), cfg) for s in rng.beta(5, 2, size=(draws, n1))]
    true_fnr = cdf_strict[np.searchsorted(grid, [f.threshold for f in fits])]
    rate = float(np.mean(true_fnr > cfg.alpha))
    print(f"\nFNR sim with ties n1={n1}: violation rate={rate:.4f}, mean true FNR={true_fnr.mean():.4f}")
    assert rate <= cfg.delta + 3 * math.sqrt(cfg.delta * (1 - cfg.delta) / draws)
    assert any(f.calib_fnr < (f.k - 1) / n1 for f in fits)  # ties did occur at the threshold


# ----------------------------------------------------------------------------------------------------
# FNR threshold: cross-check with MAPIE's Learn-then-Test controller


def _mapie_controller(grid, cfg, fwer_method):
    from mapie.risk_control import BinaryClassificationController

    return BinaryClassificationController(
        predict_function=lambda x: np.column_stack([1 - x, x]),  # X is the score itself
        risk="recall",
        target_level=1 - cfg.alpha,
        confidence_level=1 - cfg.delta,
        list_predict_params=grid,
        fwer_method=fwer_method,
    )


def _mapie_recall_p_values(n1: int, misses: np.ndarray, alpha: float) -> np.ndarray:
    """MAPIE 1.6's p-values for risk="recall" at thresholds with `misses` calib misses, operation by
    operation (`risks.BinaryRisk.get_value_and_effective_sample_size`, `_convert_target_level_to_alpha`,
    `methods.compute_hoeffding_bentkus_p_value(binary=True)`): r = 1 - hits / n1 and a = 1 - (1 - alpha)
    in floating point, then min(Hoeffding exp(-n1 h1(min(r, a), a)), BinomCDF(ceil(n1 r); n1, a)).
    With exact arithmetic ceil(n1 r) = misses and the minimum is the binomial tail, our violation_bound;
    in floating point n1 r can land just above the integer `misses`, and the ceiling adds one miss."""
    a = 1 - (1 - alpha)
    r = 1 - (n1 - misses).astype(np.float64) / n1
    rc = np.minimum(r, a)
    with np.errstate(divide="ignore", invalid="ignore"):
        h1 = np.where(rc > 0, rc * np.log(rc / a), 0.0) + (1 - rc) * np.log((1 - rc) / (1 - a))
    return np.minimum(np.exp(-n1 * h1), binom.cdf(np.ceil(n1 * r), n1, a))


@pytest.mark.slow
def test_mapie_fixed_sequence_certifies_ours_or_one_order_statistic_below():
    """MAPIE (LTT, risk 1 - recall, binary Hoeffding-Bentkus p-values, fixed-sequence testing from the
    lowest threshold) on the grid of calib positive scores, over 100 random calib sets.

    MAPIE's p-values are reproduced bit for bit by `_mapie_recall_p_values`. Its binomial term takes
    ceil(n1 * r) with r = 1 - hits/n1 in floating point; where n1 * r rounds to just above the number
    of misses k - 1 at our threshold s_(k), its p-value there is min(Hoeffding, BinomCDF(k; n1, alpha)),
    above delta, and fixed-sequence testing stops one order statistic earlier, at s_(k-1) (whose
    p-value is at most BinomCDF(k - 1; n1, alpha) <= delta, so it always passes). Ours is the exact
    binomial rule: BinomCDF(k - 1) <= delta < BinomCDF(k), so neither looser than the guarantee allows
    nor needlessly conservative. Rerun with `python -m pytest -q -s tests/test_guarantees.py -k mapie`.
    """
    cfg = GuaranteeConfig()
    draws, below = 100, 0
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        y = (rng.random(3000) < 0.3).astype(int)
        p = 1 / (1 + np.exp(-rng.normal(np.where(y == 1, 2.0, -1.0), 1.0)))
        ours = fnr_threshold(p[y == 1], cfg)
        n1, k = ours.n_positives, ours.k
        # ours is the largest k the exact binomial bound certifies
        assert ours.violation_bound == pytest.approx(binom.cdf(k - 1, n1, cfg.alpha), rel=1e-12)
        assert ours.violation_bound <= cfg.delta < binom.cdf(k, n1, cfg.alpha)
        grid = np.unique(p[y == 1])
        assert grid.size == n1  # continuous scores: grid[j] has exactly j misses
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            controller = _mapie_controller(grid, cfg, "fixed_sequence")
            controller.calibrate(p, y)
        np.testing.assert_array_equal(controller.p_values[:, 0], _mapie_recall_p_values(n1, np.arange(n1), cfg.alpha))
        # MAPIE's p-value is never below our bound: it is never the less conservative of the two
        assert controller.p_values[k - 1, 0] >= ours.violation_bound
        theirs = controller.valid_predict_params.max()
        inflated = np.ceil(n1 * (1 - (n1 - (k - 1)) / n1)) > k - 1  # the ceiling added a miss at s_(k)
        if inflated:
            below += 1
            assert theirs == grid[k - 2] < ours.threshold, seed  # one order statistic below ours
            assert controller.p_values[k - 1, 0] > cfg.delta
        else:
            assert theirs == ours.threshold, seed
            assert controller.p_values[k - 1, 0] == pytest.approx(ours.violation_bound, rel=1e-12)
        assert controller.p_values[k, 0] > cfg.delta  # nobody certifies s_(k+1)
    rate = below / draws
    print(f"\nMAPIE fixed-sequence vs ours over {draws} calib sets: MAPIE one order statistic below in "
          f"{below} ({rate:.0%}), equal in {draws - below}")
    assert 0 < below < draws  # both outcomes occur; docs/guarantees.md quotes this figure


def test_mapie_default_procedure_is_more_conservative():
    """MAPIE's defaults (Bonferroni-Holm over np.linspace(0, 0.99, 100)) are valid too but spend delta on
    many tests, so the threshold it certifies can only be lower (more positives predicted) than ours; the
    thresholds it certifies all have p-value <= delta, hence all lie at or below ours.
    """
    cfg = GuaranteeConfig()
    rng = np.random.default_rng(11)
    y = (rng.random(3000) < 0.3).astype(int)
    p = 1 / (1 + np.exp(-rng.normal(np.where(y == 1, 2.0, -1.0), 1.0)))
    ours = fnr_threshold(p[y == 1], cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        controller = _mapie_controller(np.linspace(0, 0.99, 100), cfg, "bonferroni_holm")
        controller.calibrate(p, y)
    assert controller.valid_predict_params.size > 0
    assert controller.valid_predict_params.max() <= ours.threshold
    # and ours is not looser than MAPIE's on the FNR it accepts on calib data
    assert ours.calib_fnr >= np.mean(p[y == 1] < controller.valid_predict_params.max())


# ----------------------------------------------------------------------------------------------------
# SCRC-I


def _scrc_population(rng, n, prevalence=0.35, mu=1.0):
    """Two Gaussian classes z ~ N(+-mu, 1); p is the exact (calibrated) posterior; conf is a noisy gate
    that grows with |z|, so abstaining on low conf removes ambiguous samples."""
    y = rng.random(n) < prevalence
    z = rng.normal(np.where(y, mu, -mu), 1.0)
    odds = prevalence / (1 - prevalence) * np.exp(2 * mu * z)
    p = odds / (1 + odds)
    conf = 1 / (1 + np.exp(-(2.0 * np.abs(z) - 1.0 + rng.normal(0, 0.8, n))))
    return p, conf, y


def _scrc_brute_force(p, conf, y, cfg):
    """Reference implementation with explicit loops and masks; returns (j, k) or None."""
    n = p.size
    eps = dkw_margin(n, cfg.delta_coverage)
    level = cfg.delta_risk / cfg.grid_size
    l2s = cfg.set_thresholds()
    best = None
    for j, l1 in enumerate(cfg.selection_thresholds()):
        acc = conf >= l1
        if acc.mean() - eps < cfg.xi:
            continue
        n_pos = int((y & acc).sum())
        last = None
        for k, l2 in enumerate(l2s):
            misses = int((y & acc & (p < l2)).sum())
            if n_pos and binom.cdf(misses, n_pos, cfg.alpha) <= level:
                last = k
            else:
                break
        if last is None:
            continue
        l2 = l2s[last]
        size = 1 + int(((p >= l2) & (1 - p >= l2) & acc).sum()) / int(acc.sum())
        if best is None or size < best[0]:
            best = (size, j, last)
    return None if best is None else best[1:]


@pytest.mark.parametrize("seed", range(6))
def test_fit_scrc_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1500, 4000))
    p, conf, y = _scrc_population(rng, n, prevalence=float(rng.uniform(0.3, 0.6)))
    conf = np.round(conf, 2)  # ties on grid points exercise the >= boundaries
    cfg = SCRCConfig(
        alpha=float(rng.choice([0.05, 0.1])),
        delta=0.1,
        xi=float(rng.choice([0.5, 0.7])),
        grid_size=int(rng.choice([5, 20])),
        n_set_thresholds=40,
    )
    expected = _scrc_brute_force(p, conf, y, cfg)
    assert expected is not None
    params = fit_scrc(p, conf, y, cfg)
    j, k = expected
    assert params.selection_threshold == cfg.selection_thresholds()[j]
    assert params.set_threshold == cfg.set_thresholds()[k]
    accepted, sets = apply_scrc(params, p, conf)
    assert params.calib_coverage == pytest.approx(accepted.mean())
    assert params.coverage_lower_bound >= cfg.xi
    assert params.risk_p_value <= cfg.delta_risk / cfg.grid_size
    assert params.calib_selective_fnr == pytest.approx(np.mean(sets[y & accepted] == 0))
    assert params.calib_mean_set_size == pytest.approx(np.mean(np.where(sets[accepted] == 2, 2, 1)))
    assert params.n_accepted_positives == int((y & accepted).sum())


def test_scrc_tables_count_what_they_claim():
    rng = np.random.default_rng(5)
    p, conf, y = _scrc_population(rng, 700)
    cfg = SCRCConfig(grid_size=7, n_set_thresholds=12)
    t = _scrc_tables(p, conf, y, cfg)
    for j, l1 in enumerate(cfg.selection_thresholds()):
        acc = conf >= l1
        assert t["accepted"][j] == acc.sum() and t["pos_accepted"][j] == (acc & y).sum()
        for k, l2 in enumerate(cfg.set_thresholds()):
            assert t["misses"][j, k] == (acc & y & (p < l2)).sum()
            assert t["two_label"][j, k] == (acc & (p >= l2) & (1 - p >= l2)).sum()


def test_apply_scrc_codes_by_hand():
    params = SCRCParams(
        selection_threshold=0.6,
        set_threshold=0.2,
        alpha=0.05,
        delta=0.1,
        xi=0.5,
        delta_coverage=0.05,
        delta_risk=0.05,
        grid_size=10,
        n_calib=1000,
        n_accepted_positives=300,
        calib_coverage=0.7,
        coverage_lower_bound=0.66,
        calib_selective_fnr=0.01,
        risk_p_value=0.001,
        calib_mean_set_size=1.3,
    )
    p = np.array([0.05, 0.5, 0.9, 0.19, 0.2, 0.75, 0.81, 0.5])
    conf = np.array([0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.59])
    accepted, sets = apply_scrc(params, p, conf)
    assert accepted.tolist() == [True] * 7 + [False]
    # 1 in set iff p >= 0.2; 0 in set iff 1 - p >= 0.2 (p <= 0.8; 0.8 itself is float-fragile)
    assert sets.tolist() == [0, 2, 1, 0, 2, 2, 1, -1]
    report = evaluate_scrc(params, p, conf, np.array([0, 1, 1, 1, 0, 1, 1, 1]))
    assert report["coverage"] == pytest.approx(7 / 8)
    assert report["selective_fnr"] == pytest.approx(1 / 5)  # accepted positives: p=.5,.9,.19,.75,.81
    assert report["mean_set_size"] == pytest.approx(10 / 7)
    assert report["n_accepted"] == 7
    # max-prob confidence when conf is None
    accepted, _ = apply_scrc(params, np.array([0.3, 0.45, 0.7]), None)
    assert accepted.tolist() == [True, False, True]


def test_scrc_json_round_trip():
    rng = np.random.default_rng(8)
    p, conf, y = _scrc_population(rng, 3000)
    params = fit_scrc(p, conf, y, SCRCConfig(alpha=0.05, delta=0.1, xi=0.6))
    assert SCRCParams.from_json(json.loads(json.dumps(params.to_json()))) == params
    with pytest.raises(ValueError, match="missing keys"):
        SCRCParams.from_json({"selection_threshold": 0.5})


def test_scrc_refuses_unreachable_coverage():
    rng = np.random.default_rng(9)
    p, conf, y = _scrc_population(rng, 400)
    with pytest.raises(SCRCInfeasible, match="cannot certify coverage >= 0.97") as err:
        fit_scrc(p, conf, y, SCRCConfig(alpha=0.1, xi=0.97))
    assert "DKW margin" in str(err.value) and "n=400" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_scrc_refuses_too_few_accepted_positives():
    rng = np.random.default_rng(10)
    p, conf, y = _scrc_population(rng, 1000, prevalence=0.1)
    cfg = SCRCConfig(alpha=0.02, delta=0.05, xi=0.5)
    need = min_accepted_positives_for(cfg)
    assert need == min_positives_for(0.02, 0.025 / 20) == 331
    with pytest.raises(SCRCInfeasible, match=f"needs at least {need}"):
        fit_scrc(p, conf, y, cfg)


def test_scrc_rejects_bad_inputs():
    with pytest.raises(ValueError, match="NaN/inf"):
        fit_scrc(np.array([0.5, np.nan]), np.array([0.5, 0.5]), np.array([0, 1]), SCRCConfig())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_scrc(np.array([0.5, 1.5]), None, np.array([0, 1]), SCRCConfig())
    with pytest.raises(ValueError, match="0/1"):
        fit_scrc(np.array([0.5, 0.5]), None, np.array([0, 2]), SCRCConfig())
    for bad in ({"xi": 1.0}, {"delta_split": 0.0}, {"grid_size": 0}, {"conf_low": 1.0}):
        with pytest.raises(ValueError):
            SCRCConfig(**bad)


def _scrc_truth(cfg, rng, n_ref=3_000_000):
    """True coverage per l1 and true selective FNR per (l1, l2), from one huge reference sample
    (MC error of the FNR table ~1e-4, far below alpha)."""
    p, conf, y = _scrc_population(rng, n_ref)
    t = _scrc_tables(p, conf, y, cfg)
    return t["accepted"] / n_ref, t["misses"] / t["pos_accepted"][:, None]


@pytest.mark.slow
@pytest.mark.parametrize(
    "cfg",
    [SCRCConfig(alpha=0.05, delta=0.1, xi=0.6), SCRCConfig(alpha=0.02, delta=0.05, xi=0.7)],
    ids=["alpha0.05-xi0.6", "alpha0.02-xi0.7"],
)
def test_scrc_simulation(cfg):
    """2,000 independent calib draws of n=3,000 from the population; each fitted (l1, l2) is judged by
    its TRUE coverage and selective FNR. Joint violation rate must be <= delta + 3 MC standard errors;
    the printout shows how conservative the Bonferroni-over-chains split is, and the achieved coverage.
    """
    rng = np.random.default_rng(2024)
    true_cov, true_fnr = _scrc_truth(cfg, rng)
    l1, l2 = cfg.selection_thresholds(), cfg.set_thresholds()
    draws, n = 2000, 3000
    cov, fnr, size = np.empty(draws), np.empty(draws), np.empty(draws)
    for i in range(draws):
        params = fit_scrc(*_scrc_population(rng, n), cfg)
        j = int(np.searchsorted(l1, params.selection_threshold))
        k = int(np.searchsorted(l2, params.set_threshold))
        cov[i], fnr[i], size[i] = true_cov[j], true_fnr[j, k], params.calib_mean_set_size
    violated = (cov < cfg.xi) | (fnr > cfg.alpha)
    se = math.sqrt(cfg.delta * (1 - cfg.delta) / draws)
    print(
        f"\nSCRC sim alpha={cfg.alpha} delta={cfg.delta} xi={cfg.xi} n={n}: joint violation rate="
        f"{violated.mean():.4f} (coverage {np.mean(cov < cfg.xi):.4f}, FNR {np.mean(fnr > cfg.alpha):.4f}); "
        f"true coverage mean {cov.mean():.3f} [min {cov.min():.3f}], "
        f"true selective FNR mean {fnr.mean():.4f} [max {fnr.max():.4f}], "
        f"calib mean set size {size.mean():.3f}"
    )
    assert violated.mean() <= cfg.delta + 3 * se
    assert cfg.xi <= cov.mean() <= cfg.xi + 0.2  # abstains, but not far more than asked
    assert fnr.mean() > cfg.alpha / 4  # sets are not trivially large
    assert size.mean() < 1.9


def test_scrc_simulation_detects_a_dishonest_procedure():
    """Negative control: the same search with plug-in estimates (empirical coverage >= xi, empirical
    selective FNR <= alpha, no DKW margin, no multiplicity correction) violates far more often than delta,
    so the simulation above would catch a split that spends the guarantee."""
    cfg = SCRCConfig(alpha=0.05, delta=0.1, xi=0.6)
    rng = np.random.default_rng(7)
    true_cov, true_fnr = _scrc_truth(cfg, rng, n_ref=1_000_000)
    draws, n, violated = 500, 3000, 0
    for _ in range(draws):
        p, conf, y = _scrc_population(rng, n)
        t = _scrc_tables(p, conf, y, cfg)
        ok = (t["accepted"][:, None] / n >= cfg.xi) & (t["misses"] <= cfg.alpha * t["pos_accepted"][:, None])
        size = np.where(ok, t["two_label"] / t["accepted"][:, None], np.inf)
        j, k = np.unravel_index(np.argmin(size), size.shape)
        violated += (true_cov[j] < cfg.xi) or (true_fnr[j, k] > cfg.alpha)
    print(f"\nSCRC negative control (plug-in, no correction): violation rate={violated / draws:.3f}")
    assert violated / draws > 4 * cfg.delta
