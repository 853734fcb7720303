"""Prefect flows: train_pipeline (and, built on it, retrain, promote, evaluate_bundle)."""

from stage1core.home import configure_environment

configure_environment()
