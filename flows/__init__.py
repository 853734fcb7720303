"""Prefect flows: train_pipeline (and, built on it, retrain, promote, evaluate_bundle)."""

# a flow module imports prefect first: importing `tasks` here sets the environment before (see tasks/__init__)
import tasks  # noqa: F401
