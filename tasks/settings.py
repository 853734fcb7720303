"""The team settings in flows: load them (and say which file was used), build the configs of the
tasks that own the settings' open sections, choose the sources a retrain reads, and record the
settings on the MLflow run and model version they produced."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from stage1core.settings import (
    BUILT_IN,
    SettingsError,
    TeamSettings,
    combine_sources,
    landed_sources,
    load_settings,
    remember_landed,
)
from stage1core.sources import SourceConfig
from tasks.finetune import LaunchConfig
from tasks.registry import ComparisonConfig, MetricFloor


@task(name="load_team_settings")
def load_team_settings(settings_file: str = "") -> TeamSettings:
    """The settings in force for this run (read at run time: a change applies to the next run), shown
    as the Prefect artifact `team-settings` with their origin and fingerprint."""
    settings = load_settings(settings_file or None)
    logger = get_run_logger()
    if settings.origin == BUILT_IN:
        logger.warning("no team settings file ($STAGE1_SETTINGS or $STAGE1_HOME/settings.toml): using the "
                       "built-in demo settings (demo data, EfficientNet-Lite0); write yours with "
                       "`stage1 settings init`")
    else:
        logger.info("team settings from %s (fingerprint %s)", settings.origin, settings.fingerprint[:12])
    create_markdown_artifact(
        key="team-settings",
        markdown=(f"# Team settings\n\nFrom `{settings.origin}`, fingerprint `{settings.fingerprint[:16]}`.\n\n"
                  f"```json\n{json.dumps(settings.to_json(), indent=2)}\n```\n"),
        description=f"settings from {settings.origin}")
    return settings


def promotion_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(ComparisonConfig)]


def default_tables(*, strict_floor: bool) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, str]]]:
    """Values and descriptions of the open tables `stage1 settings init` writes: [promotion] (the
    registry's comparison rule; `strict_floor`: the product floor MCC >= 0.5, AUROC >= 0.8) and [launch]."""
    from stage1core.config import as_dict

    promotion = as_dict(ComparisonConfig())
    if strict_floor:
        promotion["floor"] = {**promotion["floor"], "min_mcc": 0.5, "min_auroc": 0.8}
    notes = {
        "promotion": {f.name: f.metadata.get("description", "") for f in dataclasses.fields(ComparisonConfig)},
        "launch": {f.name: f.metadata.get("description", "") for f in dataclasses.fields(LaunchConfig)},
    }
    floor_fields = ", ".join(f"{f.name} ({f.metadata.get('description', '')})" for f in dataclasses.fields(MetricFloor))
    notes["promotion"]["floor"] += f"; keys: {floor_fields}"
    return {"promotion": promotion, "launch": as_dict(LaunchConfig())}, notes


def comparison_config(settings: TeamSettings, *, auto_promote: bool | None = None) -> ComparisonConfig:
    """The champion/challenger rule from the settings' [promotion] table (its keys are the registry
    config's fields); `auto_promote` overrides the table's value when not None."""
    values = dict(settings.promotion)
    if auto_promote is not None:
        values["auto_promote"] = auto_promote
    unknown = sorted(set(values) - set(promotion_keys()))
    if unknown:
        raise SettingsError(f"{settings.origin}, [promotion]: unknown key(s) {unknown}; the promotion settings "
                            f"are {promotion_keys()}")
    try:
        return ComparisonConfig(**values)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{settings.origin}, [promotion]: {exc}") from exc


def metric_floor(settings: TeamSettings) -> MetricFloor:
    """The metric floor every champion must meet: the settings' promotion.floor (one definition for the
    retrain rule, the promote flow and `stage1 promote`)."""
    return comparison_config(settings).floor


def launch_config(settings: TeamSettings) -> LaunchConfig:
    """How fine-tuning processes start, from the settings' [launch] table."""
    names = [f.name for f in dataclasses.fields(LaunchConfig)]
    unknown = sorted(set(settings.launch) - set(names))
    if unknown:
        raise SettingsError(f"{settings.origin}, [launch]: unknown key(s) {unknown}; the launch settings are {names}")
    try:
        return LaunchConfig(**settings.launch)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{settings.origin}, [launch]: {exc}") from exc


@task(name="choose_sources")
def choose_sources(configured: list[SourceConfig], landed: list[SourceConfig] | None) -> list[SourceConfig]:
    """What a retrain reads: the configured sources, every source that landed before (remembered by the
    runs that trained on it, so the nightly run keeps them), and what landed now; each path once."""
    before = landed_sources()
    sources = combine_sources(configured, before, landed or [])
    get_run_logger().info("training on %d source(s): %s", len(sources),
                          ", ".join(f"{s.name} ({s.path}, {s.role})" for s in sources))
    return sources


@task(name="remember_landed_sources")
def remember_landed_sources(landed: list[SourceConfig]) -> str:
    """After a successful run: remember what landed, so later runs (the nightly one) read it too."""
    return str(remember_landed(landed))


@task(name="record_settings")
def record_settings(settings: TeamSettings, *, mlflow_run_id: str, model_name: str = "",
                    version: str = "") -> None:
    """Tag the MLflow run (and the registered version) with the settings' origin and fingerprint and
    log the settings as `settings/team_settings.json`: which team settings made this model."""
    from tasks.tracking import client

    mc = client()
    tags = {"settings.origin": settings.origin, "settings.fingerprint": settings.fingerprint}
    for key, value in tags.items():
        mc.set_tag(mlflow_run_id, key, value)
        if version:
            mc.set_model_version_tag(model_name, version, key, value)
    mc.log_dict(mlflow_run_id, settings.to_json(), "settings/team_settings.json")


def source_dicts(sources: list[SourceConfig] | tuple[SourceConfig, ...]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(s) for s in sources]
