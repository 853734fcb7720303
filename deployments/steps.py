"""The build step of deployments/prefect.yaml and docker/prefect.yaml: the values that depend on the
team settings and on the host, filled into the deployments when `prefect deploy` runs (and by
`stage1 serve`).

- `train_pipeline_parameters`: the train-pipeline form opens with the team's sources, backbone,
  guarantee, splits, ... (retrain, promote and evaluate-bundle read the settings at every run instead).
- `process_env`: the job variables `env` of a process pool on a plain host: this host's STAGE1_HOME,
  MLFLOW_TRACKING_URI and STAGE1_SETTINGS, so its flow runs use the same state, tracking server and
  settings as the shell that deployed them.
"""

from __future__ import annotations

import os
from typing import Any

from stage1core.config import as_dict
from stage1core.home import mlflow_tracking_uri, stage1_home
from stage1core.settings import SETTINGS_ENV, TeamSettings, load_settings


def train_pipeline_parameters(settings: TeamSettings) -> dict[str, Any]:
    """train_pipeline's parameters (JSON) from the team settings, as retrain runs it; no sources means
    the demo data."""
    from flows.train_pipeline import parameters_from_settings

    return {name: as_dict(value) for name, value in parameters_from_settings(settings).items()}


def process_job_variables() -> dict[str, Any]:
    """Job variables of a process pool: this host's state root, tracking URI and settings file (the
    defaults stage1 itself would use when they are unset)."""
    env = {"STAGE1_HOME": str(stage1_home()), "MLFLOW_TRACKING_URI": mlflow_tracking_uri()}
    if os.environ.get(SETTINGS_ENV):
        env[SETTINGS_ENV] = os.environ[SETTINGS_ENV]
    return {"env": env}


def deployment_values(*, settings_file: str = "") -> dict[str, Any]:
    """The build step (`{{ stage1.<key> }}` in prefect.yaml)."""
    settings = load_settings(settings_file or None)
    print(f"stage1: deployment values from the team settings {settings.origin} ({settings.fingerprint[:12]})")
    return {
        "train_pipeline_parameters": train_pipeline_parameters(settings),
        "process_env": process_job_variables()["env"],
        "settings_origin": settings.origin,
        "settings_fingerprint": settings.fingerprint,
    }
