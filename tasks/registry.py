"""Champion/challenger: compare two bundles on the same test split under the same FNR constraint,
decide whether to promote, and move MLflow aliases with a record of who did it and why.

The statistics (paired bootstrap on the MCC difference, coverage at the guaranteed FNR) are plain
numpy/scipy functions at the top of this module, testable without MLflow or Prefect; the tasks below
them fetch bundles from the registry and write tags, descriptions and artifacts.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from stage1core.bundle import BundleError, load_bundle, read_manifest
from stage1core.config import describe_fields
from stage1core.guarantees import GuaranteeConfig, fnr_threshold
from stage1core.home import home_path
from stage1core.metrics import binary_metrics
from stage1core.sources import read_bytes
from stage1core.splits import read_split_manifest

CHAMPION = "champion"


@describe_fields
@dataclass(frozen=True)
class MetricFloor:
    """What any champion must reach on its own test split (from the bundle's metrics.json)."""

    min_mcc: float = 0.0  # test MCC at the guaranteed threshold
    min_auroc: float = 0.5  # test AUROC; 0.5 is chance
    max_fnr: float | None = None  # test FNR; None: the bundle's own guaranteed alpha

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
    """How `retrain` judges a challenger against the champion."""

    # the challenger's test MCC must exceed the champion's by at least this much (point estimate)
    min_mcc_gain: float = 0.01
    # also require the lower end of the bootstrap interval on the MCC gain to be above zero
    require_significant: bool = False
    # paired bootstrap over test images: resamples, interval level, seed
    n_bootstrap: int = 2000
    confidence: float = 0.95
    seed: int = 0
    # move `champion` automatically when the challenger wins; off: report only, promote by hand
    auto_promote: bool = True
    # the floor the challenger must meet before it can be promoted at all
    floor: MetricFloor = field(default_factory=MetricFloor)

    def __post_init__(self) -> None:
        if isinstance(self.floor, dict):  # from a JSON form
            object.__setattr__(self, "floor", MetricFloor(**self.floor))
        if self.n_bootstrap < 100:
            raise ValueError(f"ComparisonConfig.n_bootstrap must be >= 100, got {self.n_bootstrap}")
        if not 0.5 < self.confidence < 1.0:
            raise ValueError(f"ComparisonConfig.confidence must be in (0.5, 1), got {self.confidence}")


# ---------------------------------------------------------------------------------------------------
# statistics


def _mcc_from_counts(tp, fp, fn, tn) -> np.ndarray:
    """MCC from confusion counts (arrays), 0 where undefined (sklearn's convention)."""
    tp, fp, fn, tn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn, tn))
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        mcc = (tp * tn - fp * fn) / den
    return np.where(den > 0, mcc, 0.0)


def _mcc(y: np.ndarray, pred: np.ndarray, axis: int = -1) -> np.ndarray:
    y, pred = y.astype(bool), pred.astype(bool)
    return _mcc_from_counts((pred & y).sum(axis), (pred & ~y).sum(axis), (~pred & y).sum(axis),
                            (~pred & ~y).sum(axis))


def paired_mcc_difference(y: np.ndarray, pred_challenger: np.ndarray, pred_champion: np.ndarray, *,
                          n_bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0
                          ) -> tuple[float, float, float]:
    """MCC(challenger) - MCC(champion) on the same images, with a paired percentile bootstrap interval.

    Paired: each resample draws test images (with replacement) and scores both models on the same
    draw, so the interval reflects the difference, not two independent noises.
    """
    from scipy.stats import bootstrap

    y = np.asarray(y, dtype=bool)
    a = np.asarray(pred_challenger, dtype=bool)
    b = np.asarray(pred_champion, dtype=bool)
    diff = float(_mcc(y, a) - _mcc(y, b))
    if y.size < 2 or np.array_equal(a, b):
        return diff, diff, diff

    def statistic(yy, aa, bb, axis=-1):
        return _mcc(yy, aa, axis) - _mcc(yy, bb, axis)

    res = bootstrap((y, a, b), statistic, paired=True, vectorized=True, n_resamples=n_bootstrap,
                    confidence_level=confidence, method="percentile", random_state=np.random.default_rng(seed))
    low, high = res.confidence_interval
    return diff, float(low), float(high)


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
    FNR constraint), and the paired bootstrap interval on the MCC difference."""
    y = np.asarray(labels)
    out: dict[str, Any] = {"n_test": int(y.size), "n_test_pos": int(y.sum())}
    for name, p, t in (("challenger", challenger, challenger_threshold), ("champion", champion, champion_threshold)):
        m = binary_metrics(y, p, threshold=t)
        out[name] = {"mcc": m["mcc"], "auroc": m["auroc"], "fnr": m["fnr"], "fpr": m["fpr"],
                     "accuracy": m["accuracy"], "threshold": float(t),
                     "coverage_at_fnr": coverage_at_fnr(y, p, t, alpha)}
    diff, low, high = paired_mcc_difference(
        y, np.asarray(challenger) >= challenger_threshold, np.asarray(champion) >= champion_threshold,
        n_bootstrap=config.n_bootstrap, confidence=config.confidence, seed=config.seed)
    out["mcc_gain"] = {"estimate": diff, "low": low, "high": high, "confidence": config.confidence}
    return out


def check_floor(metrics: dict[str, Any], floor: MetricFloor, *, alpha: float) -> list[str]:
    """Reasons why a bundle's test metrics fall below the floor (empty list: it passes)."""
    problems = []
    mcc, auroc, fnr = metrics.get("mcc"), metrics.get("auroc"), metrics.get("fnr")
    max_fnr = alpha if floor.max_fnr is None else floor.max_fnr
    if mcc is None or mcc < floor.min_mcc:
        problems.append(f"test MCC {fmt(mcc)} is below the floor {floor.min_mcc}")
    if auroc is None or auroc < floor.min_auroc:
        problems.append(f"test AUROC {fmt(auroc)} is below the floor {floor.min_auroc}")
    if fnr is None or fnr > max_fnr:
        problems.append(f"test FNR {fmt(fnr)} is above the allowed {max_fnr}")
    return problems


def decide(comparison: dict[str, Any] | None, config: ComparisonConfig, *, floor_problems: list[str]
           ) -> tuple[bool, str]:
    """(promote?, why) from a comparison (None: there is no champion yet)."""
    if floor_problems:
        return False, "challenger is below the metric floor: " + "; ".join(floor_problems)
    if comparison is None:
        return True, "no champion yet: the first registered model that meets the floor becomes champion"
    gain = comparison["mcc_gain"]
    ci = f"[{gain['low']:+.4f}, {gain['high']:+.4f}] ({gain['confidence']:.0%} paired bootstrap)"
    if gain["estimate"] < config.min_mcc_gain:
        return False, (f"MCC gain {gain['estimate']:+.4f} {ci} is below the required margin "
                       f"{config.min_mcc_gain:+.4f}; the champion stays")
    if config.require_significant and gain["low"] <= 0:
        return False, (f"MCC gain {gain['estimate']:+.4f} meets the margin but its interval {ci} includes 0; "
                       "the champion stays")
    return True, f"MCC gain {gain['estimate']:+.4f} {ci} meets the margin {config.min_mcc_gain:+.4f}"


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if not np.isfinite(v) else f"{v:.4f}"
    return "n/a" if v is None else str(v)


def comparison_table(report: dict[str, Any]) -> list[dict[str, str]]:
    comp = report.get("comparison")
    rows = []
    for key, label in (("mcc", "MCC"), ("auroc", "AUROC"), ("fnr", "FNR"), ("fpr", "FPR"),
                       ("accuracy", "accuracy"), ("coverage_at_fnr", "coverage at FNR ≤ α"),
                       ("policy_coverage", "coverage of the bundle's policy"), ("threshold", "threshold")):
        ch = comp["challenger"].get(key) if comp else report["challenger_metrics"].get(key)
        cp = comp["champion"].get(key) if comp else None
        delta = ch - cp if isinstance(ch, float) and isinstance(cp, float) else None
        rows.append({"metric": label, "challenger": fmt(ch), "champion": fmt(cp),
                     "difference": "n/a" if delta is None else f"{delta:+.4f}"})
    return rows


def comparison_markdown(report: dict[str, Any]) -> str:
    comp = report.get("comparison")
    rows = "\n".join(f"| {r['metric']} | {r['challenger']} | {r['champion']} | {r['difference']} |"
                     for r in comparison_table(report))
    champion = (f"v{report['champion_version']}" if report.get("champion_version") else "none")
    verdict = "**PROMOTED** to `champion`" if report["promoted"] else "**NOT PROMOTED**: champion kept"
    if report["decision"] == "promote" and not report["promoted"]:
        verdict = "**WINS** but auto-promotion is off: promote by hand with the `promote` flow"
    lines = [
        f"# retrain: challenger v{report['challenger_version']} vs champion {champion}",
        "",
        f"{verdict}. {report['reason']}.",
        "",
    ]
    if comp:
        gain = comp["mcc_gain"]
        lines += [
            f"Same test split ({comp['n_test']} images, {comp['n_test_pos']} roadwork; split manifest "
            f"`{report['split_fingerprint'][:16]}`), same FNR constraint (α = {report['alpha']}, "
            f"δ = {report['delta']}): the champion's threshold is refitted on the challenger's calib split.",
            "",
            f"MCC gain {gain['estimate']:+.4f}, {gain['confidence']:.0%} paired bootstrap interval "
            f"[{gain['low']:+.4f}, {gain['high']:+.4f}]; required margin {report['min_mcc_gain']:+.4f}"
            + (" and an interval above 0." if report["require_significant"] else "."),
            "",
        ]
    lines += ["| metric | challenger | champion | difference |", "|---|---|---|---|", rows, ""]
    if comp and comp.get("n_test_champion") is not None:
        lines += [f"Test images the champion was reported on: {comp['n_test_champion']}; added since: "
                  f"{comp['n_test'] - comp['n_test_champion']}.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# the registry


def parse_model_ref(ref: str, default_model: str) -> tuple[str, str | None, str | None]:
    """(model name, version, alias) from `models:/name@alias`, `models:/name/3`, `@alias`, `3` or `alias`."""
    ref = ref.strip()
    name = default_model
    if ref.startswith("models:/"):
        body = ref[len("models:/"):]
        if "@" in body:
            name, alias = body.split("@", 1)
            return name, None, alias
        name, _, version = body.partition("/")
        if not version:
            raise ValueError(f"model reference {ref!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
        return name, version, None
    ref = ref.lstrip("@")
    if ref.isdigit():
        return name, ref, None
    if not ref:
        raise ValueError("empty model reference: give a version number, an alias or models:/<name>@<alias>")
    return name, None, ref


def get_version(model_name: str, *, version: str | None = None, alias: str | None = None):
    """An MLflow ModelVersion, or None when the alias or version does not exist."""
    from mlflow.exceptions import MlflowException

    from tasks.tracking import client

    mc = client()
    try:
        if alias is not None:
            return mc.get_model_version_by_alias(model_name, alias)
        return mc.get_model_version(model_name, str(version))
    except MlflowException:
        return None


def _local_bundle(fingerprint: str) -> Path | None:
    """A bundle with this fingerprint already under $STAGE1_HOME/bundles, if it verifies."""
    for path in home_path("bundles").glob(f"*-{fingerprint[:12]}"):
        try:
            if read_manifest(path)["fingerprint"] == fingerprint:
                return path
        except BundleError:
            continue
    return None


def fetch_bundle(model_name: str, mv) -> Path:
    """The bundle directory of a registered version, verified (schema and sha256 of every file).

    Uses the local copy under $STAGE1_HOME/bundles when it verifies, else downloads the version's
    model artifacts from MLflow (the pyfunc model carries the bundle under artifacts/bundle).
    """
    import mlflow

    expected = mv.tags.get("bundle_fingerprint")
    if expected:
        local = _local_bundle(expected)
        if local is not None:
            return local
    dest = home_path("registry", model_name, f"v{mv.version}")
    if dest.exists():
        shutil.rmtree(dest)
    mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{mv.version}", dst_path=str(dest))
    manifests = sorted(dest.rglob("manifest.json"))
    if not manifests:
        raise BundleError(f"{model_name} v{mv.version}: no bundle (manifest.json) in the model artifacts")
    bundle = manifests[0].parent
    manifest = read_manifest(bundle)
    if expected and manifest["fingerprint"] != expected:
        raise BundleError(f"{model_name} v{mv.version}: bundle fingerprint {manifest['fingerprint'][:12]} does not "
                          f"match the version tag bundle_fingerprint {expected[:12]}")
    return bundle


def score_images(bundle_dir: Path, locators: list[str]) -> dict[str, np.ndarray]:
    """The bundle's policy on images: p_raw (what the FNR threshold applies to), p (calibrated),
    decision (1/0, -1 = abstain)."""
    predictor = load_bundle(bundle_dir, device="auto")
    if not locators:
        return {"p_raw": np.zeros(0), "p": np.zeros(0), "decision": np.zeros(0, np.int64)}
    return predictor.apply_policy(predictor.features([read_bytes(loc) for loc in locators]))


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def requester(requested_by: str = "") -> str:
    if requested_by:
        return requested_by
    return os.environ.get("STAGE1_USER") or getpass.getuser()


@task(name="compare_with_champion")
def compare_with_champion(*, model_name: str, challenger_version: str, split_manifest: str,
                          guarantee: GuaranteeConfig, config: ComparisonConfig) -> dict[str, Any]:
    """Score the champion on the challenger's calib and test images, refit its threshold on that calib
    split for the same (alpha, delta), compare on test, and decide. Returns a JSON-able report."""
    logger = get_run_logger()
    challenger_mv = get_version(model_name, version=challenger_version)
    champion_mv = get_version(model_name, alias=CHAMPION)
    challenger_dir = fetch_bundle(model_name, challenger_mv)
    challenger_metrics = json.loads((challenger_dir / "metrics.json").read_text())
    thresholds = json.loads((challenger_dir / "thresholds.json").read_text())
    _, parts, manifest = read_split_manifest(split_manifest)
    report: dict[str, Any] = {
        "model_name": model_name, "challenger_version": str(challenger_version),
        "champion_version": str(champion_mv.version) if champion_mv else None,
        "alpha": guarantee.alpha, "delta": guarantee.delta, "min_mcc_gain": config.min_mcc_gain,
        "require_significant": config.require_significant, "split_fingerprint": manifest["fingerprint"],
        "challenger_metrics": {k: challenger_metrics.get(k) for k in ("mcc", "auroc", "fnr", "fpr", "accuracy")}
        | {"policy_coverage": challenger_metrics.get("coverage")},
        "comparison": None, "created_at": _now(),
    }
    report["challenger_metrics"]["threshold"] = thresholds["threshold"]
    floor_problems = check_floor(challenger_metrics, config.floor, alpha=guarantee.alpha)
    floor_problems += baseline_problems(challenger_dir)
    if champion_mv is not None and str(champion_mv.version) == str(challenger_version):
        report.update(decision="keep", reason="the challenger is the champion's bundle (no new data or settings)")
        return report
    if champion_mv is not None:
        champion_dir = fetch_bundle(model_name, champion_mv)
        preds = json.loads((challenger_dir / "test_predictions.json").read_text())
        by_id = {s.sample_id: s for rows in parts.values() for s in rows}
        test_ids = preds["sample_ids"]
        calib_pos = [s for s in parts["calib"] if s.label == 1]
        champ_calib = score_images(champion_dir, [s.locator for s in calib_pos])["p_raw"]
        champ_test = score_images(champion_dir, [by_id[i].locator for i in test_ids])
        # the same FNR constraint: the champion's threshold refitted on this calib split, same (alpha, delta)
        refit = fnr_threshold(champ_calib, guarantee)
        champion_thresholds = json.loads((champion_dir / "thresholds.json").read_text())
        comp = compare_predictions(
            labels=np.array(preds["labels"]), challenger=np.array(preds.get("p_roadwork_raw", preds["p_roadwork"])),
            challenger_threshold=float(thresholds["threshold"]), champion=champ_test["p_raw"],
            champion_threshold=refit.threshold, alpha=guarantee.alpha, config=config)
        comp["champion"]["deployed_threshold"] = float(champion_thresholds["threshold"])
        comp["n_test_champion"] = json.loads((champion_dir / "metrics.json").read_text()).get("n")
        # share of test images each bundle's own policy decides (1.0 for the always-decide threshold policy)
        comp["champion"]["policy_coverage"] = float(np.mean(champ_test["decision"] >= 0))
        comp["challenger"]["policy_coverage"] = (float(np.mean(np.array(preds["decision"]) >= 0))
                                                 if "decision" in preds else 1.0)
        report["comparison"] = comp
        logger.info("challenger v%s vs champion v%s on %d test images: MCC %.4f vs %.4f",
                    challenger_version, champion_mv.version, comp["n_test"], comp["challenger"]["mcc"],
                    comp["champion"]["mcc"])
        promote, reason = decide(comp, config, floor_problems=floor_problems)
    else:
        promote, reason = decide(None, config, floor_problems=floor_problems)
    report.update(decision="promote" if promote else "keep", reason=reason)
    return report


@task(name="set_champion")
def set_champion(*, model_name: str, version: str, requested_by: str, reason: str,
                 flow_run_id: str = "", alias: str = CHAMPION) -> dict[str, str]:
    """Point `alias` at `version`, recording who, why and when on the new version and on the one it
    replaces (so a rollback knows where to go back to)."""
    from tasks.tracking import client

    mc = client()
    previous = get_version(model_name, alias=alias)
    when = _now()
    mc.set_registered_model_alias(model_name, alias, str(version))
    record = {f"{alias}.promoted_by": requested_by, f"{alias}.promoted_reason": reason[:4000],
              f"{alias}.promoted_at": when, f"{alias}.previous_version": str(previous.version) if previous else "none"}
    if flow_run_id:
        record[f"{alias}.promoted_by_flow_run"] = flow_run_id
    for key, value in record.items():
        mc.set_model_version_tag(model_name, str(version), key, value)
    if previous is not None and str(previous.version) != str(version):
        mc.set_model_version_tag(model_name, str(previous.version), f"{alias}.replaced_by", str(version))
        mc.set_model_version_tag(model_name, str(previous.version), f"{alias}.replaced_at", when)
    get_run_logger().info("%s @%s: v%s -> v%s (%s, by %s)", model_name, alias,
                          previous.version if previous else "none", version, reason, requested_by)
    return {"model_name": model_name, "alias": alias, "version": str(version),
            "previous_version": str(previous.version) if previous else "", "requested_by": requested_by}


@task(name="record_comparison")
def record_comparison(report: dict[str, Any], *, mlflow_run_id: str) -> None:
    """The comparison on the challenger's version (tags + description) and MLflow run (metrics and
    report), and as Prefect markdown and table artifacts."""
    from tasks.tracking import client

    mc = client()
    name, version = report["model_name"], report["challenger_version"]
    markdown = comparison_markdown(report)
    comp = report.get("comparison")
    tags = {"retrain.decision": report["decision"], "retrain.promoted": str(report["promoted"]).lower(),
            "retrain.reason": report["reason"][:4000],
            "retrain.champion_version": report["champion_version"] or "none",
            "retrain.policy": (f"promote if MCC gain >= {report['min_mcc_gain']}"
                               + (" and interval > 0" if report["require_significant"] else "")
                               + f" on the same test split at FNR <= {report['alpha']} (delta {report['delta']})")}
    if comp:
        gain = comp["mcc_gain"]
        tags.update({"retrain.mcc_gain": f"{gain['estimate']:+.4f}",
                     "retrain.mcc_gain_interval": f"[{gain['low']:+.4f}, {gain['high']:+.4f}]"})
    for key, value in tags.items():
        mc.set_model_version_tag(name, version, key, value)
    current = mc.get_model_version(name, version).description or ""
    marker = "\n\n## Champion/challenger comparison\n"
    body = markdown.split("\n", 2)[2] if markdown.count("\n") >= 2 else markdown
    # the card stays first; each comparison this version went through is appended, newest last
    head = current if marker in current else current.rstrip() + marker
    mc.update_model_version(name, version, description=f"{head}\n### {report['created_at']}\n{body}")
    if mlflow_run_id:
        if comp:
            for key in ("mcc", "auroc", "coverage_at_fnr"):
                for side in ("challenger", "champion"):
                    value = comp[side][key]
                    if isinstance(value, float) and np.isfinite(value):
                        mc.log_metric(mlflow_run_id, f"compare/{side}_{key}", value)
            mc.log_metric(mlflow_run_id, "compare/mcc_gain", comp["mcc_gain"]["estimate"])
        mc.log_text(mlflow_run_id, markdown, "comparison/report.md")
        mc.log_dict(mlflow_run_id, report, "comparison/report.json")
    create_markdown_artifact(key="champion-challenger", markdown=markdown,
                             description=f"retrain decision for {name} v{version}")
    create_table_artifact(key="champion-challenger-table", table=comparison_table(report),
                          description=f"challenger v{version} vs champion on the same test split")


def baseline_problems(bundle_dir: Path) -> list[str]:
    """A bundle whose head lost to a baseline on its own test split is never promoted."""
    path = Path(bundle_dir) / "baselines.json"
    if not path.exists():
        return []
    comparison = json.loads(path.read_text())["comparison"]
    return [comparison["verdict"]] if comparison["loses"] else []


def floor_report(bundle_dir: Path, floor: MetricFloor) -> tuple[dict[str, Any], list[str]]:
    metrics = json.loads((bundle_dir / "metrics.json").read_text())
    alpha = json.loads((bundle_dir / "thresholds.json").read_text())["alpha"]
    return metrics, check_floor(metrics, floor, alpha=alpha) + baseline_problems(bundle_dir)
