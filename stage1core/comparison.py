"""Champion/challenger: the floor every champion must meet, paired bootstrap bounds on the MCC, AUROC
and FNR differences of two models scored on the same test images, and the promote/keep decision.

One definition, used by the `retrain` and `promote` flows, the `stage1 promote`/`rollback` commands
and the deployments: a team's settings file sets any of these fields in its [promotion] table
(stage1core.settings), and every field it leaves out keeps the default below; change a default here,
or the table, and every path follows.

The rule is an intersection-union test: the challenger is promoted only when every one-sided bound
holds (MCC better, AUROC and FNR not worse by more than their margins), each at level `confidence`.
Requiring all of them keeps the overall error at that level without a multiplicity correction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stage1core.config import describe_fields
from stage1core.text import num, signed


@describe_fields
@dataclass(frozen=True)
class MetricFloor:
    """What any champion must reach on its own test split (the bundle's metrics.json)."""

    # test MCC at the guaranteed threshold. A strict FNR guarantee pulls MCC down (the demo's pretrained
    # backbone: 0.29 at FNR <= 5% against 0.77 at p >= 0.5), so this floor only stops broken models
    min_mcc: float = 0.2
    # test AUROC, threshold-free: 0.5 is chance; the demo's random-init backbone scores 0.64, the
    # pretrained one 0.96
    min_auroc: float = 0.8
    # test FNR; None: the bundle's own guaranteed alpha
    max_fnr: float | None = None

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_mcc <= 1.0:
            raise ValueError(f"MetricFloor.min_mcc must be in [-1, 1], got {self.min_mcc}")
        if not 0.0 <= self.min_auroc <= 1.0:
            raise ValueError(f"MetricFloor.min_auroc must be in [0, 1], got {self.min_auroc}")
        if self.max_fnr is not None and not 0.0 <= self.max_fnr <= 1.0:
            raise ValueError(f"MetricFloor.max_fnr must be in [0, 1] or null, got {self.max_fnr}")


@describe_fields
@dataclass(frozen=True)
class ComparisonConfig:
    """When `retrain` replaces the champion: the challenger meets the floor, the test split is large
    enough, and every paired-bootstrap bound below holds on the same test images."""

    # the lower confidence bound of MCC(challenger) - MCC(champion) must be above this. 0: clearly
    # better; a negative value is a non-inferiority margin (promote a fresher model at most this much worse)
    min_mcc_gain: float = 0.0
    # AUROC non-inferiority margin: the lower bound of AUROC(challenger) - AUROC(champion) must be above -margin
    auroc_margin: float = 0.02
    # FNR non-inferiority margin: the upper bound of FNR(challenger) - FNR(champion), each at its
    # guaranteed threshold, must be below this; None: the guarantee's alpha (a challenger may not
    # miss more roadwork than the guarantee's own tolerance on top of the champion)
    fnr_margin: float | None = None
    # images of each class the test split needs before any automatic promotion: below this the bounds
    # are too wide to tell a 0.02 margin apart (docs/operations.md gives the simulation)
    min_test_per_class: int = 200
    # one-sided confidence level of each bound
    confidence: float = 0.95
    # paired bootstrap resamples of the test images
    n_bootstrap: int = 2000
    # seed of the resamples (a rerun gives the same bounds)
    seed: int = 0
    # move `champion` when the rule says promote; off: report the decision only, promote by hand
    auto_promote: bool = True
    # the floor the challenger must meet before it can be promoted at all
    floor: MetricFloor = field(default_factory=MetricFloor)

    def __post_init__(self) -> None:
        if isinstance(self.floor, dict):  # from a JSON form or a settings file
            object.__setattr__(self, "floor", MetricFloor(**self.floor))
        if not -1.0 <= self.min_mcc_gain <= 1.0:
            raise ValueError(f"ComparisonConfig.min_mcc_gain must be in [-1, 1], got {self.min_mcc_gain}")
        if not 0.0 <= self.auroc_margin <= 1.0:
            raise ValueError(f"ComparisonConfig.auroc_margin must be in [0, 1], got {self.auroc_margin}")
        if self.fnr_margin is not None and not 0.0 <= self.fnr_margin <= 1.0:
            raise ValueError(f"ComparisonConfig.fnr_margin must be in [0, 1] or null, got {self.fnr_margin}")
        if self.min_test_per_class < 1:
            raise ValueError(f"ComparisonConfig.min_test_per_class must be >= 1, got {self.min_test_per_class}")
        if self.n_bootstrap < 100:
            raise ValueError(f"ComparisonConfig.n_bootstrap must be >= 100, got {self.n_bootstrap}")
        if not 0.5 < self.confidence < 1.0:
            raise ValueError(f"ComparisonConfig.confidence must be in (0.5, 1), got {self.confidence}")

    def fnr_margin_for(self, alpha: float) -> float:
        return alpha if self.fnr_margin is None else self.fnr_margin

    def describe(self, alpha: float) -> str:
        """The rule in one line, for reports and tags."""
        level = f"{self.confidence:.0%} one-sided paired bootstrap bounds"
        return (f"promote iff the MCC gain's lower bound > {self.min_mcc_gain:+.3f}, the AUROC change's lower "
                f"bound > {-self.auroc_margin:+.3f}, the FNR increase's upper bound < "
                f"{self.fnr_margin_for(alpha):+.3f} "
                f"({level}, same test split, same FNR guarantee), >= {self.min_test_per_class} test images "
                f"per class, and the floor MCC >= {self.floor.min_mcc}, AUROC >= {self.floor.min_auroc}, "
                f"FNR <= {'alpha' if self.floor.max_fnr is None else self.floor.max_fnr}")


# ---------------------------------------------------------------------------------------------------
# statistics


def mcc_from_counts(tp, fp, fn, tn) -> np.ndarray:
    """MCC from confusion counts (arrays), 0 where undefined (sklearn's convention)."""
    tp, fp, fn, tn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn, tn))
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        mcc = (tp * tn - fp * fn) / den
    return np.where(den > 0, mcc, 0.0)


def _mcc(y: np.ndarray, pred: np.ndarray, axis: int = -1) -> np.ndarray:
    y, pred = y.astype(bool), pred.astype(bool)
    return mcc_from_counts((pred & y).sum(axis), (pred & ~y).sum(axis), (~pred & y).sum(axis),
                           (~pred & ~y).sum(axis))


def _auroc(y: np.ndarray, score: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mann-Whitney AUROC along `axis` (ties count one half), NaN where a class is missing."""
    from scipy.stats import rankdata

    y = y.astype(bool)
    ranks = rankdata(score, axis=axis)
    n1 = y.sum(axis).astype(np.float64)
    n0 = y.shape[axis] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * y).sum(axis) - n1 * (n1 + 1) / 2) / (n1 * n0)


def _fnr(y: np.ndarray, pred: np.ndarray, axis: int = -1) -> np.ndarray:
    y, pred = y.astype(bool), pred.astype(bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (y & ~pred).sum(axis) / y.sum(axis)


def paired_differences(y: np.ndarray, challenger: np.ndarray, challenger_threshold: float,
                       champion: np.ndarray, champion_threshold: float, *, n_bootstrap: int = 2000,
                       confidence: float = 0.95, seed: int = 0) -> dict[str, dict[str, float]]:
    """MCC gain, AUROC gain and FNR increase of the challenger over the champion on the same images,
    each with one-sided percentile bounds at `confidence` from one paired bootstrap (scipy).

    Paired: every resample draws test images with replacement and scores both models on that draw,
    so the bounds reflect the difference, not two independent noises; the three statistics share
    the resamples. `low` is the lower bound, `high` the upper bound (a two-sided interval at
    2 * confidence - 1 has exactly these ends).
    """
    from scipy.stats import bootstrap

    y = np.asarray(y, dtype=bool)
    a = np.asarray(challenger, dtype=np.float64)
    b = np.asarray(champion, dtype=np.float64)

    def statistic(yy, aa, bb, axis=-1):
        pa, pb = aa >= challenger_threshold, bb >= champion_threshold
        return np.stack([_mcc(yy, pa, axis) - _mcc(yy, pb, axis), _auroc(yy, aa, axis) - _auroc(yy, bb, axis),
                         _fnr(yy, pa, axis) - _fnr(yy, pb, axis)])

    estimate = statistic(y, a, b)
    if y.size < 2 or (np.array_equal(a, b) and challenger_threshold == champion_threshold):
        low = high = estimate  # the same model: no resample can tell them apart
    else:
        res = bootstrap((y, a, b), statistic, paired=True, vectorized=True, n_resamples=n_bootstrap,
                        confidence_level=2 * confidence - 1, method="percentile", batch=200,
                        random_state=np.random.default_rng(seed))
        low, high = res.confidence_interval
    return {name: {"estimate": float(estimate[i]), "low": float(low[i]), "high": float(high[i])}
            for i, name in enumerate(("mcc_gain", "auroc_gain", "fnr_increase"))}


def coverage_at_fnr(y: np.ndarray, p: np.ndarray, threshold: float, alpha: float) -> float:
    """Largest share of images that can be decided automatically, most confident first, with the FNR
    among the accepted images <= alpha (the rest would go to a human). Confidence = distance of
    p from the threshold. 1.0 when every image can be accepted."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    if y.size == 0:
        return float("nan")
    order = np.argsort(-np.abs(p - threshold), kind="stable")
    yy, missed = y[order], (p[order] < threshold) & y[order]
    pos, fn = np.cumsum(yy), np.cumsum(missed)
    with np.errstate(invalid="ignore", divide="ignore"):
        fnr = np.where(pos > 0, fn / np.maximum(pos, 1), 0.0)
    ok = np.flatnonzero(fnr <= alpha + 1e-12)
    return float((ok.max() + 1) / y.size) if ok.size else 0.0


def compare_predictions(*, labels: np.ndarray, challenger: np.ndarray, challenger_threshold: float,
                        champion: np.ndarray, champion_threshold: float, alpha: float,
                        config: ComparisonConfig) -> dict[str, Any]:
    """Metrics of both models on the same test images at their thresholds (both fitted for the same
    FNR constraint), and the paired bootstrap bounds on their differences. JSON-able."""
    from stage1core.metrics import binary_metrics  # sklearn: imported when used, not by the CLI's help

    y = np.asarray(labels).astype(np.int64)
    out: dict[str, Any] = {"n_test": int(y.size), "n_test_pos": int(y.sum()), "n_test_neg": int((y == 0).sum())}
    for name, p, t in (("challenger", challenger, challenger_threshold), ("champion", champion, champion_threshold)):
        m = binary_metrics(y, p, threshold=t)
        out[name] = {"mcc": m["mcc"], "auroc": m["auroc"], "fnr": m["fnr"], "fpr": m["fpr"],
                     "accuracy": m["accuracy"], "threshold": float(t),
                     "coverage_at_fnr": coverage_at_fnr(y, p, t, alpha)}
    diffs = paired_differences(y, challenger, challenger_threshold, champion, champion_threshold,
                               n_bootstrap=config.n_bootstrap, confidence=config.confidence, seed=config.seed)
    for stats in diffs.values():
        stats["confidence"] = config.confidence
    out.update(diffs)
    return out


# ---------------------------------------------------------------------------------------------------
# the floor and the decision


def check_floor(metrics: dict[str, Any], floor: MetricFloor, *, alpha: float) -> list[str]:
    """Reasons why a bundle's test metrics fall below the floor (empty list: it passes)."""
    problems = []
    mcc, auroc, fnr = metrics.get("mcc"), metrics.get("auroc"), metrics.get("fnr")
    max_fnr = alpha if floor.max_fnr is None else floor.max_fnr
    if mcc is None or mcc < floor.min_mcc:
        problems.append(f"test MCC {num(mcc)} is below the floor {floor.min_mcc}")
    if auroc is None or auroc < floor.min_auroc:
        problems.append(f"test AUROC {num(auroc)} is below the floor {floor.min_auroc}")
    if fnr is None or fnr > max_fnr:
        problems.append(f"test FNR {num(fnr)} is above the allowed {max_fnr}")
    return problems


def baseline_problems(bundle_dir: str | Path) -> list[str]:
    """A bundle whose head lost to a baseline on its own test split is never promoted."""
    path = Path(bundle_dir) / "baselines.json"
    if not path.exists():
        return []
    comparison = json.loads(path.read_text())["comparison"]
    return [comparison["verdict"]] if comparison["loses"] else []


def floor_report(bundle_dir: str | Path, floor: MetricFloor) -> tuple[dict[str, Any], list[str]]:
    """A bundle's test metrics and every reason it may not be champion (floor, lost to a baseline)."""
    bundle_dir = Path(bundle_dir)
    metrics = json.loads((bundle_dir / "metrics.json").read_text())
    alpha = json.loads((bundle_dir / "thresholds.json").read_text())["alpha"]
    return metrics, check_floor(metrics, floor, alpha=alpha) + baseline_problems(bundle_dir)


@dataclass(frozen=True)
class Decision:
    """The verdict and every check behind it (each: name, passed, what was measured)."""

    promote: bool
    reason: str
    checks: tuple[dict[str, Any], ...] = ()


def decide(comparison: dict[str, Any] | None, config: ComparisonConfig, *, floor_problems: list[str],
           n_test_pos: int, n_test_neg: int, alpha: float, blocked: str = "") -> Decision:
    """Promote or keep, and why. `comparison` is None when there is no champion yet; `alpha` is the
    FNR guarantee both models were fitted for; `blocked` names a reason set by people (the challenger
    was rolled back) that retrain must not override."""
    checks: list[dict[str, Any]] = []

    def check(name: str, passed: bool, detail: str) -> None:
        checks.append({"check": name, "passed": bool(passed), "detail": detail})

    check("floor", not floor_problems, "; ".join(floor_problems) or "meets the floor")
    need = config.min_test_per_class
    check("test size", min(n_test_pos, n_test_neg) >= need,
          f"{n_test_pos} roadwork and {n_test_neg} other test images (needs >= {need} of each)")
    if blocked:
        check("history", False, blocked)
    if comparison is not None:
        level = f"{config.confidence:.0%}"
        mcc, auroc, fnr = comparison["mcc_gain"], comparison["auroc_gain"], comparison["fnr_increase"]
        check("MCC gain", mcc["low"] > config.min_mcc_gain,
              f"{mcc['estimate']:+.4f}, {level} lower bound {mcc['low']:+.4f} "
              f"{'>' if mcc['low'] > config.min_mcc_gain else '<='} {config.min_mcc_gain:+.4f}")
        check("AUROC non-inferior", auroc["low"] > -config.auroc_margin,
              f"change {signed(auroc['estimate'])}, {level} lower bound {signed(auroc['low'])} "
              f"{'>' if auroc['low'] > -config.auroc_margin else '<='} {-config.auroc_margin:+.4f}")
        margin = config.fnr_margin_for(alpha)
        check("FNR non-inferior", fnr["high"] < margin,
              f"increase {signed(fnr['estimate'])}, {level} upper bound {signed(fnr['high'])} "
              f"{'<' if fnr['high'] < margin else '>='} {margin:+.4f}")
    failed = [c for c in checks if not c["passed"]]
    if failed:
        what = "; ".join(f"{c['check']}: {c['detail']}" for c in failed)
        hint = (" (add test images, or lower min_test_per_class in the team settings' [promotion] table)"
                if any(c["check"] == "test size" for c in failed) else "")
        return Decision(False, f"{what}{hint}", tuple(checks))
    if comparison is None:
        return Decision(True, "no champion yet: the first version that meets the floor on a large enough "
                              "test split becomes champion", tuple(checks))
    bounds = [f"{c['check']}: {c['detail']}" for c in checks
              if c["check"] in ("MCC gain", "AUROC non-inferior", "FNR non-inferior")]
    return Decision(True, "; ".join(bounds), tuple(checks))


# ---------------------------------------------------------------------------------------------------
# reports


def comparison_table(report: dict[str, Any]) -> list[dict[str, str]]:
    """Challenger and champion side by side (rows: metrics)."""
    comp = report.get("comparison")
    rows = []
    for key, label in (("mcc", "MCC"), ("auroc", "AUROC"), ("fnr", "FNR"), ("fpr", "FPR"),
                       ("accuracy", "accuracy"), ("coverage_at_fnr", "coverage at FNR ≤ α"),
                       ("policy_coverage", "coverage of the bundle's policy"), ("threshold", "threshold")):
        ch = comp["challenger"].get(key) if comp else report["challenger_metrics"].get(key)
        cp = comp["champion"].get(key) if comp else None
        delta = ch - cp if isinstance(ch, float) and isinstance(cp, float) else None
        rows.append({"metric": label, "challenger": num(ch), "champion": num(cp),
                     "difference": "n/a" if delta is None else f"{delta:+.4f}"})
    return rows


def comparison_markdown(report: dict[str, Any]) -> str:
    """The retrain decision as markdown: verdict, rule, bounds, checks, metrics side by side."""
    comp = report.get("comparison")
    champion = f"v{report['champion_version']}" if report.get("champion_version") else "none"
    verdict = "**PROMOTED** to `champion`" if report["promoted"] else "**NOT PROMOTED**: champion kept"
    if report["decision"] == "promote" and not report["promoted"]:
        verdict = "**WINS** but auto-promotion is off: promote by hand (`stage1 promote`)"
    lines = [f"# retrain: challenger v{report['challenger_version']} vs champion {champion}", "",
             f"{verdict}. {report['reason']}.", "", f"Rule: {report['rule']}.", ""]
    if comp:
        lines += [
            f"Same test split ({comp['n_test']} images, {comp['n_test_pos']} roadwork; split manifest "
            f"`{report['split_fingerprint'][:16]}`), same FNR constraint (α = {report['alpha']}, "
            f"δ = {report['delta']}): the champion's threshold is refitted on the challenger's calib split.",
            "", "| difference (challenger − champion) | estimate | lower bound | upper bound |", "|---|---|---|---|"]
        for key, label in (("mcc_gain", "MCC"), ("auroc_gain", "AUROC"), ("fnr_increase", "FNR")):
            d = comp[key]
            lines.append(f"| {label} | {signed(d['estimate'])} | {signed(d['low'])} | "
                         f"{signed(d['high'])} |")
        lines.append("")
    if report.get("checks"):
        lines += ["| check | passed | detail |", "|---|---|---|"]
        lines += [f"| {c['check']} | {'yes' if c['passed'] else '**no**'} | {c['detail']} |" for c in report["checks"]]
        lines.append("")
    lines += ["| metric | challenger | champion | difference |", "|---|---|---|---|"]
    lines += [f"| {r['metric']} | {r['challenger']} | {r['champion']} | {r['difference']} |"
              for r in comparison_table(report)]
    lines.append("")
    if comp and comp.get("n_test_champion") is not None:
        lines += [f"Test images the champion was reported on: {comp['n_test_champion']}; added since: "
                  f"{comp['n_test'] - comp['n_test_champion']}.", ""]
    return "\n".join(lines)


def _round(v: Any) -> float | None:
    return round(float(v), 4) if isinstance(v, (int, float)) and np.isfinite(v) else None


def history_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The few comparison figures a history entry keeps (small: registry tags are size-limited)."""
    comp = report.get("comparison")
    figures: dict[str, Any] = {}
    if comp:
        figures["n_test"] = [comp["n_test"], comp["n_test_pos"], comp["n_test"] - comp["n_test_pos"]]
        for key in ("mcc_gain", "auroc_gain", "fnr_increase"):
            d = comp[key]
            figures[key] = [_round(d["estimate"]), _round(d["low"]), _round(d["high"])]
        figures["mcc"] = [_round(comp["challenger"]["mcc"]), _round(comp["champion"]["mcc"])]
    else:
        m = report.get("challenger_metrics") or {}
        figures.update({f"test_{k}": _round(m.get(k)) for k in ("mcc", "auroc", "fnr")})
    return figures
