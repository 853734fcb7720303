"""The `promote` flow: move the `champion` alias to a registered version (by hand, from the UI, or to
roll back), after checking the bundle's integrity and that its metrics meet the floor."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from stage1core.bundle import BundleError
from tasks.registry import (
    CHAMPION,
    MetricFloor,
    fetch_bundle,
    floor_report,
    fmt,
    get_version,
    parse_model_ref,
    requester,
    set_champion,
)
from tasks.settings import load_team_settings, metric_floor


@flow(name="promote", log_prints=True)
def promote(
    version: str,
    reason: str,
    requested_by: str = "",
    model_name: str = "",
    floor: MetricFloor | None = None,
    alias: str = CHAMPION,
    settings_file: str = "",
) -> dict[str, Any]:
    """Point `alias` (default `champion`) at a registered version, after checking its bundle and floor.

    Args:
        version: A version number, an alias (`challenger`) or `models:/<name>/<version>`.
        reason: Why (recorded on the version).
        requested_by: Who asks (recorded); empty: $STAGE1_USER or the login name.
        model_name: Registered model. Empty: the team settings'.
        floor: Metric floor the version must meet. Empty: the team settings' promotion.floor, the one
            `retrain` and `stage1 promote` use.
        alias: Alias to move.
        settings_file: Team settings file. Empty: $STAGE1_SETTINGS, else $STAGE1_HOME/settings.toml, else
            the built-in demo settings.
    """
    if not reason.strip():
        raise ValueError("promote needs a reason (it is recorded on the model version)")
    if not model_name or floor is None:
        settings = load_team_settings(settings_file)
        model_name = model_name or settings.model_name
        floor = floor if floor is not None else metric_floor(settings)
    name, number, source_alias = parse_model_ref(version, model_name)
    mv = get_version(name, version=number, alias=source_alias)
    if mv is None:
        raise ValueError(f"{name}: no version {version!r} in the MLflow registry")
    try:
        bundle = fetch_bundle(name, mv)
    except BundleError as exc:
        raise BundleError(f"refusing to promote {name} v{mv.version}: {exc}") from exc
    metrics, problems = floor_report(bundle, floor)
    if problems:
        raise ValueError(f"refusing to promote {name} v{mv.version}: " + "; ".join(problems))
    who = requester(requested_by)
    moved = set_champion(model_name=name, version=str(mv.version), requested_by=who, reason=reason,
                         flow_run_id=str(flow_run.id), alias=alias)
    create_markdown_artifact(
        key="promotion",
        markdown=(f"# {name} @{alias}: v{moved['previous_version'] or 'none'} → v{mv.version}\n\n"
                  f"By **{who}**: {reason}\n\nBundle `{bundle.name}` verified (sha256 of every file); test MCC "
                  f"{fmt(metrics.get('mcc'))}, AUROC {fmt(metrics.get('auroc'))}, FNR {fmt(metrics.get('fnr'))} "
                  f"meet the floor (MCC ≥ {floor.min_mcc}, AUROC ≥ {floor.min_auroc}).\n"),
        description=f"{alias} moved to v{mv.version}",
    )
    return {**moved, "bundle_path": str(bundle), "metrics": metrics}
