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
from tasks.tracking import MODEL_NAME


@flow(name="promote", log_prints=True)
def promote(
    version: str,
    reason: str,
    requested_by: str = "",
    model_name: str = MODEL_NAME,
    floor: MetricFloor = MetricFloor(),
    alias: str = CHAMPION,
) -> dict[str, Any]:
    """Point `alias` (default `champion`) at `version`: a number, an alias (`challenger`) or
    `models:/<name>/<version>`. `reason` and `requested_by` are recorded as version tags."""
    if not reason.strip():
        raise ValueError("promote needs a reason (it is recorded on the model version)")
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
