"""The `retrain` flow: train a challenger on the sources as they are now (only new images are
embedded: the feature store is keyed by image content), then judge it against the champion on the
same test split under the same FNR constraint, and promote it only when the rule of
stage1core.comparison says it is better beyond noise. With no new images and no new settings it
trains, registers and logs nothing (a no-op, reported as such)."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.train_pipeline import RegistryConfig, train_pipeline
from stage1core.backbone import BackboneConfig
from stage1core.baselines import BaselineConfig
from stage1core.comparison import ComparisonConfig
from stage1core.features import FeatureConfig
from stage1core.finetune import FinetuneConfig
from stage1core.guarantees import GuaranteeConfig
from stage1core.heads import HeadConfig
from stage1core.policy import PolicyConfig
from stage1core.sources import SourceConfig
from stage1core.splits import SplitConfig
from stage1core.train import SelectionConfig, TrainConfig
from tasks.finetune import LaunchConfig
from tasks.pipeline import build_splits, ensure_demo_data
from tasks.registry import (
    compare_with_champion,
    find_retrained,
    mark_retrained,
    record_comparison,
    report_no_op,
    retrain_inputs,
    set_champion,
)


@flow(name="retrain", log_prints=True)
def retrain(
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
    comparison: ComparisonConfig = ComparisonConfig(),
    max_quarantined_fraction: float = 0.01,
    backbone_mode: Literal["frozen", "lora", "dora"] = "frozen",
    finetune: FinetuneConfig = FinetuneConfig(),
    launch: LaunchConfig = LaunchConfig(),
    merge_adapters: bool = False,
    trigger: str = "",
) -> dict[str, Any]:
    """Retrain on the current sources, compare with the champion, promote if `comparison` says the
    challenger is better beyond noise (stage1core.comparison.ComparisonConfig: its defaults are the rule).

    Keep `splits` (salt and ratios) fixed across runs: that is what keeps the champion's test images
    in the challenger's test split. `trigger` records what started the run (schedule, event id).
    When the data, the settings and the code are those of an earlier retrain, nothing is trained or
    logged: the challenger would be the same bundle (it is judged again, without training, only if
    the champion or the rule changed since).
    """
    logger = get_run_logger()
    if not registry.register:
        raise ValueError("retrain registers the challenger to compare it: registry.register must be true")
    if not sources:
        sources = [ensure_demo_data()]
    training = dict(
        sources=sources, splits=splits, backbone=backbone, features=features, head=head, train=train,
        selection=selection, baselines=baselines, guarantee=guarantee, policy=policy, registry=registry,
        max_quarantined_fraction=max_quarantined_fraction,
        backbone_mode=backbone_mode, finetune=finetune, launch=launch, merge_adapters=merge_adapters,
    )
    trigger = trigger or "manual"
    # a retrain with the same split, settings and code as an earlier one would train the same bundle
    split = build_splits(sources, splits, max_quarantined_fraction=max_quarantined_fraction)
    inputs = retrain_inputs(split.fingerprint, training)
    found = find_retrained(experiment=registry.experiment, model_name=registry.model_name, inputs=inputs,
                           config=comparison)
    if found is not None and found["no_op"]:
        report = report_no_op(found, model_name=registry.model_name, trigger=trigger)
        return {"report": report, "train": None, "promoted": False, "no_op": True,
                "challenger_version": found["version"], "flow_run_id": str(flow_run.id)}
    if found is None:
        result = train_pipeline(**training)
        mark_retrained(result["mlflow_run_id"], inputs)
        challenger, mlflow_run_id = result["registered"]["version"], result["mlflow_run_id"]
        n_embedded = result["features"]["n_computed"]
    else:  # trained before, but the champion or the rule changed since it was judged
        logger.info("retrain: %s", found["why"])
        result, challenger, mlflow_run_id, n_embedded = None, found["version"], "", 0
    report = compare_with_champion(
        model_name=registry.model_name, challenger_version=challenger, split_manifest=split.path,
        guarantee=guarantee, config=comparison,
    )
    # images embedded by the feature task (0 new ones cost nothing; a cached task reports its first run)
    report["n_embedded"] = n_embedded
    report["trigger"] = trigger
    report["reused_run_id"] = found["run_id"] if found else None
    promoted = None
    if report["decision"] == "promote" and comparison.auto_promote:
        promoted = set_champion(model_name=registry.model_name, version=challenger, requested_by="retrain",
                                reason=report["reason"], flow_run_id=str(flow_run.id), challenger=challenger,
                                figures=report["figures"])
    elif report["decision"] == "promote":
        report["reason"] = "wins, but auto-promotion is off (promote it by hand): " + report["reason"]
    report["promoted"] = promoted is not None
    record_comparison(report, mlflow_run_id=mlflow_run_id, flow_run_id=str(flow_run.id))
    logger.info("retrain: challenger v%s %s: %s", challenger,
                "promoted to champion" if promoted else "not promoted", report["reason"])
    return {"report": report, "train": result, "promoted": report["promoted"], "no_op": False,
            "challenger_version": challenger, "flow_run_id": str(flow_run.id)}
