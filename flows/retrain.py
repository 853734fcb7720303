"""The `retrain` flow: train a challenger on the team's sources plus what landed (only new images are
embedded: the feature store is keyed by image content), then judge it against the champion on the
same test split under the same FNR constraint, and promote it only when the rule of
stage1core.comparison says it is better beyond noise. With no new images and no new settings it
trains, registers and logs nothing (a no-op, reported as such).

Everything a team sets once (sources, backbone, splits, guarantee, promotion rule) comes from the
team settings, read at every run (stage1core.settings); the run form holds only what changes per run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.train_pipeline import parameters_from_settings, train_pipeline
from stage1core.settings import TeamSettings, comparison_config
from stage1core.sources import SourceConfig
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
from tasks.settings import (
    choose_sources,
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
    """Retrain on the team's sources plus what landed, compare with the champion, promote if the
    challenger is better beyond noise (the settings' [promotion] table over the defaults of
    stage1core.comparison.ComparisonConfig). When the data, the settings and the code are those of an
    earlier retrain, nothing is trained or logged: the challenger would be the same bundle (it is
    judged again, without training, only if the champion or the rule changed since).

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
    configured = list(settings.sources) or [ensure_demo_data()]
    sources = choose_sources(configured, landed)
    # every train_pipeline parameter, from the settings (a new parameter is added there, not here)
    training = parameters_from_settings(settings, sources)
    registry = training["registry"]
    trigger = trigger or "manual"
    # a retrain with the same split, settings and code as an earlier one would train the same bundle
    split = build_splits(sources, settings.splits, max_quarantined_fraction=settings.max_quarantined_fraction)
    inputs = retrain_inputs(split.fingerprint, training)
    found = find_retrained(experiment=registry.experiment, model_name=registry.model_name, inputs=inputs,
                           config=comparison)
    if found is not None and found["no_op"]:
        report = report_no_op(found, model_name=registry.model_name, trigger=trigger)
        if landed:  # the nightly run must keep reading them too, or its inputs would change
            remember_landed_sources(landed)
        return _outcome(report, train=None, no_op=True, challenger=found["version"], sources=sources,
                        settings=settings)
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
        guarantee=settings.guarantee, config=comparison,
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
    if mlflow_run_id:  # a version judged again keeps the settings tags of the run that trained it
        record_settings(settings, mlflow_run_id=mlflow_run_id, model_name=registry.model_name, version=challenger)
    if landed:
        remember_landed_sources(landed)
    logger.info("retrain: challenger v%s %s: %s", challenger,
                "promoted to champion" if promoted else "not promoted", report["reason"])
    return _outcome(report, train=result, no_op=False, challenger=challenger, sources=sources, settings=settings)



def _outcome(report: dict[str, Any], *, train: dict[str, Any] | None, no_op: bool, challenger: str,
             sources: list[SourceConfig], settings: TeamSettings) -> dict[str, Any]:
    """What retrain returns, a no-op or not."""
    return {"report": report, "train": train, "promoted": report["promoted"], "no_op": no_op,
            "challenger_version": challenger, "flow_run_id": str(flow_run.id),
            "sources": [s.name for s in sources], "settings": settings.origin}
