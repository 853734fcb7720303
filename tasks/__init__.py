"""Prefect task wrappers around stage1core, plus MLflow tracking helpers.

Importing this package defaults the environment to `$STAGE1_HOME` (Prefect home and results, MLflow
tracking URI, offline Hugging Face): the one import-time side effect of the project.
"""

from stage1core.home import configure_environment

# At import, not in a function: Prefect reads its settings (PREFECT_HOME, ...) and huggingface_hub reads
# HF_HUB_OFFLINE when they are first imported, and every entry point (the `stage1` CLI, a flow module,
# a script importing a task) imports this package before either. It only sets environment variables
# the user has not set; no file is touched.
configure_environment()
