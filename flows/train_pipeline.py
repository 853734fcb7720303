"""The `train-pipeline` flow: sources -> splits -> cached features -> head -> guaranteed threshold ->
test metrics -> bundle -> MLflow run and registered model version."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, replace
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from stage1core.backbone import BackboneConfig
from stage1core.baselines import BaselineConfig
from stage1core.bundle import BundleInfo
from stage1core.config import describe_fields
from stage1core.features import FeatureConfig, FeatureSetInfo
from stage1core.finetune import FinetuneConfig
from stage1core.guarantees import GuaranteeConfig
from stage1core.heads import HeadConfig
from stage1core.modes import check_backbone_mode
from stage1core.policy import PolicyConfig
from stage1core.selection import SelectionConfig
from stage1core.settings import TeamSettings
from stage1core.sources import SourceConfig
from stage1core.splits import SplitConfig
from stage1core.train import TrainConfig
from tasks.finetune import LaunchConfig, extract_adapted_features_task, fit_backbone, head_ref_of
from tasks.pipeline import (
    EvalRef,
    HeadRef,
    SplitRef,
    build_splits,
    calibrate,
    check_quarantine,
    counted_now,
    ensure_demo_data,
    evaluate_test,
    export_bundle,
    extract_features,
    fit_head,
    resolve_backbone,
    score_baselines,
)
from tasks.reports import publish_reports
from tasks.runs import end_crashed_run
from tasks.scale_out import ScaleOutConfig
from tasks.settings import launch_config, scale_out_config
from tasks.tracking import (
    MODEL_NAME,
    close_run,
    end_mlflow_run,
    log_baselines_and_selection,
    log_params,
    log_quarantine,
    log_results,
    log_training_history,
    register_bundle,
    start_mlflow_run,
)


@describe_fields
@dataclass(frozen=True)
class RegistryConfig:
    # MLflow experiment of the run
    experiment: str = "stage1"
    # registered model name
    model_name: str = MODEL_NAME
    # alias set on the new version; promotion to `champion` is a separate decision
    alias: str = "challenger"
    # register the bundle as a model version (off for baselines and experiments)
    register: bool = True
    # bundle directory prefix under $STAGE1_HOME/bundles
    bundle_name: str = "stage1-roadwork"


# Long on purpose: half of it is the signature and the Args the Prefect form shows, the rest the pipeline's
# steps in order, read top to bottom.
# a crashed run ends its MLflow run; one stopped by Ctrl-C or SIGTERM is recorded as Cancelled (tasks/runs.py)
@flow(name="train-pipeline", log_prints=True, on_crashed=[end_crashed_run])
def train_pipeline(
    sources: list[SourceConfig] | None = None,
    splits: SplitConfig = SplitConfig(),
    backbone: BackboneConfig = BackboneConfig(),
    features: FeatureConfig = FeatureConfig(),
    head: HeadConfig = HeadConfig(),
    train: TrainConfig = TrainConfig(),
    selection: SelectionConfig = SelectionConfig(),
    baselines: BaselineConfig = BaselineConfig(),
    guarantee: GuaranteeConfig = GuaranteeConfig(),
    policy: PolicyConfig = PolicyConfig(),
    registry: RegistryConfig = RegistryConfig(),
    max_quarantined_fraction: float = 0.01,
    backbone_mode: Literal["frozen", "lora", "dora"] = "frozen",
    finetune: FinetuneConfig = FinetuneConfig(),
    launch: LaunchConfig = LaunchConfig(),
    merge_adapters: bool = False,
    scale_out: ScaleOutConfig = ScaleOutConfig(),
) -> dict[str, Any]:
    """Train, calibrate, evaluate, export and register a roadwork classifier.

    With no sources, runs on the embedded demo dataset (generated under $STAGE1_HOME if absent).
    backbone_mode `frozen` trains a grid of heads on cached features and keeps the best on val
    (`selection`); `lora`/`dora` fine-tunes adapters on the backbone's last blocks together with one
    head, on images, in a child process (`launch`: one device, or `accelerate launch` on several
    GPUs/nodes). Calibration, evaluation, baselines, export and registration are the same tasks
    either way.

    Args:
        sources: Labelled image sources (class folders, CSV/JSON label files, parquet shards). Empty: the
            procedural demo data.
        splits: Hash-split ratios and salt; keep them fixed across runs so old images keep their split.
        backbone: timm backbone, its weights and pooling.
        features: Feature extraction: batch size, decode workers, precision, device.
        head: Head kind and shape.
        train: Head training loop.
        selection: Grid of heads trained on cached features; the best on val is kept.
        baselines: Logistic-regression and kNN baselines scored beside the head.
        guarantee: FNR guarantee of the decision threshold: P(FNR <= alpha) >= 1 - delta.
        policy: Decision rule of the bundle and its calibrator.
        registry: MLflow experiment, registered model and alias.
        max_quarantined_fraction: Stop when more than this share of images cannot be read.
        backbone_mode: frozen trains heads on cached features (features, train, selection); lora or dora
            fine-tunes adapters on images (finetune, launch, merge_adapters). The one switch:
            finetune.adapter.method must name the same method, and with lora/dora train and selection
            keep their defaults (features too, unless the baselines are on); a run that breaks this
            fails before any work.
        finetune: Fine-tuning settings (lora/dora only).
        launch: How fine-tuning processes start (lora/dora only).
        merge_adapters: lora/dora: merge the adapters into the backbone weights in the bundle.
        scale_out: Where frozen-backbone features are computed: this process (local), or chunks on a Dask
            cluster (a temporary one, or an existing one by address); the features are the same.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    needs_gate = policy.needs_gate()
    _check_parameters(head=head, policy=policy, backbone_mode=backbone_mode, finetune=finetune, features=features,
                      train=train, selection=selection, baselines=baselines, merge_adapters=merge_adapters,
                      launch=launch)
    scale_out.check_batch_size(features.batch_size)
    if not sources:
        sources = [ensure_demo_data()]
    run = start_mlflow_run(
        registry.experiment, f"train-pipeline/{flow_run.name or 'local'}",
        {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_name": "train-pipeline",
         "backbone": backbone.name},
    )
    try:
        spec = resolve_backbone(backbone)  # the weights are hashed here, once; every task takes the spec
        split = build_splits(sources, splits, max_quarantined_fraction=max_quarantined_fraction)
        adapter_dir = None
        if backbone_mode == "frozen":
            feats = counted_now(extract_features(split, spec, features, scale_out, return_state=True))
            quarantine = check_quarantine(split, feats)
            head_ref = fit_head(split, feats, head, train, selection, needs_gate)
        else:
            # fine-tuning trains one head with the backbone: `auto` is the kind the policy needs
            if head.kind == "auto":
                head = replace(head, kind=head.kinds(selection=False, needs_gate=needs_gate)[0])
            tuned = fit_backbone(split, spec, head, finetune, launch)
            feats = extract_adapted_features_task(split, tuned, finetune.precision, spec)
            quarantine = check_quarantine(split, feats)
            head_ref = head_ref_of(tuned)
            adapter_dir = tuned.path
        policy_files = calibrate(split, feats, head_ref, guarantee, policy)
        thresholds = policy_files["thresholds.json"]
        evaluation = evaluate_test(split, feats, head_ref, policy_files)
        # baselines are probes of the frozen backbone: with lora/dora they answer "was fine-tuning worth it?"
        frozen = feats if backbone_mode == "frozen" else (
            extract_features(split, spec, features, scale_out) if baselines.enabled else None)
        judged = score_baselines(split, frozen, baselines, evaluation) if baselines.enabled else None
        bundle = export_bundle(name=registry.bundle_name, split=split, feats=feats, head=head_ref,
                               policy_files=policy_files, evaluation=evaluation, backbone=spec,
                               baselines=judged, backbone_mode=backbone_mode, adapter_dir=adapter_dir,
                               merge_adapters=merge_adapters)
        log_params(run["run_id"], _run_params(
            sources, splits=splits, backbone=backbone, features=features, head=head, train=train,
            selection=selection, baselines=baselines, guarantee=guarantee, policy=policy,
            backbone_mode=backbone_mode, finetune=finetune, launch=launch, scale_out=scale_out))
        client_tags = {"data_fingerprint": split.data_fingerprint, "split_fingerprint": split.fingerprint,
                       "split_salt": splits.salt, "bundle_fingerprint": bundle.fingerprint,
                       "features_fingerprint": feats.fingerprint, "policy": policy.policy}
        _set_run_tags(run["run_id"], client_tags)
        log_training_history(run["run_id"], head_ref.path)
        log_quarantine(run["run_id"], quarantine)
        log_results(run["run_id"], evaluation.metrics, bundle)
        quality_tags = log_baselines_and_selection(run["run_id"], head_ref, judged)
        registered = None
        if registry.register:
            registered = register_bundle(
                run["run_id"], bundle, model_name=registry.model_name, alias=registry.alias,
                tags={**client_tags, **quality_tags, "prefect_flow_run_id": str(flow_run.id),
                      "mlflow_run_id": run["run_id"],
                      **{f"test_{k}": f"{evaluation.metrics[k]:.4f}" for k in ("mcc", "accuracy", "auroc", "fnr")
                         if isinstance(evaluation.metrics.get(k), float)}},
                description=_read_card(bundle.path),
            )
        publish_reports(metrics=evaluation.metrics, thresholds=thresholds, bundle_path=bundle.path,
                        mlflow_run=run, registered=registered, counts=split.counts, head=head_ref,
                        baselines=judged, quarantine=quarantine)
    except BaseException as exc:
        # not a task: it must run while the flow is torn down (Ctrl-C, SIGTERM), with a short deadline
        close_run(run["run_id"], exc)
        raise
    end_mlflow_run(run["run_id"])
    seconds = time.perf_counter() - started
    logger.info("train-pipeline finished in %.1fs: test MCC %s, bundle %s", seconds,
                evaluation.metrics.get("mcc"), bundle.path)
    return _pipeline_result(evaluation, bundle=bundle, head=head_ref, feats=feats, split=split, run=run,
                            thresholds=thresholds, baselines=judged, registered=registered, quarantine=quarantine,
                            seconds=seconds)


def _run_params(sources: list[SourceConfig], *, backbone_mode: str, finetune: FinetuneConfig, launch: LaunchConfig,
                **configs: Any) -> dict[str, Any]:
    """The MLflow run's params: every stage's config (fine-tuning's only when it ran) and the sources."""
    params = {name: dataclasses.asdict(cfg) for name, cfg in configs.items()}
    params["backbone_mode"] = backbone_mode
    if backbone_mode != "frozen":
        params["finetune"] = finetune.to_json()
        params["launch"] = dataclasses.asdict(launch)
    params["sources"] = [dataclasses.asdict(s) for s in sources]
    return params


def _pipeline_result(evaluation: EvalRef, *, bundle: BundleInfo, head: HeadRef, feats: FeatureSetInfo,
                     split: SplitRef, run: dict[str, Any], thresholds: dict[str, Any],
                     baselines: dict[str, Any] | None, registered: dict[str, Any] | None,
                     quarantine: dict[str, Any], seconds: float) -> dict[str, Any]:
    """What train_pipeline returns (the CLI prints it; retrain and the tests read it)."""
    return {
        "metrics": evaluation.metrics, "thresholds": thresholds, "bundle_path": bundle.path,
        "head": {"kind": head.kind, "chosen": head.chosen, "n_candidates": head.n_candidates,
                 "best_epoch": head.best_epoch},
        "baselines": baselines,
        "bundle_fingerprint": bundle.fingerprint, "mlflow_run_id": run["run_id"], "mlflow_run_url": run["url"],
        "experiment_id": run["experiment_id"], "registered": registered, "split_counts": split.counts,
        "split_manifest": split.path,
        "features": {"n_samples": feats.n_samples, "n_computed": feats.n_computed, "failed": len(feats.failed),
                     "images_per_second": feats.images_per_second, "dim": feats.dim,
                     "store_dir": str(feats.store_dir)},
        "quarantine": quarantine,
        "seconds": seconds, "flow_run_id": str(flow_run.id),
    }


def parameters_from_settings(settings: TeamSettings, sources: list[SourceConfig] | None = None) -> dict[str, Any]:
    """Every train_pipeline parameter from the team settings (one place: retrain runs with these, and
    the deployment's form opens with them). `sources`: what to train on; None keeps the settings'
    sources (none: the demo data). A test holds the keys to this flow's signature."""
    return dict(
        sources=(list(settings.sources) or None) if sources is None else sources, splits=settings.splits,
        backbone=settings.backbone, features=settings.features, head=settings.head, train=settings.train,
        selection=settings.selection, baselines=settings.baselines, guarantee=settings.guarantee,
        policy=settings.policy,
        registry=RegistryConfig(experiment=settings.experiment, model_name=settings.model_name,
                                bundle_name=settings.model_name),
        max_quarantined_fraction=settings.max_quarantined_fraction, backbone_mode=settings.backbone_mode,
        finetune=settings.finetune, launch=launch_config(settings), merge_adapters=settings.merge_adapters,
        scale_out=scale_out_config(settings),
    )


def _check_parameters(*, head: HeadConfig, policy: PolicyConfig, backbone_mode: str, finetune: FinetuneConfig,
                      features: FeatureConfig, train: TrainConfig, selection: SelectionConfig,
                      baselines: BaselineConfig, merge_adapters: bool, launch: LaunchConfig) -> None:
    """Refuse contradicting parameters before any work; warn about fine-tuning settings a frozen run
    does not use."""
    if policy.needs_gate() and head.kind not in ("auto", "selective"):
        raise ValueError(f"policy {policy.policy!r} (scrc_score {policy.scrc_score!r}) needs the gate of a selective "
                         f"head: set head.kind to 'selective' or 'auto', not {head.kind!r}")
    unused = check_backbone_mode(backbone_mode, finetune=finetune, features=features, train=train,
                                 selection=selection, baselines=baselines, merge_adapters=merge_adapters,
                                 launch=launch)
    if unused:
        get_run_logger().warning("backbone_mode 'frozen' does not fine-tune, so these settings are not used: %s",
                                 "; ".join(unused))


def _set_run_tags(run_id: str, tags: dict[str, str]) -> None:
    from tasks.tracking import client

    mc = client()
    for key, value in tags.items():
        mc.set_tag(run_id, key, value)


def _read_card(bundle_path: str) -> str:
    from pathlib import Path

    return (Path(bundle_path) / "model_card.md").read_text()
