"""The team settings in flows: load them (and say which file was used), build the launch config of
the task that owns the settings' [launch] table ([promotion] is built by stage1core.settings from
stage1core.comparison), choose the sources a retrain reads, and record the settings on the MLflow run
and model version they produced."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from stage1core.comparison import ComparisonConfig
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
from tasks.scale_out import ScaleOutConfig


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


def default_tables() -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, str]]]:
    """Values and descriptions of the open tables `stage1 settings init` writes: [promotion] (every
    field of stage1core.comparison.ComparisonConfig at its default, so a team sees the rule it gets),
    [launch] and [scale_out]."""
    from stage1core.config import as_dict

    notes = {name: {f.name: f.metadata.get("description", "") for f in dataclasses.fields(cls)}
             for name, cls in (("launch", LaunchConfig), ("scale_out", ScaleOutConfig))}
    return {"promotion": as_dict(ComparisonConfig()), "launch": as_dict(LaunchConfig()),
            "scale_out": as_dict(ScaleOutConfig())}, notes


def _table_config(settings: TeamSettings, name: str, cls: type) -> Any:
    values = getattr(settings, name)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise SettingsError(f"{settings.origin}, [{name}]: unknown key(s) {unknown}; the {name} settings are {names}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{settings.origin}, [{name}]: {exc}") from exc


def launch_config(settings: TeamSettings) -> LaunchConfig:
    """How fine-tuning processes start, from the settings' [launch] table."""
    return _table_config(settings, "launch", LaunchConfig)


def scale_out_config(settings: TeamSettings) -> ScaleOutConfig:
    """Where feature extraction runs, from the settings' [scale_out] table."""
    return _table_config(settings, "scale_out", ScaleOutConfig)


@task(name="choose_sources")
def choose_sources(configured: list[SourceConfig], landed: list[SourceConfig] | None) -> list[SourceConfig]:
    """What a retrain (or an evaluation on the team's data) reads: the configured sources, every source
    that landed before (remembered by the runs that trained on it, so the nightly run keeps them), and
    what landed now; each path once."""
    before = landed_sources()
    sources = combine_sources(configured, before, landed or [])
    get_run_logger().info("reading %d source(s): %s", len(sources),
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
