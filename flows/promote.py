"""The `promote` flow: move the `champion` alias to a registered version (by hand, from the UI, or to
roll back), after checking the bundle's integrity and that its metrics meet the floor; every move is
appended to the model's promotion history."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from stage1core.comparison import MetricFloor
from stage1core.settings import metric_floor
from tasks.registry import CHAMPION, check_promotable, requester, resolve_promotion, set_champion
from tasks.settings import load_team_settings


@flow(name="promote", log_prints=True)
def promote(
    version: str,
    reason: str,
    requested_by: str = "",
    model_name: str = "",
    floor: MetricFloor | None = None,
    alias: str = CHAMPION,
    rollback: bool = False,
    settings_file: str = "",
) -> dict[str, Any]:
    """Point `alias` (default `champion`) at a registered version, after checking its bundle and floor.
    Every move is appended to the promotion history; promoting the version that already holds the
    alias changes nothing (and says so).

    Args:
        version: A version number, an alias (`challenger`), `models:/<name>/<version>`, or `previous` to
            roll back (the version the current holder replaced when it was last promoted).
        reason: Why (recorded in the promotion history).
        requested_by: Who asks (recorded); empty: $STAGE1_USER or the login name.
        model_name: Registered model. Empty: the team settings'.
        floor: Metric floor the version must meet. Empty: the team settings' promotion.floor (over
            stage1core.comparison.MetricFloor's defaults), the one `retrain` and `stage1 promote` use.
        alias: Alias to move.
        rollback: Record the move as a rollback (implied by `previous`): retrain then never brings back
            the version it removed.
        settings_file: Team settings file. Empty: $STAGE1_SETTINGS, else $STAGE1_HOME/settings.toml, else
            the built-in demo settings.
    """
    if not reason.strip():
        raise ValueError("promote needs a reason (it is recorded in the promotion history)")
    if not model_name or floor is None:
        settings = load_team_settings(settings_file)
        model_name = model_name or settings.model_name
        floor = floor if floor is not None else metric_floor(settings)
    target = resolve_promotion(version=version, model_name=model_name, alias=alias)
    name, number = target["model_name"], target["version"]
    action = "rollback" if rollback or target["rollback_target_why"] else "promote"
    who = requester(requested_by)
    if target["holder"] == number:  # nothing to check: set_champion says it is a no-op
        moved = set_champion(model_name=name, version=number, requested_by=who, reason=reason,
                             flow_run_id=str(flow_run.id), alias=alias, action=action)
        create_markdown_artifact(key="promotion", markdown=f"# {name} @{alias}: no change\n\n{moved['message']}.\n",
                                 description=f"{alias} already on v{number}")
        return {**moved, "bundle_path": "", "metrics": {}}
    checked = check_promotable(model_name=name, version=number, floor=floor)
    moved = set_champion(model_name=name, version=number, requested_by=who, reason=reason,
                         flow_run_id=str(flow_run.id), alias=alias, action=action, figures=checked["figures"])
    why = f"\n\nRollback target: {target['rollback_target_why']}." if target["rollback_target_why"] else ""
    create_markdown_artifact(
        key="promotion",
        markdown=(f"# {name} @{alias}: v{moved['previous_version'] or 'none'} → v{number} ({action})\n\n"
                  f"By **{who}**: {reason}{why}\n\n{checked['summary']}\n"),
        description=f"{alias} moved to v{number}",
    )
    return {**moved, "bundle_path": checked["bundle_path"], "metrics": checked["metrics"]}
