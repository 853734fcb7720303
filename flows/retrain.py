"""The `retrain` flow: train a challenger on the sources as they are now (only new images are
embedded: the feature store is keyed by image content), then judge it against the champion on the
same test split under the same FNR constraint, and promote it only when it wins by the margin."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.train_pipeline import RegistryConfig, train_pipeline
from stage1core.backbone import BackboneConfig
from stage1core.baselines import BaselineConfig
from stage1core.features import FeatureConfig
from stage1core.finetune import FinetuneConfig
from stage1core.guarantees import GuaranteeConfig
from stage1core.heads import HeadConfig
from stage1core.policy import PolicyConfig
from stage1core.sources import SourceConfig
from stage1core.splits import SplitConfig
from stage1core.train import SelectionConfig, TrainConfig
from tasks.finetune import LaunchConfig
from tasks.registry import ComparisonConfig, compare_with_champion, record_comparison, set_champion


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
    """Retrain on the current sources, compare with the champion, promote if better.

    Keep `splits` (salt and ratios) fixed across runs: that is what keeps the champion's test images
    in the challenger's test split. `trigger` records what started the run (schedule, event id).
    """
    logger = get_run_logger()
    if not registry.register:
        raise ValueError("retrain registers the challenger to compare it: registry.register must be true")
    result = train_pipeline(
        sources=sources, splits=splits, backbone=backbone, features=features, head=head, train=train,
        selection=selection, baselines=baselines, guarantee=guarantee, policy=policy, registry=registry,
        max_quarantined_fraction=max_quarantined_fraction,
        backbone_mode=backbone_mode, finetune=finetune, launch=launch, merge_adapters=merge_adapters,
    )
    challenger = result["registered"]["version"]
    report = compare_with_champion(
        model_name=registry.model_name, challenger_version=challenger, split_manifest=result["split_manifest"],
        guarantee=guarantee, config=comparison,
    )
    # images embedded by the feature task (0 new ones cost nothing; a cached task reports its first run)
    report["n_embedded"] = result["features"]["n_computed"]
    report["trigger"] = trigger or "manual"
    promoted = None
    if report["decision"] == "promote" and comparison.auto_promote:
        promoted = set_champion(model_name=registry.model_name, version=challenger, requested_by="retrain",
                                reason=report["reason"], flow_run_id=str(flow_run.id))
    report["promoted"] = promoted is not None
    record_comparison(report, mlflow_run_id=result["mlflow_run_id"])
    logger.info("retrain: challenger v%s %s: %s", challenger,
                "promoted to champion" if promoted else "not promoted", report["reason"])
    return {"report": report, "train": result, "promoted": report["promoted"], "challenger_version": challenger}
