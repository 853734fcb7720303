"""The `evaluate-bundle` flow: score a registered model version or a bundle directory on any source,
at the bundle's own decision threshold, and log the result to MLflow and Prefect."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from stage1core.bundle import load_bundle, read_manifest
from stage1core.comparison import coverage_at_fnr
from stage1core.features import FeatureConfig, FeatureStore
from stage1core.fingerprint import fingerprint
from stage1core.home import home_path
from stage1core.metrics import binary_metrics
from stage1core.plots import plot_fnr_fpr
from stage1core.sources import SourceConfig, read_bytes
from stage1core.splits import SPLITS, SplitConfig, read_split_manifest, samples_of
from stage1core.text import num
from tasks.pipeline import build_splits
from tasks.registry import fetch_bundle, get_version, parse_model_ref
from tasks.scale_out import ScaleOutConfig, fill_store_in_chunks
from tasks.tracking import client, end_mlflow_run, start_mlflow_run


@task(name="resolve_bundle")
def resolve_bundle(model: str, model_name: str) -> dict[str, str]:
    """A bundle directory from a path or a registry reference, verified."""
    if Path(model).expanduser().is_dir():
        path = Path(model).expanduser().resolve()
        manifest = read_manifest(path)
        return {"path": str(path), "fingerprint": manifest["fingerprint"], "model_name": "", "version": ""}
    name, number, alias = parse_model_ref(model, model_name)
    mv = get_version(name, version=number, alias=alias)
    if mv is None:
        raise ValueError(f"{model!r} is neither a bundle directory nor a version in the MLflow registry ({name})")
    path = fetch_bundle(name, mv)
    return {"path": str(path), "fingerprint": read_manifest(path)["fingerprint"], "model_name": name,
            "version": str(mv.version)}


@task(name="score_bundle")
def score_bundle(bundle_path: str, split_manifest: str, split: str, scale_out: ScaleOutConfig = ScaleOutConfig(),
                 features: FeatureConfig = FeatureConfig()) -> dict[str, Any]:
    """p(roadwork) of the bundle on the chosen split (or every image of the sources with `all`). With
    `scale_out.engine` "dask" and a frozen backbone, the features are filled into the bundle's feature
    store chunk by chunk on the cluster (what training stored is reused) and the head runs on them here;
    a fine-tuned bundle embeds in this process."""
    _, parts, _ = read_split_manifest(split_manifest)
    rows = samples_of(parts, split)
    if not rows:
        raise ValueError(f"no evaluable images in split {split!r} of these sources")
    predictor = load_bundle(bundle_path, device="auto")
    if scale_out.distributed and not predictor.fine_tuned:
        info = fill_store_in_chunks(predictor.feature_target(features), rows, scale_out,
                                    log_fn=get_run_logger().info)
        if info.failed:
            first = info.failed[0]
            raise ValueError(f"{len(info.failed)} images could not be decoded, e.g. {first['locator']}: "
                             f"{first['reason']}")
        feats = FeatureStore(info.store_dir).load([s.sample_id for s in rows])
    else:
        feats = predictor.features([read_bytes(s.locator) for s in rows])
    out = predictor.apply_policy(feats)
    y = np.array([s.label for s in rows])
    alpha = float(predictor.policy.threshold.alpha)
    # the FNR-guaranteed threshold applies to the raw head probability (stage1core.policy)
    metrics = binary_metrics(y, out["p_raw"], threshold=predictor.threshold)
    metrics["coverage_at_fnr"] = coverage_at_fnr(y, out["p_raw"], predictor.threshold, alpha)
    accepted, positives = out["decision"] >= 0, y == 1
    metrics["policy"] = predictor.policy.policy
    metrics["coverage"] = float(accepted.mean())
    metrics["selective_fnr"] = (float(np.mean(out["decision"][accepted & positives] == 0))
                                if (accepted & positives).any() else None)
    metrics["ece_calibrated"] = binary_metrics(y, out["p"])["ece"]
    out_dir = home_path("evaluations", "bundles", fingerprint("evaluate-bundle", predictor.fingerprint,
                                                              split_manifest, split)[:24])
    plot_fnr_fpr(y, out["p_raw"], out_dir / "fnr_fpr.png", threshold=predictor.threshold, alpha=alpha)
    clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in metrics.items()}
    return {"metrics": clean, "plot": str(out_dir / "fnr_fpr.png"), "alpha": alpha}


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
    from stage1core.settings import combine_sources, landed_sources
    from tasks.pipeline import ensure_demo_data
    from tasks.settings import load_team_settings

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
            sources = combine_sources(list(settings.sources) or [ensure_demo_data()], landed_sources())
    bundle = resolve_bundle(model, model_name)
    split_ref = build_splits(sources, splits)
    scored = score_bundle(bundle["path"], split_ref.path, split, scale_out, features)
    metrics = scored["metrics"]
    label = f"{bundle['model_name']} v{bundle['version']}" if bundle["version"] else bundle["path"]
    run = start_mlflow_run(experiment, f"evaluate-bundle/{flow_run.name or 'local'}", {
        "prefect.flow_run_id": str(flow_run.id), "prefect.flow_name": "evaluate-bundle", "model": model,
        "model_version": label, "bundle_fingerprint": bundle["fingerprint"],
        "data_fingerprint": split_ref.data_fingerprint, "split": split})
    mc = client()
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
            mc.log_metric(run["run_id"], f"eval/{key}", float(value))
    mc.log_artifact(run["run_id"], scored["plot"], artifact_path="plots")
    end_mlflow_run(run["run_id"])
    if bundle["version"]:
        mc.set_model_version_tag(bundle["model_name"], bundle["version"], "last_evaluation",
                                 f"{split} of data {split_ref.data_fingerprint[:12]}: MCC {num(metrics['mcc'])}, "
                                 f"n={metrics['n']} (run {run['run_id']})")
    keys = ("mcc", "accuracy", "auroc", "fnr", "fpr", "coverage_at_fnr", "policy", "coverage", "selective_fnr",
            "ece_calibrated", "n", "n_pos", "threshold")
    create_table_artifact(key="bundle-evaluation", table=[{"metric": k, "value": num(metrics.get(k))} for k in keys],
                          description=f"{label} on the {split} split of {[s.name for s in sources]}")
    create_markdown_artifact(
        key="bundle-evaluation-summary",
        markdown=(f"# {label} on {split}\n\n{metrics['n']} images ({metrics['n_pos']} roadwork), data "
                  f"`{split_ref.data_fingerprint[:16]}`. MCC {num(metrics['mcc'])}, AUROC {num(metrics['auroc'])}, "
                  f"FNR {num(metrics['fnr'])} (guaranteed ≤ {scored['alpha']} on data like the calib split), "
                  f"coverage at that FNR {num(metrics['coverage_at_fnr'])}.\n\n[MLflow run]({run['url']})\n"),
        description="evaluate-bundle")
    get_run_logger().info("%s on %s: MCC %s over %s images", label, split, num(metrics["mcc"]), metrics["n"])
    return {"metrics": metrics, "bundle": bundle, "mlflow_run_id": run["run_id"], "data_fingerprint":
            split_ref.data_fingerprint, "split_manifest": split_ref.path}
