"""One Prefect task per pipeline stage. Each returns a small reference (paths, fingerprints, metric
dicts), never tensors or models, and the expensive ones are cached on content fingerprints."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task

from stage1core.backbone import BackboneConfig, BackboneSpec
from stage1core.backbone import resolve_backbone as resolve_weights
from stage1core.baselines import BaselineConfig, compare_with_baselines
from stage1core.baselines import score_baselines as fit_and_score_baselines
from stage1core.bundle import BundleInfo
from stage1core.bundle import export_bundle as write_bundle
from stage1core.card import model_card as write_model_card
from stage1core.demo import DemoConfig, demo_dataset_ready, generate_demo_dataset
from stage1core.evaluation import evaluate_policy
from stage1core.features import (
    FeatureConfig,
    FeatureSetInfo,
    FeatureStore,
    feature_precision,
    feature_store_target,
)
from stage1core.features import extract_features as embed_samples
from stage1core.finetune import export_adapter_files
from stage1core.fingerprint import fingerprint, sha256_file
from stage1core.guarantees import GuaranteeConfig
from stage1core.heads import HeadConfig, feature_views
from stage1core.home import bundle_signing_key, home_path
from stage1core.near_duplicates import find_near_duplicates
from stage1core.policy import FittedPolicy, PolicyConfig, fit_policy
from stage1core.selection import SelectionConfig
from stage1core.sources import DataError, LabelConflictError, SourceConfig, load_sources
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
from tasks.logs import run_logger

from .caching import OutputCache
from .scale_out import ScaleOutConfig, fill_store_in_chunks


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
    quarantine_report: str = ""  # this run's quarantine report (written only when something was quarantined)


@dataclass(frozen=True)
class HeadRef:
    path: str
    fingerprint: str
    weights_sha256: str
    in_dim: int
    best_epoch: int
    epochs_run: int
    kind: str = "mlp"  # the concrete kind of the chosen head
    chosen: str = ""  # the chosen grid point, e.g. "linear C=0.1 view=all"
    n_candidates: int = 1  # heads trained by head selection
    criterion: str = ""  # how the head was chosen


@dataclass(frozen=True)
class EvalRef:
    path: str
    fingerprint: str
    metrics: dict[str, float]


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


class QuarantineError(DataError):
    """The run stops over images it cannot use; `report` is the quarantine report that lists them."""

    def __init__(self, message: str, *, report: str | Path):
        super().__init__(message)
        self.report = str(report)


def quarantine_report_path() -> Path:
    """This run's quarantine report: one file per flow run (scan, decode and label conflicts together),
    named by the run so that two runs never write different contents under one name."""
    import time
    import uuid

    from prefect.runtime import flow_run

    run = str(flow_run.id or uuid.uuid4())
    return home_path("reports") / f"quarantine-{time.strftime('%Y%m%d-%H%M%S')}-{run[:8]}.json"


def write_quarantine_report(path: str | Path, entries: list[dict[str, Any]], *, total_rows: int,
                            limit: float) -> Path:
    """Write (atomically) the report: counts per stage, then one entry per image with its locator,
    source, row, reason and stage (`scan`, `decode` or `conflict`)."""
    counts = {stage: sum(1 for e in entries if e["stage"] == stage) for stage in ("scan", "decode", "conflict")}
    atomic_write_json(Path(path), {"counts": {**counts, "quarantined": counts["scan"] + counts["decode"],
                                              "rows": total_rows}, "max_quarantined_fraction": limit,
                                   "entries": entries})
    return Path(path)


def read_quarantine_entries(path: str | Path) -> list[dict[str, Any]]:
    try:
        return json.loads(Path(path).read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return []


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
    logger = run_logger(__name__)
    report = quarantine_report_path()
    source_dicts = [dataclasses.asdict(s) for s in sources]
    try:
        scan = load_sources(sources)
    except LabelConflictError as exc:
        entries = [{**q, "stage": "scan"} for q in exc.quarantined] + [
            {"locator": c["locator"], "source": c["source"],
             "row": c["row"],
             "reason": f"label {c['label']} here, label {c['other_label']} at {c['other_locator']}",
             "sample_id": c["sample_id"], "stage": "conflict", "other_locator": c["other_locator"]}
            for c in exc.conflicts]
        write_quarantine_report(report, entries, total_rows=0, limit=max_quarantined_fraction)
        raise QuarantineError(f"{len(exc.conflicts)} label conflict(s), every one listed in {report}; first: {exc}",
                              report=report) from None
    if scan.quarantined:
        total = len(scan.samples) + scan.duplicates + len(scan.quarantined)
        write_quarantine_report(report, [{**q, "stage": "scan"} for q in scan.quarantined], total_rows=total,
                                limit=max_quarantined_fraction)
        logger.warning("%d images quarantined (listed in %s)", len(scan.quarantined), report)
        if scan.quarantined_fraction > max_quarantined_fraction:
            raise QuarantineError(
                f"{scan.quarantined_fraction:.1%} of the images could not be used (limit "
                f"{max_quarantined_fraction:.1%}); see {report}", report=report)
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
                                    extra={"sources": source_dicts})
    record_latest_manifest(splits_dir, splits, path)
    _, _, manifest = read_split_manifest(path)
    logger.info("%d unique images (%d duplicates collapsed) in %d groups (largest %d, %d bridges): %s",
                len(scan.samples), scan.duplicates, plan.stats.n_groups, plan.stats.largest_group,
                plan.stats.bridges, json.dumps(manifest["counts"]))
    return SplitRef(path=str(path), fingerprint=split_fp, data_fingerprint=data_fp, counts=manifest["counts"],
                    n_samples=len(scan.samples), duplicates=scan.duplicates, quarantined=len(scan.quarantined),
                    max_quarantined_fraction=max_quarantined_fraction, n_groups=plan.stats.n_groups,
                    largest_group=plan.stats.largest_group, bridges=plan.stats.bridges,
                    quarantine_report=str(report))


@task(name="resolve_backbone")
def resolve_backbone(backbone: BackboneConfig) -> BackboneSpec:
    """Find the backbone's weights file and hash it, once per run: the tasks downstream take the resolved
    spec (its fingerprint keys their caches) instead of hashing the weights again. Never cached: the
    file behind a path can change between runs."""
    spec = resolve_weights(backbone)
    run_logger(__name__).info("backbone %s: %s weights%s, fingerprint %s", spec.name, spec.weights_kind,
                              f" {spec.weights_file} (sha256 {spec.weights_sha256[:12]})" if spec.weights_file else "",
                              spec.fingerprint[:12])
    return spec


FEATURES_CACHE = OutputCache(
    "extract_features",
    lambda p: (p["split"].fingerprint, p["backbone"].fingerprint,
               feature_precision(p["backbone"], p["features"]), p["features"].jpeg_draft),
    paths=lambda info, p: [info.store_dir],
)


@task(name="extract_features", cache_key_fn=FEATURES_CACHE, persist_result=True, tags=["features", "gpu"])
@FEATURES_CACHE.records_outputs
def extract_features(split: SplitRef, backbone: BackboneSpec, features: FeatureConfig,
                     scale_out: ScaleOutConfig = ScaleOutConfig()) -> FeatureSetInfo:
    """Embed every image of the split manifest that is not yet in the feature store (`backbone`: the
    run's resolved spec, from `resolve_backbone`), in this process or, with `scale_out.engine` "dask",
    chunk by chunk on a Dask cluster. Either way the store and the result are the same, so `scale_out`
    is not part of the cache key.

    Images that cannot be decoded are returned in `failed` (with the reason) and left out of every
    split; `check_quarantine` reports them and applies the run's limit.
    """
    logger = run_logger(__name__)
    _, parts, _ = read_split_manifest(split.path)
    check_splits_usable(split_counts(parts), where=split.path)  # before any image is embedded
    samples = [s for rows in parts.values() for s in rows]
    if scale_out.distributed:
        return fill_store_in_chunks(feature_store_target(backbone, features), samples, scale_out,
                                    log_fn=logger.info)
    return embed_samples(samples, backbone, features, log_fn=logger.info)


def counted_now(state: Any) -> FeatureSetInfo:
    """The FeatureSetInfo of an `extract_features` call made with `return_state=True`. A result served
    from Prefect's cache embedded nothing in this run, whatever the run that computed it did."""
    info = state.result()
    if state.name == "Cached":
        info = dataclasses.replace(info, n_computed=0, seconds=0.0, images_per_second=0.0)
    return info


@task(name="check_quarantine")
def check_quarantine(split: SplitRef, feats: FeatureSetInfo) -> dict[str, Any]:
    """This run's quarantine: rows unusable at scan (in the split's report) plus images that could not
    be decoded, written to one report. Fails, naming the report, when the quarantined fraction of all
    rows exceeds `split.max_quarantined_fraction` or a split loses a class. Not cached: every run
    reports its own quarantine, also when the features came from the cache."""
    logger = run_logger(__name__)
    _, parts, _ = read_split_manifest(split.path)
    report = Path(split.quarantine_report) if split.quarantine_report else quarantine_report_path()
    entries = [e for e in read_quarantine_entries(report) if e.get("stage") == "scan"]
    total = split.n_samples + split.duplicates + split.quarantined
    if feats.failed:
        by_id = {s.sample_id: s for rows in parts.values() for s in rows}
        entries += [{"locator": f["locator"], "source": by_id[f["sample_id"]].source,
                     "row": by_id[f["sample_id"]].row,  # the label-file row the scan recorded
                     "reason": f["reason"], "sample_id": f["sample_id"], "stage": "decode"} for f in feats.failed]
    summary = {"path": str(report) if entries else "", "scan": split.quarantined, "decode": len(feats.failed),
               "quarantined": split.quarantined + len(feats.failed), "rows": total}
    if not entries:
        return summary
    write_quarantine_report(report, entries, total_rows=total, limit=split.max_quarantined_fraction)
    if feats.failed:
        logger.warning("%d images could not be decoded and are quarantined (listed in %s)", len(feats.failed), report)
    fraction = summary["quarantined"] / total if total else 0.0
    if fraction > split.max_quarantined_fraction:
        raise QuarantineError(f"{fraction:.1%} of the images could not be used ({split.quarantined} unreadable, "
                              f"{len(feats.failed)} undecodable; limit {split.max_quarantined_fraction:.1%}); see "
                              f"{report}. Features computed so far are kept for the next run.", report=report)
    failed = {f["sample_id"] for f in feats.failed}
    remaining = {name: [s for s in rows if s.sample_id not in failed] for name, rows in parts.items()}
    check_splits_usable(split_counts(remaining), where=f"{split.path} after quarantining undecodable images")
    return summary


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
    lambda p: head_fingerprint(p["feats"].fingerprint, p["split"].fingerprint, p["head"], p["train"], p["selection"],
                               needs_gate=p.get("needs_gate", False)),
    paths=lambda ref, p: [ref.path],
)


@task(name="fit_head", cache_key_fn=HEAD_CACHE, persist_result=True)
@HEAD_CACHE.records_outputs
def fit_head(split: SplitRef, feats: FeatureSetInfo, head: HeadConfig, train: TrainConfig,
             selection: SelectionConfig = SelectionConfig(), needs_gate: bool = False) -> HeadRef:
    """Train the head grid on cached train features and keep the best on val (one head when
    selection is off); the grid and the choice are saved in head.json."""
    logger = get_run_logger()
    arrays = split_arrays(split, feats, ("train", "val"))
    (_, xt, yt), (_, xv, yv) = arrays["train"], arrays["val"]
    views = feature_views(FeatureStore(feats.store_dir).meta["backbone"]["pooling"], feats.dim)

    def log_epoch(metrics: dict[str, float], epoch: int) -> None:
        logger.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    trained = train_head(xt, yt, xv, yv, head=head, config=train, selection=selection, views=views,
                         needs_gate=needs_gate, log_fn=log_epoch)
    chosen = next(row for row in trained.grid if row["chosen"])
    fp = head_fingerprint(feats.fingerprint, split.fingerprint, head, train, selection, needs_gate=needs_gate)
    path = home_path("heads") / fp[:24]
    sha = save_head(path, trained, extra={"fingerprint": fp, "features": feats.fingerprint,
                                          "split": split.fingerprint, "train": dataclasses.asdict(train),
                                          "selection": dataclasses.asdict(selection)})
    label = grid_point_label(chosen)
    if len(trained.grid) > 1:
        logger.info("head selection: %s chosen of %d candidates (val Brier %.4f, val accuracy %.4f, epoch %d)",
                    label, len(trained.grid), chosen["val_brier"], chosen["val_accuracy"], trained.best_epoch)
    return HeadRef(path=str(path), fingerprint=fp, weights_sha256=sha, in_dim=trained.in_dim,
                   best_epoch=trained.best_epoch, epochs_run=len(trained.history), kind=trained.kind,
                   chosen=label, n_candidates=len(trained.grid), criterion=trained.criterion)


def grid_point_label(row: dict[str, Any]) -> str:
    """`mlp lr=0.001 wd=0.05 view=all` or `linear C=0.1 view=all` for a row of the head grid (with what the
    refit on train + val used, when there was one)."""
    knobs = f"C={row['c']:g}" if row.get("c") is not None else f"lr={row['lr']:g} wd={row['weight_decay']:g}"
    again = ""
    if row.get("refit_images"):
        again = f", refitted on train+val ({row['refit_images']} images" + (
            f", C={row['refit_c']:g})" if row.get("refit_c") is not None else ")")
    return f"{row['kind']} {knobs} view={row['view']}{again}"


BASELINE_CACHE = OutputCache(
    "score_baselines",
    lambda p: (p["split"].fingerprint, p["feats"].fingerprint, p["config"], p["evaluation"].fingerprint),
    paths=lambda result, p: [] if result is None else [baselines_path(p["split"], p["feats"], p["config"],
                                                                      p["evaluation"])],
)


def baselines_path(split: SplitRef, feats: FeatureSetInfo, config: BaselineConfig, evaluation: EvalRef) -> Path:
    key = fingerprint(split.fingerprint, feats.fingerprint, config, evaluation.fingerprint)
    return home_path("evaluations", "baselines") / f"{key[:24]}.json"


@task(name="score_baselines", cache_key_fn=BASELINE_CACHE, persist_result=True)
@BASELINE_CACHE.records_outputs
def score_baselines(split: SplitRef, feats: FeatureSetInfo, config: BaselineConfig,
                    evaluation: EvalRef) -> dict[str, Any] | None:
    """Logistic regression and cosine kNN on the same features and split, scored on test next to the
    head; says loudly when the head loses to the best of them by more than the margin."""
    if not config.enabled:
        return None
    logger = run_logger(__name__)
    arrays = split_arrays(split, feats, ("train", "test"))
    (_, xt, yt), (_, xs, ys) = arrays["train"], arrays["test"]
    scores = {name: _json_safe(m) for name, m in fit_and_score_baselines(xt, yt, xs, ys, config).items()}
    comparison = compare_with_baselines(evaluation.metrics, scores, margin=config.margin)
    result = {"baselines": scores, "comparison": comparison, "head": {
        k: evaluation.metrics.get(k) for k in ("accuracy_at_0.5", "mcc_at_0.5", "auroc", "brier")}}
    atomic_write_json(baselines_path(split, feats, config, evaluation), result)
    for name, m in scores.items():
        logger.info("baseline %s (%s): test accuracy %.4f, MCC %.4f, AUROC %.4f at p >= 0.5", name, m["chosen"],
                    m["accuracy_at_0.5"], m["mcc_at_0.5"], m["auroc"])
    if comparison["loses"]:
        logger.warning("HEAD LOSES TO A BASELINE: %s. This version is tagged quality=loses_to_baseline and "
                       "retrain will not promote it; try other head settings or more data.", comparison["verdict"])
    else:
        logger.info("%s", comparison["verdict"])
    return result


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
@POLICY_CACHE.records_outputs
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
    paths=lambda ref, p: [ref.path],
)


@task(name="evaluate_test", cache_key_fn=EVAL_CACHE, persist_result=True)
@EVAL_CACHE.records_outputs
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
    return EvalRef(path=str(eval_dir), fingerprint=fp, metrics=metrics)


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        v = v.item() if hasattr(v, "item") else v
        out[k] = None if isinstance(v, float) and not np.isfinite(v) else v
    return out


EXPORT_CACHE = OutputCache(
    "export_bundle",
    lambda p: (p["name"], p["split"].fingerprint, p["feats"].fingerprint, p["head"].fingerprint,
               p["policy_files"], p["evaluation"].fingerprint, p["backbone"].fingerprint,
               p.get("baselines"), p.get("backbone_mode", "frozen"), p.get("adapter_dir") is not None,
               p.get("merge_adapters", False), _signing_key_id()),
    paths=lambda info, p: [info.path],
)


def _signing_key_id() -> str | None:
    """Part of the export's cache key: configuring (or changing) the team's signing key re-exports, so
    that the bundle carries the signature."""
    from stage1core.signing import key_id, load_private_key

    path = bundle_signing_key()
    return key_id(load_private_key(path).public_key()) if path is not None else None


@task(name="export_bundle", cache_key_fn=EXPORT_CACHE, persist_result=True)
@EXPORT_CACHE.records_outputs
def export_bundle(*, name: str, split: SplitRef, feats: FeatureSetInfo, head: HeadRef,
                  policy_files: dict[str, dict[str, Any]], evaluation: EvalRef, backbone: BackboneSpec,
                  baselines: dict[str, Any] | None = None, backbone_mode: str = "frozen",
                  adapter_dir: str | None = None, merge_adapters: bool = False) -> BundleInfo:
    """Write the bundle under $STAGE1_HOME/bundles. With `adapter_dir` (a fine-tuning run), the
    adapters go in beside the head, or folded into backbone.safetensors when `merge_adapters`. The
    baselines' scores go in as baselines.json and into the model card. `backbone`: the run's resolved
    spec (the features' store names the same one)."""
    store_meta = FeatureStore(feats.store_dir).meta
    spec = BackboneSpec.from_json(store_meta["backbone"])
    preprocessing = {**store_meta["preprocessing"], "precision": store_meta["precision"]}
    eval_dir = Path(evaluation.path)
    card = write_model_card(
        name=name, spec=spec, backbone_mode=backbone_mode, counts=split.counts, metrics=evaluation.metrics,
        policy_files=policy_files, baselines=baselines,
        data={"data_fingerprint": split.data_fingerprint, "split_fingerprint": split.fingerprint,
              "n_samples": split.n_samples, "duplicates": split.duplicates, "quarantined": split.quarantined,
              "n_groups": split.n_groups, "largest_group": split.largest_group},
        head={"kind": head.kind, "in_dim": head.in_dim, "best_epoch": head.best_epoch, "epochs_run": head.epochs_run,
              "chosen": head.chosen, "n_candidates": head.n_candidates, "criterion": head.criterion})
    info = write_bundle(
        home_path("bundles"), name=name, backbone=spec, preprocessing=preprocessing, head_dir=head.path,
        policy_files=policy_files, metrics=evaluation.metrics, model_card=card,
        inputs={"data_fingerprint": split.data_fingerprint, "split_fingerprint": split.fingerprint,
                "features_fingerprint": feats.fingerprint, "head_fingerprint": head.fingerprint,
                "split_manifest_sha256": sha256_file(split.path)},
        json_files={"baselines.json": baselines} if baselines else None,
        signing_key=bundle_signing_key(),
        files={"plots/fnr_fpr.png": eval_dir / "fnr_fpr.png",
               "plots/reliability.png": eval_dir / "reliability.png",
               "plots/risk_coverage.png": eval_dir / "risk_coverage.png",
               "test_predictions.json": eval_dir / "test_predictions.json",
               **(export_adapter_files(adapter_dir, merge=merge_adapters, backbone=backbone) if adapter_dir else {})},
    )
    get_run_logger().info("bundle %s", info.path)
    return info
