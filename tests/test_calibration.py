"""Tests for stage1core.calibration: known-answer recoveries, held-out NLL, JSON round trips, schemas."""

from __future__ import annotations

import copy
import json

import jsonschema
import numpy as np
import pytest
from scipy.optimize import check_grad
from scipy.special import expit, log_softmax, softmax
from sklearn.linear_model import LogisticRegression

from stage1core.calibration import (
    SCHEMA_DIR,
    DirichletCalibration,
    PlattScaling,
    TemperatureScaling,
    fit_gate_platt,
    load_calibrator,
    validate_json,
)


def _nll_binary(p1: np.ndarray, y: np.ndarray) -> float:
    p1 = np.clip(p1, 1e-15, 1 - 1e-15)
    return float(-np.mean(y * np.log(p1) + (1 - y) * np.log(1 - p1)))


def _nll_multi(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1))))


def _beta_data(rng, n, a, b, c):
    p = rng.uniform(0.005, 0.995, n)
    q = expit(a * np.log(p) - b * np.log(1 - p) + c)
    return p, (rng.random(n) < q).astype(int)


@pytest.fixture(scope="module")
def fitted():
    """One fitted calibrator of each kind, with the data they came from."""
    rng = np.random.default_rng(7)
    s = rng.normal(0, 2, 3000)
    y = (rng.random(3000) < expit(0.8 * s + 0.2)).astype(int)
    z = np.stack([np.zeros_like(s), s], axis=1)
    probs = softmax(z, axis=1)
    return {
        "platt": (PlattScaling(score="logit_margin").fit(s, y), s),
        "temperature": (TemperatureScaling().fit(z, y), z),
        "dirichlet": (DirichletCalibration().fit(probs, y), probs),
    }


# ---------------------------------------------------------------- schemas


@pytest.mark.parametrize("name", ["calibration.schema.json", "gateparams.schema.json"])
def test_schemas_are_valid_draft_2020_12(name):
    schema = json.loads((SCHEMA_DIR / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_validate_json_unknown_schema_names_the_known_ones():
    with pytest.raises(ValueError, match="known schemas"):
        validate_json({}, "nope")


# ---------------------------------------------------------------- Platt


def test_platt_recovers_known_logistic_model():
    rng = np.random.default_rng(0)
    n, a, b = 20000, 1.7, -0.6
    s = rng.normal(0, 1.5, n)
    y = (rng.random(n) < expit(a * s + b)).astype(int)
    platt = PlattScaling().fit(s, y)
    assert platt.a == pytest.approx(a, abs=0.08)  # got 1.701
    assert platt.b == pytest.approx(b, abs=0.05)  # got -0.612
    np.testing.assert_allclose(platt.apply(s), expit(platt.a * s + platt.b))


def test_platt_matches_sklearn_on_duplicated_smoothed_targets():
    # Platt's smoothed targets as a weighted logistic regression: each sample once as label 1 with
    # weight t and once as label 0 with weight 1 - t; unpenalised sklearn must find the same (a, b)
    rng = np.random.default_rng(1)
    s = rng.normal(0.5, 3, 400)
    y = (rng.random(400) < expit(0.5 * s - 1)).astype(int)
    n_pos, n_neg = y.sum(), (1 - y).sum()
    t = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    x = np.concatenate([s, s])[:, None]
    labels = np.concatenate([np.ones(400), np.zeros(400)])
    lr = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000).fit(x, labels, sample_weight=np.r_[t, 1 - t])
    platt = PlattScaling().fit(s, y)
    assert platt.a == pytest.approx(lr.coef_[0, 0], abs=1e-5)
    assert platt.b == pytest.approx(lr.intercept_[0], abs=1e-5)


def test_platt_stays_finite_on_separable_data():
    s = np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0])
    y = np.array([0, 0, 0, 1, 1, 1])
    p = PlattScaling().fit(s, y).apply(s)
    # the smoothed targets are 1/5 and 4/5: the fit cannot push probabilities to 0 or 1
    assert np.all(p > 0.05) and np.all(p < 0.95)
    assert p[3] > 0.5 > p[2]


def test_platt_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        PlattScaling().fit([0.1, 0.2], [1, 1])


def test_gate_platt_json_validates_against_gateparams():
    rng = np.random.default_rng(3)
    gate = rng.normal(0, 2, 2000)
    correct = rng.random(2000) < expit(1.2 * gate + 1.0)
    platt = fit_gate_platt(gate, correct)
    d = platt.to_json()
    validate_json(d, "gateparams")
    assert platt.a == pytest.approx(1.2, abs=0.2)
    assert isinstance(load_calibrator(d), PlattScaling)
    wrong = dict(d, score="logit_margin")
    validate_json(wrong, "calibration")  # a fine calibrator ...
    with pytest.raises(ValueError, match="gateparams.* at score"):
        validate_json(wrong, "gateparams")  # ... but not a gate calibration


# ---------------------------------------------------------------- temperature


def test_temperature_recovers_known_temperature():
    rng = np.random.default_rng(2)
    n, t_true = 20000, 2.5
    z = rng.normal(0, 3, (n, 2))
    y = (rng.random(n) < softmax(z / t_true, axis=1)[:, 1]).astype(int)
    ts = TemperatureScaling().fit(z, y)
    assert ts.temperature == pytest.approx(t_true, rel=0.04)  # got 2.544
    # the 1-d margin view of the same binary problem gives the same T and the same p(roadwork)
    margin = z[:, 1] - z[:, 0]
    ts1 = TemperatureScaling().fit(margin, y)
    assert ts1.temperature == pytest.approx(ts.temperature, rel=1e-6)
    np.testing.assert_allclose(ts1.apply(margin), ts.apply(z)[:, 1], rtol=1e-6)


def test_temperature_three_classes():
    rng = np.random.default_rng(4)
    z = rng.normal(0, 2, (6000, 3))
    p = softmax(z / 0.5, axis=1)
    y = np.array([rng.choice(3, p=row) for row in p])
    assert TemperatureScaling().fit(z, y).temperature == pytest.approx(0.5, rel=0.06)


# ---------------------------------------------------------------- Dirichlet / beta


def test_dirichlet_binary_recovers_known_beta_map():
    rng = np.random.default_rng(0)
    a, b, c = 2.0, 0.7, 0.3
    p, y = _beta_data(rng, 40000, a, b, c)
    dc = DirichletCalibration().fit(p, y)
    got_a, got_b, got_c = dc.beta_params()
    assert got_a == pytest.approx(a, abs=0.1)  # got 1.991
    assert got_b == pytest.approx(b, abs=0.1)  # got 0.721
    assert got_c == pytest.approx(c, abs=0.1)  # got 0.287
    # ODIR: the off-diagonal weights are pinned to ~0, so W is diag(b, a)
    assert abs(dc.weights[0, 1]) < 1e-4 and abs(dc.weights[1, 0]) < 1e-4
    # apply is the beta map
    beta_map = expit(got_a * np.log(p) - got_b * np.log(1 - p) + got_c)
    np.testing.assert_allclose(dc.apply(p), beta_map, rtol=1e-9)


def test_dirichlet_unregularised_binary_equals_beta_logistic_fit():
    # beta calibration is a logistic regression on [ln p, -ln(1 - p)] (Kull et al. 2017)
    rng = np.random.default_rng(5)
    p, y = _beta_data(rng, 5000, 1.3, 2.0, -0.4)
    dc = DirichletCalibration(reg_lambda=0.0, reg_mu=0.0).fit(p, y)
    lr = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000).fit(np.c_[np.log(p), -np.log(1 - p)], y)
    want = [lr.coef_[0, 0], lr.coef_[0, 1], lr.intercept_[0]]
    np.testing.assert_allclose(dc.beta_params(), want, atol=1e-4)


def test_dirichlet_binary_map_is_monotone_where_the_unconstrained_fit_is_not():
    # positives thin out at the top: the label frequency is the beta map a=2, b=-1, which rises to a
    # peak at p = 2/3 and falls after it. Unconstrained beta calibration follows it (b < 0); Kull et
    # al.'s constraint a, b >= 0 keeps the map monotone, so it must settle on b = 0.
    rng = np.random.default_rng(10)
    p, y = _beta_data(rng, 20000, 2.0, -1.0, 0.0)
    grid = np.linspace(0.001, 0.999, 999)
    features = lambda q: np.c_[np.log(q), -np.log(1 - q)]  # noqa: E731
    free = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000).fit(features(p), y)
    assert free.coef_[0, 1] < -0.5  # got -0.98: the unconstrained optimum is non-monotone
    assert np.diff(free.predict_proba(features(grid))[:, 1]).min() < 0
    for reg in (dict(), dict(reg_lambda=0.0, reg_mu=0.0)):
        dc = DirichletCalibration(**reg).fit(p, y)
        assert np.all(np.diff(dc.apply(grid)) >= 0)
        assert np.all(np.diff(dc.apply(np.c_[1 - grid, grid])[:, 1]) >= 0)  # the (N, 2) view too
        a, b, c = dc.beta_params()
        assert a > 0 and b == 0.0  # the bound is active
        back = load_calibrator(json.loads(json.dumps(dc.to_json())))
        np.testing.assert_array_equal(back.apply(grid), dc.apply(grid))
    # with b pinned at 0 the constrained optimum is the logistic fit on ln p alone
    lone = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000).fit(np.log(p)[:, None], y)
    np.testing.assert_allclose([a, c], [lone.coef_[0, 0], lone.intercept_[0]], atol=1e-4)


def test_dirichlet_json_with_negative_beta_parameter_loads_with_a_warning(fitted, caplog):
    d = copy.deepcopy(fitted["dirichlet"][0].to_json())
    d["weights"][0][0] = -0.5  # b = W00 - W10 < 0: a map written before the constraint
    with caplog.at_level("WARNING", logger="stage1core.calibration"):
        back = load_calibrator(d)
    assert back.beta_params()[1] < 0
    assert "non-monotone" in caplog.text and "refit" in caplog.text


def test_dirichlet_binary_beta_objective_gradient_is_exact():
    rng = np.random.default_rng(11)
    dc = DirichletCalibration(reg_mu=0.3)
    x = np.log(rng.dirichlet(np.ones(2), 60))
    y = rng.integers(0, 2, 60).astype(float)
    theta = rng.normal(size=3)
    err = check_grad(lambda t: dc.beta_objective(t, x, y)[0], lambda t: dc.beta_objective(t, x, y)[1], theta)
    assert err < 1e-6


def test_dirichlet_objective_gradient_is_exact():
    rng = np.random.default_rng(6)
    dc = DirichletCalibration(reg_lambda=0.3, reg_mu=0.2)
    x = np.log(rng.dirichlet(np.ones(3), 50))
    y1 = np.eye(3)[rng.integers(0, 3, 50)]
    theta = rng.normal(size=12)
    err = check_grad(lambda t: dc.objective(t, x, y1)[0], lambda t: dc.objective(t, x, y1)[1], theta)
    assert err < 1e-6


def test_dirichlet_three_class_recovers_known_map():
    rng = np.random.default_rng(8)
    w_true = np.array([[1.5, 0.0, 0.0], [0.0, 0.8, 0.0], [0.0, 0.0, 2.0]])
    b_true = np.array([0.2, -0.1, -0.1])
    p = rng.dirichlet(np.ones(3) * 2, 30000)
    q = softmax(np.log(p) @ w_true.T + b_true, axis=1)
    y = (rng.random(30000)[:, None] > np.cumsum(q, axis=1)).sum(axis=1)
    dc = DirichletCalibration().fit(p, y)
    # identifiable up to adding a constant to every row; compare differences to class 0
    got = dc.weights - dc.weights[0]
    want = w_true - w_true[0]
    np.testing.assert_allclose(got, want, atol=0.12)


# ---------------------------------------------------------------- held-out NLL


def test_calibrators_improve_held_out_nll_on_overconfident_scores():
    rng = np.random.default_rng(9)
    n = 8000
    s = rng.normal(0, 1.5, 2 * n)
    y = (rng.random(2 * n) < expit(s)).astype(int)
    margin = 3.0 * s + 0.5  # an overconfident, shifted model
    z = np.stack([np.zeros_like(margin), margin], axis=1)
    probs = softmax(z, axis=1)
    cal, test = slice(0, n), slice(n, 2 * n)
    raw = _nll_binary(expit(margin[test]), y[test])
    platt = _nll_binary(PlattScaling().fit(margin[cal], y[cal]).apply(margin[test]), y[test])
    temp = _nll_multi(TemperatureScaling().fit(z[cal], y[cal]).apply(z[test]), y[test])
    diri = _nll_multi(DirichletCalibration().fit(probs[cal], y[cal]).apply(probs[test]), y[test])
    oracle = _nll_binary(expit(s[test]), y[test])
    assert raw > 1.3 * oracle  # 0.750 vs 0.525
    for got in (platt, temp, diri):
        assert got < raw - 0.1
        assert got == pytest.approx(oracle, abs=0.02)  # platt 0.5256, temperature 0.5286, dirichlet 0.5256


# ---------------------------------------------------------------- JSON


@pytest.mark.parametrize("kind", ["platt", "temperature", "dirichlet"])
def test_json_round_trip_gives_identical_outputs(fitted, kind):
    cal, x = fitted[kind]
    d = cal.to_json()
    assert d["kind"] == kind == cal.kind
    text = json.dumps(d)
    back = load_calibrator(json.loads(text))
    assert type(back) is type(cal)
    np.testing.assert_array_equal(back.apply(x), cal.apply(x))
    assert back.to_json() == d
    assert type(cal).from_json(json.loads(text)).to_json() == d


@pytest.mark.parametrize(
    ("kind", "tamper", "match"),
    [
        ("temperature", lambda d: d.update(temperature=-1.0), "temperature"),
        ("temperature", lambda d: d.update(kind="isotonic"), "kind"),
        ("platt", lambda d: d.update(a="1.0"), "at a"),
        ("platt", lambda d: d.pop("b"), "'b' is a required property"),
        ("platt", lambda d: d.update(extra=1), "Additional properties"),
        ("dirichlet", lambda d: d.update(schema_version=2), "schema_version"),
        ("dirichlet", lambda d: d["weights"][0].__setitem__(0, "x"), "weights/0/0"),
        ("dirichlet", lambda d: d.update(eps=0.0), "eps"),
    ],
)
def test_schema_rejects_tampered_json(fitted, kind, tamper, match):
    d = copy.deepcopy(fitted[kind][0].to_json())
    tamper(d)
    with pytest.raises(ValueError, match=match):
        load_calibrator(d)


def test_dirichlet_json_shape_mismatch_is_rejected(fitted):
    d = copy.deepcopy(fitted["dirichlet"][0].to_json())
    d["num_classes"] = 3
    with pytest.raises(ValueError, match="num_classes=3"):
        DirichletCalibration.from_json(d)


def test_from_json_checks_kind(fitted):
    with pytest.raises(ValueError, match="expected a 'platt'"):
        PlattScaling.from_json(fitted["temperature"][0].to_json())


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_raise(fitted, bad):
    s = np.array([0.1, -0.3, bad, 0.7])
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="NaN/inf"):
        PlattScaling().fit(s, y)
    with pytest.raises(ValueError, match="NaN/inf"):
        TemperatureScaling().fit(np.stack([np.zeros(4), s], axis=1), y)
    with pytest.raises(ValueError, match="NaN/inf"):
        DirichletCalibration().fit(np.array([0.2, 0.4, bad, 0.9]), y)
    with pytest.raises(ValueError, match="NaN/inf"):
        fitted["platt"][0].apply(s)
    with pytest.raises(ValueError, match="NaN/inf"):
        fitted["temperature"][0].apply(np.stack([np.zeros(4), s], axis=1))
    with pytest.raises(ValueError, match="NaN/inf"):
        fitted["dirichlet"][0].apply(np.array([0.2, 0.4, bad, 0.9]))
    with pytest.raises(ValueError, match="NaN/inf"):
        PlattScaling().fit([0.1, 0.2], [0, np.nan])


def test_other_bad_inputs_raise():
    with pytest.raises(ValueError, match="not fitted"):
        PlattScaling().apply([0.1])
    with pytest.raises(ValueError, match="not fitted"):
        TemperatureScaling().to_json()
    with pytest.raises(ValueError, match="labels"):
        PlattScaling().fit([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match=r"labels must be integer class ids in \[0, 2\)"):
        TemperatureScaling().fit(np.zeros((2, 2)), [0, 2])
    with pytest.raises(ValueError, match="rows must sum to 1"):
        DirichletCalibration().fit(np.array([[0.5, 0.6], [0.4, 0.6]]), [0, 1])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        DirichletCalibration().fit(np.array([1.2, 0.3]), [0, 1])


def test_calibrators_keep_log_probabilities_consistent(fitted):
    # sanity: the (N, K) outputs are proper distributions
    for kind in ("temperature", "dirichlet"):
        cal, x = fitted[kind]
        p = cal.apply(x)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
        assert np.all(log_softmax(np.log(p), axis=1) <= 0)
