"""Prefect task wrappers around stage1core, plus MLflow tracking helpers.

Importing this package defaults the environment to `$STAGE1_HOME` (Prefect home and results, MLflow
tracking URI, offline Hugging Face) before prefect or timm are imported.
"""

from stage1core.home import configure_environment

configure_environment()
