"""Prefect artifacts that summarise a run: a metrics table, a markdown summary, a link to MLflow."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from stage1core.text import num

METRIC_ORDER = ("accuracy", "mcc", "auroc", "fnr", "fpr", "precision", "recall", "ece", "nll", "brier",
                "accuracy_at_0.5", "mcc_at_0.5", "policy", "coverage", "selective_fnr", "selective_accuracy",
                "mean_set_size", "calibrator", "calibration/raw/ece", "calibration/temperature/ece",
                "calibration/dirichlet/ece", "calibration/raw/nll", "calibration/temperature/nll",
                "calibration/dirichlet/nll", "selective/maxprob/aurc", "selective/maxprob/e_aurc",
                "selective/maxprob/augrc", "selective/calibrated/aurc", "selective/gate/aurc",
                "selective/gate/e_aurc", "selective/gate/augrc")
PLOTS = ("fnr_fpr.png", "reliability.png", "risk_coverage.png")


def baseline_rows(judged: dict[str, Any] | None) -> list[dict[str, str]]:
    """Head and baselines side by side on the test split, at p >= 0.5."""
    if not judged:
        return []
    rows = [{"model": "head", **{k: num(judged["head"].get(k)) for k in BASELINE_KEYS}, "chosen": ""}]
    for name, m in judged["baselines"].items():
        rows.append({"model": name, **{k: num(m.get(k)) for k in BASELINE_KEYS}, "chosen": m["chosen"]})
    return rows


BASELINE_KEYS = ("accuracy_at_0.5", "mcc_at_0.5", "auroc", "brier")


def _quality_markdown(head: Any, judged: dict[str, Any] | None) -> str:
    lines = []
    if head is not None and head.n_candidates > 1:
        lines.append(f"**Head selection**: `{head.chosen}` chosen of {head.n_candidates} candidates "
                     f"(epoch {head.best_epoch}; {head.criterion}).")
    elif head is not None:
        lines.append(f"**Head**: `{head.kind}`, chosen epoch {head.best_epoch} of {head.epochs_run}.")
    if judged:
        verdict = judged["comparison"]["verdict"]
        lines.append(f"**⚠ {verdict.upper()}** — tagged `quality=loses_to_baseline`; `retrain` will not promote it."
                     if judged["comparison"]["loses"] else f"**Baselines**: {verdict}.")
        table = ["| model | accuracy | MCC | AUROC | Brier | chosen |", "|---|---|---|---|---|---|"]
        table += [f"| {r['model']} | {r['accuracy_at_0.5']} | {r['mcc_at_0.5']} | {r['auroc']} | {r['brier']} | "
                  f"{r['chosen']} |" for r in baseline_rows(judged)]
        lines.append("\n".join(table))
    return "\n\n".join(lines)


def _quarantine_line(quarantine: dict[str, Any] | None) -> str:
    if not quarantine or not quarantine.get("quarantined"):
        return "none: every image was usable"
    return (f"{quarantine['quarantined']} of {quarantine['rows']} images left out ({quarantine['scan']} unreadable at "
            f"scan, {quarantine['decode']} undecodable), listed in `{quarantine['path']}`")


@task(name="publish_reports")
def publish_reports(*, metrics: dict[str, Any], thresholds: dict[str, Any], bundle_path: str,
                    mlflow_run: dict[str, str], registered: dict[str, str] | None, counts: dict[str, Any],
                    head: Any = None, baselines: dict[str, Any] | None = None,
                    quarantine: dict[str, Any] | None = None) -> None:
    rows = [{"metric": k, "test": num(metrics.get(k))} for k in METRIC_ORDER if k in metrics]
    create_table_artifact(key="test-metrics", table=rows,
                          description="Test-split metrics at the guaranteed threshold")
    version = (f"{registered['model_name']} v{registered['version']} (@{registered['alias']})"
               if registered else "not registered")
    split_rows = "\n".join(
        f"| {s} | {c.get('0', 0)} | {c.get('1', 0)} | {c.get('total', 0)} |" for s, c in counts.items()
    )
    create_markdown_artifact(
        key="run-summary",
        markdown=f"""# train-pipeline summary

| split | no roadwork | roadwork | total |
|---|---|---|---|
{split_rows}

**Decision threshold** {thresholds['threshold']:.6f}: P(FNR ≤ {thresholds['alpha']}) ≥ 1 − {thresholds['delta']}
(k = {thresholds['k']} of {thresholds['n_positives']} calib positives).

**Test**: MCC {num(metrics.get('mcc'))}, accuracy {num(metrics.get('accuracy'))}, AUROC {num(metrics.get('auroc'))},
FNR {num(metrics.get('fnr'))}, FPR {num(metrics.get('fpr'))}, ECE {num(metrics.get('ece'))}.

{_quality_markdown(head, baselines)}

- **Quarantine** {_quarantine_line(quarantine)}
- **Bundle** `{bundle_path}`
- **Model** {version}
- **MLflow run** [{mlflow_run['run_id']}]({mlflow_run['url']})
""",
        description="stage1 training run",
    )
    if baselines:
        create_table_artifact(key="head-vs-baselines", table=baseline_rows(baselines),
                              description="The head and the baselines on the same features and test split, at p >= 0.5")
    if head is not None and head.n_candidates > 1:
        grid = json.loads((Path(head.path) / "head.json").read_text()).get("grid", [])
        create_table_artifact(key="head-selection", table=[{k: num(v) for k, v in row.items()} for row in grid],
                              description=f"Head grid on val; chosen: {head.chosen}")
    plots = []
    for name in PLOTS:
        path = Path(bundle_path) / "plots" / name
        if path.exists():
            data = base64.b64encode(path.read_bytes()).decode()
            plots.append(f"### {name.removesuffix('.png')}\n\n![{name}](data:image/png;base64,{data})\n")
    create_markdown_artifact(key="run-plots", markdown="\n".join(plots) or "no plots",
                             description="FNR/FPR vs threshold, reliability diagram, risk-coverage curve")
    create_link_artifact(key="mlflow-run", link=mlflow_run["url"], link_text="MLflow run",
                         description="The MLflow run of this flow run")
