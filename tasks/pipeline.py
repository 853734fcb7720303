"""One Prefect task per pipeline stage. Each returns a small reference (paths, fingerprints, metric
dicts), never tensors or models, and the expensive ones are cached on content fingerprints."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError

from stage1core.backbone import BackboneConfig, BackboneSpec, resolve_backbone
from stage1core.bundle import BundleInfo
from stage1core.bundle import export_bundle as write_bundle
from stage1core.demo import DemoConfig, demo_dataset_ready, generate_demo_dataset
from stage1core.evaluation import evaluate_policy
from stage1core.features import FeatureConfig, FeatureSetInfo, FeatureStore, feature_precision
from stage1core.features import extract_features as embed_samples
from stage1core.finetune import export_adapter_files
from stage1core.fingerprint import fingerprint, sha256_file
from stage1core.guarantees import GuaranteeConfig
from stage1core.heads import HeadConfig
from stage1core.home import home_path
from stage1core.near_duplicates import find_near_duplicates
from stage1core.policy import FittedPolicy, PolicyConfig, fit_policy
from stage1core.sources import DataError, SourceConfig, load_sources
from stage1core.splits import (
    SplitConfig,
    parent_pins,
    plan_splits,
    read_split_manifest,
    record_latest_manifest,
    split_counts,
    write_split_manifest,
)
from stage1core.storage import atomic_write_json
from stage1core.train import TrainConfig, head_fingerprint, head_outputs, load_head, save_head
from stage1core.train import fit_head as train_head

from .caching import OutputCache


@dataclass(frozen=True)
class SplitRef:
    path: str
    fingerprint: str
    data_fingerprint: str
    counts: dict[str, dict[str, int]]
    n_samples: int
    duplicates: int
    quarantined: int
    # the run fails when more than this fraction of all rows is quarantined (unreadable or undecodable)
    max_quarantined_fraction: float = 0.01
    n_groups: int = 0  # groups that each landed in one split (an ungrouped image is a group of one)
    largest_group: int = 0  # images in the largest group
    bridges: int = 0  # groups that new images joined across splits (old images never move; see docs/splits.md)


@dataclass(frozen=True)
class HeadRef:
    path: str
    fingerprint: str
    weights_sha256: str
    in_dim: int
    best_epoch: int
    epochs_run: int


@dataclass(frozen=True)
class EvalRef:
    path: str
    fingerprint: str
    metrics: dict[str, float]


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called as .fn() outside a flow run, e.g. in tests
        return logging.getLogger(__name__)


def check_splits_usable(counts: dict[str, dict[str, int]], *, where: str) -> None:
    """Every split needs both classes: train and val to fit the head, calib for the threshold and
    calibrators, test for MCC/AUROC. Raises DataError naming the split and its counts."""
    for name, c in counts.items():
        if c.get("total", 0) == 0:
            raise DataError(f"{where}: split {name!r} is empty; add images or raise SplitConfig.{name}")
        for label, word in (("1", "roadwork"), ("0", "no_roadwork")):
            if c.get(label, 0) == 0:
                raise DataError(f"{where}: split {name!r} has no {word} images ({c.get('0', 0)} no_roadwork, "
                                f"{c.get('1', 0)} roadwork); every split needs both classes: add images or "
                                f"change the split ratios or salt")


def _quarantine_row(locator: str, source: str, sources: list[dict[str, Any]]) -> int | None:
    """The row of a label file or parquet shard that names `locator` (None for class folders)."""
    from stage1core.sources import PARQUET_ROW_MARK, parse_csv_labels, parse_json_labels

    path, mark, row = locator.rpartition(PARQUET_ROW_MARK)
    if mark and row.isdigit():
        return int(row)
    for config in sources:
        cfg = SourceConfig(**config)
        label_file = Path(cfg.path).expanduser().absolute()
        if cfg.name != source or label_file.suffix.lower() not in (".csv", ".json") or not label_file.is_file():
            continue
        parse = parse_csv_labels if label_file.suffix.lower() == ".csv" else parse_json_labels
        try:
            rows = parse(label_file.read_text(encoding="utf-8-sig"), origin=str(label_file))
        except (OSError, ValueError):
            return None
        for r in rows:
            if os.path.abspath(label_file.parent / r.path) == locator:
                return r.row
    return None


def write_quarantine_report(entries: list[dict[str, Any]], key: str) -> Path:
    report = home_path("reports") / f"quarantine-{key[:16]}.json"
    atomic_write_json(report, entries)
    return report


@task(name="ensure_demo_data")
def ensure_demo_data(config: DemoConfig = DemoConfig()) -> SourceConfig:
    """The embedded default source: the procedural demo dataset under $STAGE1_HOME, made if absent."""
    out = home_path("demo-data")
    if not demo_dataset_ready(out, config):
        generate_demo_dataset(out, config)
    return SourceConfig(path=str(out), kind="folder", name="demo")


@task(name="build_splits")
def build_splits(sources: list[SourceConfig], splits: SplitConfig, *,
                 max_quarantined_fraction: float = 0.01) -> SplitRef:
    """Scan the sources (sha256 of every image), group them (group column, near-duplicates by perceptual
    hash), split by group, write the split manifest. Images already in the latest manifest made with
    this split config keep their split; it is recorded as the new manifest's parent.

    Not cached: new images must be seen. Cheap next to embedding (pHashes are stored per image).
    """
    logger = _logger()
    scan = load_sources(sources)
    if scan.quarantined:
        report = write_quarantine_report([{**q, "stage": "scan"} for q in scan.quarantined], scan.fingerprint())
        logger.warning("%d images quarantined (listed in %s)", len(scan.quarantined), report)
        if scan.quarantined_fraction > max_quarantined_fraction:
            raise DataError(
                f"{scan.quarantined_fraction:.1%} of the images could not be used (limit "
                f"{max_quarantined_fraction:.1%}); see {report}"
            )
    if not scan.samples:
        raise DataError(f"no images found in sources {[s.path for s in sources]}")
    links, loose, near = list(scan.links), [], {}
    if splits.near_duplicates:
        found = find_near_duplicates(scan.samples, radius=splits.near_duplicate_radius,
                                     diameter=splits.near_duplicate_diameter, cache_dir=home_path("phash"),
                                     log_fn=logger.info)
        links, loose, near = links + found.links, found.loose_pairs, found.summary
    data_fp = scan.fingerprint()
    splits_dir = home_path("splits")
    path = splits_dir / f"{fingerprint(data_fp, splits)[:24]}.json"
    pinned, parent = parent_pins(splits_dir, splits, output=path)
    plan = plan_splits(scan.samples, splits, links=links, pinned=pinned, loose_pairs=loose)
    groups = {**dataclasses.asdict(plan.stats), "near_duplicates": near}
    split_fp = write_split_manifest(path, plan.splits, splits, data_fingerprint=data_fp, group_of=plan.group_of,
                                    groups=groups, parent=parent,
                                    extra={"sources": [dataclasses.asdict(s) for s in sources]})
    record_latest_manifest(splits_dir, splits, path)
    _, _, manifest = read_split_manifest(path)
    logger.info("%d unique images (%d duplicates collapsed) in %d groups (largest %d, %d bridges): %s",
                len(scan.samples), scan.duplicates, plan.stats.n_groups, plan.stats.largest_group,
                plan.stats.bridges, json.dumps(manifest["counts"]))
    return SplitRef(path=str(path), fingerprint=split_fp, data_fingerprint=data_fp, counts=manifest["counts"],
                    n_samples=len(scan.samples), duplicates=scan.duplicates, quarantined=len(scan.quarantined),
                    max_quarantined_fraction=max_quarantined_fraction, n_groups=plan.stats.n_groups,
                    largest_group=plan.stats.largest_group, bridges=plan.stats.bridges)


FEATURES_CACHE = OutputCache(
    "extract_features",
    lambda p: (p["split"].fingerprint, resolve_backbone(p["backbone"]).fingerprint,
               feature_precision(p["backbone"], p["features"]), p["features"].jpeg_draft),
)


@task(name="extract_features", cache_key_fn=FEATURES_CACHE, persist_result=True, tags=["features", "gpu"])
def extract_features(split: SplitRef, backbone: BackboneConfig, features: FeatureConfig) -> FeatureSetInfo:
    """Embed every image of the split manifest that is not yet in the feature store.

    Images that cannot be decoded are quarantined: listed with file, source row and reason in a report
    under $STAGE1_HOME/reports, and left out of every split. The run goes on unless the quarantined
    fraction (scan + decode) exceeds `split.max_quarantined_fraction` or a split loses a class; then it
    fails, and the features already computed stay in the store for the next run.
    """
    logger = _logger()
    _, parts, manifest = read_split_manifest(split.path)
    check_splits_usable(split_counts(parts), where=split.path)  # before any image is embedded
    samples = [s for rows in parts.values() for s in rows]
    info = embed_samples(samples, backbone, features, log_fn=logger.info)
    if info.failed:
        by_id = {s.sample_id: s for s in samples}
        sources = manifest.get("extra", {}).get("sources", [])
        entries = [{"locator": f["locator"], "source": by_id[f["sample_id"]].source,
                    "row": _quarantine_row(f["locator"], by_id[f["sample_id"]].source, sources),
                    "reason": f["reason"], "sample_id": f["sample_id"], "stage": "decode"} for f in info.failed]
        report = write_quarantine_report(entries, fingerprint(split.fingerprint, info.store_key))
        logger.warning("%d images could not be decoded and are quarantined (listed in %s)", len(entries), report)
        total = split.n_samples + split.duplicates + split.quarantined
        fraction = (split.quarantined + len(entries)) / total if total else 0.0
        if fraction > split.max_quarantined_fraction:
            raise DataError(f"{fraction:.1%} of the images could not be used ({split.quarantined} unreadable, "
                            f"{len(entries)} undecodable; limit {split.max_quarantined_fraction:.1%}); see "
                            f"{report}. Features computed so far are kept for the next run.")
        failed = {f["sample_id"] for f in info.failed}
        remaining = {name: [s for s in rows if s.sample_id not in failed] for name, rows in parts.items()}
        check_splits_usable(split_counts(remaining), where=f"{split.path} after quarantining undecodable images")
    FEATURES_CACHE.remember({"split": split, "backbone": backbone, "features": features}, [info.store_dir])
    return info


def split_arrays(split: SplitRef, feats: FeatureSetInfo, names: tuple[str, ...]
                 ) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    """(sample ids, features, labels) per split name, skipping images that failed to decode."""
    _, parts, _ = read_split_manifest(split.path)
    failed = {f["sample_id"] for f in feats.failed}
    store = FeatureStore(feats.store_dir)
    out = {}
    for name in names:
        rows = [s for s in parts[name] if s.sample_id not in failed]
        ids = [s.sample_id for s in rows]
        out[name] = (ids, store.load(ids), np.array([s.label for s in rows], dtype=np.int64))
    return out


HEAD_CACHE = OutputCache(
    "fit_head",
    lambda p: head_fingerprint(p["feats"].fingerprint, p["split"].fingerprint, p["head"], p["train"]),
)


@task(name="fit_head", cache_key_fn=HEAD_CACHE, persist_result=True)
def fit_head(split: SplitRef, feats: FeatureSetInfo, head: HeadConfig, train: TrainConfig) -> HeadRef:
    """Train the head on cached train features, early-stopping on val."""
    logger = get_run_logger()
    arrays = split_arrays(split, feats, ("train", "val"))
    (_, xt, yt), (_, xv, yv) = arrays["train"], arrays["val"]

    def log_epoch(metrics: dict[str, float], epoch: int) -> None:
        logger.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    trained = train_head(xt, yt, xv, yv, head=head, config=train, log_fn=log_epoch)
    fp = head_fingerprint(feats.fingerprint, split.fingerprint, head, train)
    path = home_path("heads") / fp[:24]
    sha = save_head(path, trained, extra={"fingerprint": fp, "features": feats.fingerprint,
                                          "split": split.fingerprint, "train": dataclasses.asdict(train)})
    HEAD_CACHE.remember({"split": split, "feats": feats, "head": head, "train": train}, [path])
    return HeadRef(path=str(path), fingerprint=fp, weights_sha256=sha, in_dim=trained.in_dim,
                   best_epoch=trained.best_epoch, epochs_run=len(trained.history))


def _outputs(split: SplitRef, feats: FeatureSetInfo, head: HeadRef, names: tuple[str, ...]
             ) -> dict[str, tuple[list[str], dict[str, np.ndarray], np.ndarray]]:
    """(sample ids, head outputs, labels) per split name, loading the head once."""
    model = load_head(head.path).model
    return {name: (ids, head_outputs(model, x), y)
            for name, (ids, x, y) in split_arrays(split, feats, names).items()}


POLICY_CACHE = OutputCache(
    "calibrate",
    lambda p: (p["split"].fingerprint, p["feats"].fingerprint, p["head"].fingerprint, p["guarantee"], p["policy"]),
)


@task(name="calibrate", cache_key_fn=POLICY_CACHE, persist_result=True)
def calibrate(split: SplitRef, feats: FeatureSetInfo, head: HeadRef, guarantee: GuaranteeConfig,
              policy: PolicyConfig) -> dict[str, dict[str, Any]]:
    """On the calib split only: the FNR-guaranteed threshold, the probability calibrator, the gate's
    Platt scaling and SCRC-I as the policy asks. Returns the bundle's policy JSON files."""
    _, out, y = _outputs(split, feats, head, ("calib",))["calib"]
    fitted = fit_policy(out["logits"], y, out.get("gate_logit"), guarantee=guarantee, config=policy)
    thr = fitted.threshold
    get_run_logger().info(
        "threshold %.4f = %d-th smallest of %d calib positive scores; P(FNR > %.3f) <= %.4f; policy %s",
        thr.threshold, thr.k, thr.n_positives, guarantee.alpha, thr.violation_bound, policy.policy,
    )
    return fitted.files()


EVAL_CACHE = OutputCache(
    "evaluate_test",
    lambda p: (p["split"].fingerprint, p["feats"].fingerprint, p["head"].fingerprint, p["policy_files"]),
)


@task(name="evaluate_test", cache_key_fn=EVAL_CACHE, persist_result=True)
def evaluate_test(split: SplitRef, feats: FeatureSetInfo, head: HeadRef,
                  policy_files: dict[str, dict[str, Any]]) -> EvalRef:
    """Test metrics at the guaranteed threshold, calibration before/after, selective metrics of the
    policy and of each confidence score, and the plots (FNR/FPR, reliability, risk-coverage)."""
    outputs = _outputs(split, feats, head, ("test", "calib"))
    ids, out, y = outputs["test"]
    fp = fingerprint("evaluation", split.fingerprint, feats.fingerprint, head.fingerprint, policy_files)
    eval_dir = home_path("evaluations", fp[:24])
    _, calib_out, calib_y = outputs["calib"]
    fitted = FittedPolicy.from_files(policy_files)
    metrics = evaluate_policy(fitted, out, y, eval_dir, calib_logits=calib_out["logits"], calib_y=calib_y)
    applied = fitted.apply(out["logits"], out.get("gate_logit"))
    atomic_write_json(eval_dir / "test_predictions.json", {
        "sample_ids": ids, "labels": y.tolist(), "p_roadwork": applied["p"].tolist(),
        "p_roadwork_raw": applied["p_raw"].tolist(), "decision": applied["decision"].tolist(),
        "set": applied["set"].tolist(),
    })
    metrics = _json_safe(metrics)
    atomic_write_json(eval_dir / "metrics.json", metrics)
    EVAL_CACHE.remember({"split": split, "feats": feats, "head": head, "policy_files": policy_files}, [eval_dir])
    return EvalRef(path=str(eval_dir), fingerprint=fp, metrics=metrics)


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        v = v.item() if hasattr(v, "item") else v
        out[k] = None if isinstance(v, float) and not np.isfinite(v) else v
    return out


def model_card(*, name: str, spec: BackboneSpec, split: SplitRef, metrics: dict[str, Any],
               policy_files: dict[str, dict[str, Any]], head: HeadRef, head_config: HeadConfig) -> str:
    thresholds = policy_files["thresholds.json"]
    counts = split.counts
    rows = "\n".join(
        f"| {s} | {c.get('0', 0)} | {c.get('1', 0)} | {c.get('total', 0)} |" for s, c in counts.items()
    )
    stand_in = ""
    if "dinov3" not in spec.name:
        stand_in = (f"\n> The backbone `{spec.name}` stands in for DINOv3 (demo or test run); production "
                    "bundles use a DINOv3 backbone.\n")
    if spec.weights_kind == "random":
        stand_in += "\n> **Random-init backbone**: features carry no pretrained knowledge (baseline/test only).\n"

    def fmt(key: str) -> str:
        v = metrics.get(key)
        return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    return f"""# {name}: roadwork classifier bundle
{stand_in}
## Model
- Backbone: `{spec.name}` (weights: {spec.weights_kind}, sha256 `{(spec.weights_sha256 or 'none')[:16]}`),
  frozen, pooling `{spec.pooling}`, fingerprint `{spec.fingerprint[:16]}`
- Head: `{head_config.kind}` on {head.in_dim}-d features, best epoch {head.best_epoch} of {head.epochs_run}

## Data
Data fingerprint `{split.data_fingerprint[:16]}`, split manifest `{split.fingerprint[:16]}`,
{split.n_samples} unique images ({split.duplicates} duplicates collapsed, {split.quarantined} quarantined).
Groups (drives, near-duplicates), each in one split: {split.n_groups}; the largest has {split.largest_group} images.

| split | no roadwork | roadwork | total |
|---|---|---|---|
{rows}

## Decision rule and guarantee
Predict roadwork iff p(roadwork) >= {thresholds['threshold']:.6f}. Chosen on the calib split as the
{thresholds['k']}-th smallest of {thresholds['n_positives']} positive scores, so that
P(FNR <= {thresholds['alpha']}) >= 1 - {thresholds['delta']} over calib draws (bound
{thresholds['violation_bound']:.4f}); see docs/guarantees.md.

Active policy: **{metrics.get('policy')}** (coverage on test {fmt('coverage')}, FNR among accepted
{fmt('selective_fnr')}); reported probabilities are calibrated with `{metrics.get('calibrator')}`
(test ECE {fmt('calibration/raw/ece')} before, {fmt('calibration/temperature/ece')} temperature,
{fmt('calibration/dirichlet/ece')} Dirichlet).

## Test metrics (threshold above)
accuracy {fmt('accuracy')}, MCC {fmt('mcc')}, AUROC {fmt('auroc')}, FNR {fmt('fnr')}, FPR {fmt('fpr')},
ECE {fmt('ece')} (top-label, 15 equal-width bins), NLL {fmt('nll')}, Brier {fmt('brier')};
at 0.5: accuracy {fmt('accuracy_at_0.5')}, MCC {fmt('mcc_at_0.5')}.

## Known limits
The FNR guarantee holds for data distributed like the calib split; a shift in cameras, regions or
seasons voids it until recalibrated. Test metrics come from {counts.get('test', {}).get('total', 0)} images.
"""


EXPORT_CACHE = OutputCache(
    "export_bundle",
    lambda p: (p["name"], p["split"].fingerprint, p["feats"].fingerprint, p["head"].fingerprint,
               p["policy_files"], p["evaluation"].fingerprint, resolve_backbone(p["backbone"]).fingerprint,
               p["head_config"], p.get("adapter_dir") is not None, p.get("merge_adapters", False)),
)


@task(name="export_bundle", cache_key_fn=EXPORT_CACHE, persist_result=True)
def export_bundle(*, name: str, split: SplitRef, feats: FeatureSetInfo, head: HeadRef, head_config: HeadConfig,
                  policy_files: dict[str, dict[str, Any]], evaluation: EvalRef,
                  backbone: BackboneConfig, adapter_dir: str | None = None,
                  merge_adapters: bool = False) -> BundleInfo:
    """Write the bundle under $STAGE1_HOME/bundles. With `adapter_dir` (a fine-tuning run), the
    adapters go in beside the head, or folded into backbone.safetensors when `merge_adapters`."""
    store_meta = FeatureStore(feats.store_dir).meta
    spec = BackboneSpec.from_json(store_meta["backbone"])
    preprocessing = {**store_meta["preprocessing"], "precision": store_meta["precision"]}
    eval_dir = Path(evaluation.path)
    info = write_bundle(
        home_path("bundles"), name=name, backbone=spec, preprocessing=preprocessing, head_dir=head.path,
        policy_files=policy_files, metrics=evaluation.metrics,
        model_card=model_card(name=name, spec=spec, split=split, metrics=evaluation.metrics,
                              policy_files=policy_files, head=head, head_config=head_config),
        inputs={"data_fingerprint": split.data_fingerprint, "split_fingerprint": split.fingerprint,
                "features_fingerprint": feats.fingerprint, "head_fingerprint": head.fingerprint,
                "split_manifest_sha256": sha256_file(split.path)},
        files={"plots/fnr_fpr.png": eval_dir / "fnr_fpr.png",
               "plots/reliability.png": eval_dir / "reliability.png",
               "plots/risk_coverage.png": eval_dir / "risk_coverage.png",
               "test_predictions.json": eval_dir / "test_predictions.json",
               **(export_adapter_files(adapter_dir, merge=merge_adapters) if adapter_dir else {})},
    )
    get_run_logger().info("bundle %s", info.path)
    EXPORT_CACHE.remember(
        {"name": name, "split": split, "feats": feats, "head": head, "policy_files": policy_files,
         "evaluation": evaluation, "backbone": backbone, "head_config": head_config, "adapter_dir": adapter_dir,
         "merge_adapters": merge_adapters}, [info.path])
    return info
