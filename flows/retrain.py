"""The `retrain` flow: train a challenger on the team's sources plus what landed (only new images are
embedded: the feature store is keyed by image content), then judge it against the champion on the
same test split under the same FNR constraint, and promote it only when it wins by the margin.

Everything a team sets once (sources, backbone, splits, guarantee, promotion rule) comes from the
team settings, read at every run (stage1core.settings); the run form holds only what changes per run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.train_pipeline import RegistryConfig, train_pipeline
from stage1core.sources import SourceConfig
from tasks.pipeline import ensure_demo_data
from tasks.registry import compare_with_champion, record_comparison, set_champion
from tasks.settings import (
    choose_sources,
    comparison_config,
    launch_config,
    load_team_settings,
    record_settings,
    remember_landed_sources,
)


@flow(name="retrain", log_prints=True)
def retrain(
    landed: list[SourceConfig] | None = None,
    auto_promote: bool | None = None,
    settings_file: str = "",
    trigger: str = "",
) -> dict[str, Any]:
    """Retrain on the team's sources plus what landed, compare with the champion, promote if better.

    Args:
        landed: Sources that just landed (`stage1 ingest` puts them in its event). The run trains on the
            configured sources, every source that landed before, and these; after a successful run they
            are remembered, so the nightly run keeps reading them.
        auto_promote: Move `champion` when the challenger wins. Empty: the team settings decide
            (promotion.auto_promote).
        settings_file: Team settings file. Empty: $STAGE1_SETTINGS, else $STAGE1_HOME/settings.toml,
            else the built-in demo settings.
        trigger: What started the run (schedule, event id); recorded in the comparison report.
    """
    logger = get_run_logger()
    settings = load_team_settings(settings_file)
    comparison = comparison_config(settings, auto_promote=auto_promote)  # fails before any work if invalid
    launch = launch_config(settings)
    configured = list(settings.sources) or [ensure_demo_data()]
    sources = choose_sources(configured, landed)
    registry = RegistryConfig(experiment=settings.experiment, model_name=settings.model_name,
                              bundle_name=settings.model_name)
    guarantee = settings.guarantee
    result = train_pipeline(
        sources=sources, splits=settings.splits, backbone=settings.backbone, features=settings.features,
        head=settings.head, train=settings.train, selection=settings.selection, baselines=settings.baselines,
        guarantee=guarantee, policy=settings.policy, registry=registry,
        max_quarantined_fraction=settings.max_quarantined_fraction, backbone_mode=settings.backbone_mode,
        finetune=settings.finetune, launch=launch, merge_adapters=settings.merge_adapters,
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
    record_settings(settings, mlflow_run_id=result["mlflow_run_id"], model_name=registry.model_name,
                    version=challenger)
    if landed:
        remember_landed_sources(landed)
    logger.info("retrain: challenger v%s %s: %s", challenger,
                "promoted to champion" if promoted else "not promoted", report["reason"])
    return {"report": report, "train": result, "promoted": report["promoted"], "challenger_version": challenger,
            "sources": [s.name for s in sources], "settings": settings.origin}
