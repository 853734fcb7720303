"""Scoring a shipped bundle on images, and the `evaluate-bundle` flow's tasks: its metrics on a split,
and the record of that evaluation in MLflow, the registry and Prefect (which bundle:
`tasks.registry.resolve_bundle`).

`score_samples` is the one way the tasks run a bundle on labelled images (this flow, and the champion
in `tasks.registry.compare_with_champion`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from stage1core.bundle import load_bundle
from stage1core.evaluation import bundle_metrics
from stage1core.features import FeatureConfig, FeatureStore
from stage1core.fingerprint import fingerprint
from stage1core.home import home_path
from stage1core.plots import plot_fnr_fpr
from stage1core.sources import Sample, read_bytes
from stage1core.splits import read_split_manifest, samples_of
from stage1core.text import num

from .scale_out import ScaleOutConfig, fill_store_in_chunks
from .tracking import client, end_mlflow_run, start_mlflow_run


def score_samples(predictor: Any, rows: Sequence[Sample], *, scale_out: ScaleOutConfig | None = None,
                  features: FeatureConfig = FeatureConfig(), log_fn: Callable[[str], None] | None = None
                  ) -> dict[str, np.ndarray]:
    """The bundle's policy on images: p_raw (what the FNR threshold applies to), p (calibrated),
    decision (1/0, -1 = abstain). With `scale_out.engine` "dask" and a frozen backbone, the features
    are filled into the bundle's feature store chunk by chunk on the cluster (what training stored is
    reused) and the head runs on them here; otherwise this process embeds the images."""
    if not rows:
        return {"p_raw": np.zeros(0), "p": np.zeros(0), "decision": np.zeros(0, np.int64)}
    if scale_out is not None and scale_out.distributed and not predictor.fine_tuned:
        info = fill_store_in_chunks(predictor.feature_target(features), rows, scale_out, log_fn=log_fn)
        if info.failed:
            first = info.failed[0]
            raise ValueError(f"{len(info.failed)} images could not be decoded, e.g. {first['locator']}: "
                             f"{first['reason']}")
        feats = FeatureStore(info.store_dir).load([s.sample_id for s in rows])
    else:
        feats = predictor.features([read_bytes(s.locator) for s in rows])
    return predictor.apply_policy(feats)


@task(name="score_bundle")
def score_bundle(bundle_path: str, split_manifest: str, split: str, scale_out: ScaleOutConfig = ScaleOutConfig(),
                 features: FeatureConfig = FeatureConfig()) -> dict[str, Any]:
    """The bundle's metrics (`stage1core.evaluation.bundle_metrics`) on the chosen split (or every image
    of the sources with `all`), and its FNR/FPR plot."""
    _, parts, _ = read_split_manifest(split_manifest)
    rows = samples_of(parts, split)
    if not rows:
        raise ValueError(f"no evaluable images in split {split!r} of these sources")
    predictor = load_bundle(bundle_path, device="auto")
    out = score_samples(predictor, rows, scale_out=scale_out, features=features, log_fn=get_run_logger().info)
    y = np.array([s.label for s in rows])
    alpha = float(predictor.policy.threshold.alpha)
    metrics = bundle_metrics(y, out, threshold=predictor.threshold, alpha=alpha, policy=predictor.policy.policy)
    out_dir = home_path("evaluations", "bundles", fingerprint("evaluate-bundle", predictor.fingerprint,
                                                              split_manifest, split)[:24])
    plot_fnr_fpr(y, out["p_raw"], out_dir / "fnr_fpr.png", threshold=predictor.threshold, alpha=alpha)
    return {"metrics": metrics, "plot": str(out_dir / "fnr_fpr.png"), "alpha": alpha}


# the keys of the Prefect table, in order
REPORTED = ("mcc", "accuracy", "auroc", "fnr", "fpr", "coverage_at_fnr", "policy", "coverage", "selective_fnr",
            "ece_calibrated", "n", "n_pos", "threshold")


@task(name="record_bundle_evaluation")
def record_bundle_evaluation(*, bundle: dict[str, str], scored: dict[str, Any], model: str, split: str,
                             data_fingerprint: str, source_names: list[str], experiment: str,
                             flow_run_id: str, flow_run_name: str) -> str:
    """The evaluation in MLflow (an `eval/...` run with the plot), on the registered version (tag
    `last_evaluation`) and in Prefect (table and summary artifacts). Returns the MLflow run id."""
    metrics = scored["metrics"]
    label = f"{bundle['model_name']} v{bundle['version']}" if bundle["version"] else bundle["path"]
    run = start_mlflow_run(experiment, f"evaluate-bundle/{flow_run_name or 'local'}", {
        "prefect.flow_run_id": flow_run_id, "prefect.flow_name": "evaluate-bundle", "model": model,
        "model_version": label, "bundle_fingerprint": bundle["fingerprint"], "data_fingerprint": data_fingerprint,
        "split": split})
    mc = client()
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            mc.log_metric(run["run_id"], f"eval/{key}", float(value))
    mc.log_artifact(run["run_id"], scored["plot"], artifact_path="plots")
    end_mlflow_run(run["run_id"])
    if bundle["version"]:
        mc.set_model_version_tag(bundle["model_name"], bundle["version"], "last_evaluation",
                                 f"{split} of data {data_fingerprint[:12]}: MCC {num(metrics['mcc'])}, "
                                 f"n={metrics['n']} (run {run['run_id']})")
    create_table_artifact(key="bundle-evaluation",
                          table=[{"metric": k, "value": num(metrics.get(k))} for k in REPORTED],
                          description=f"{label} on the {split} split of {source_names}")
    create_markdown_artifact(
        key="bundle-evaluation-summary",
        markdown=(f"# {label} on {split}\n\n{metrics['n']} images ({metrics['n_pos']} roadwork), data "
                  f"`{data_fingerprint[:16]}`. MCC {num(metrics['mcc'])}, AUROC {num(metrics['auroc'])}, "
                  f"FNR {num(metrics['fnr'])} (guaranteed ≤ {scored['alpha']} on data like the calib split), "
                  f"coverage at that FNR {num(metrics['coverage_at_fnr'])}.\n\n[MLflow run]({run['url']})\n"),
        description="evaluate-bundle")
    get_run_logger().info("%s on %s: MCC %s over %s images", label, split, num(metrics["mcc"]), metrics["n"])
    return run["run_id"]
