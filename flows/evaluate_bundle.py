"""The `evaluate-bundle` flow: score a registered model version or a bundle directory on any source,
at the bundle's own decision threshold, and log the result to MLflow and Prefect."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow
from prefect.runtime import flow_run

from stage1core.features import FeatureConfig
from stage1core.sources import SourceConfig
from stage1core.splits import SPLITS, SplitConfig
from tasks.evaluation import record_bundle_evaluation, score_bundle
from tasks.pipeline import build_splits
from tasks.registry import resolve_bundle
from tasks.scale_out import ScaleOutConfig


@flow(name="evaluate-bundle", log_prints=True)
def evaluate_bundle(
    model: str = "champion",
    sources: list[SourceConfig] | None = None,
    split: Literal["test", "calib", "val", "train", "all"] = "test",
    splits: SplitConfig | None = None,
    model_name: str = "",
    experiment: str = "stage1-evaluations",
    settings_file: str = "",
    scale_out: ScaleOutConfig | None = None,
) -> dict[str, Any]:
    """Evaluate a registered version or a bundle directory on any source, at the bundle's own threshold.

    Args:
        model: A bundle directory, `models:/<name>@<alias>`, `models:/<name>/<version>`, or a version
            number or alias of `model_name`.
        sources: Sources to score. Empty: the team's sources (configured and landed), as training reads them.
        split: One hash split (`test`, `calib`, `val`, `train`; `train_only` sources left out), or `all`:
            every image of the sources, train and `train_only` included (optimistic for the model
            trained on them).
        splits: Split ratios and salt. Empty: the team settings' (the ones training used, so `test` is the
            registered test split).
        model_name: Registered model that versions and aliases refer to. Empty: the team settings'.
        experiment: MLflow experiment of the evaluation run.
        settings_file: Team settings file. Empty: $STAGE1_SETTINGS, else $STAGE1_HOME/settings.toml, else
            the built-in demo settings.
        scale_out: Where a frozen bundle's features are computed (one process, or chunks on a Dask cluster).
            Empty: the team settings' [scale_out].
    """
    from tasks.pipeline import ensure_demo_data
    from tasks.settings import choose_sources, load_team_settings

    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {(*SPLITS, 'all')}, got {split!r}")
    features = FeatureConfig()
    if not (sources and splits and model_name and scale_out):
        from tasks.settings import scale_out_config

        settings = load_team_settings(settings_file)
        model_name = model_name or settings.model_name
        splits = splits or settings.splits
        scale_out = scale_out or scale_out_config(settings)
        features = settings.features
        if not sources:
            sources = choose_sources(list(settings.sources) or [ensure_demo_data()], None)
    bundle = resolve_bundle(model, model_name)
    split_ref = build_splits(sources, splits)
    scored = score_bundle(bundle["path"], split_ref.path, split, scale_out, features)
    run_id = record_bundle_evaluation(bundle=bundle, scored=scored, model=model, split=split,
                                      data_fingerprint=split_ref.data_fingerprint,
                                      source_names=[s.name for s in sources], experiment=experiment,
                                      flow_run_id=str(flow_run.id), flow_run_name=flow_run.name or "")
    return {"metrics": scored["metrics"], "bundle": bundle, "mlflow_run_id": run_id,
            "data_fingerprint": split_ref.data_fingerprint, "split_manifest": split_ref.path}
