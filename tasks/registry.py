"""Champion/challenger in the MLflow registry: fetch and score bundles, compare a challenger with the
champion on the same test split under the same FNR constraint, move aliases, and keep the
append-only promotion history on the registered model and its versions.

The statistics and the promote/keep rule live in stage1core.comparison, the history's logic in
stage1core.history; the tasks here fetch bundles, read and write the registry, and publish artifacts.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import getpass
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from stage1core.bundle import BundleError, load_bundle, read_manifest
from stage1core.comparison import (
    ComparisonConfig,
    MetricFloor,
    baseline_problems,
    check_floor,
    compare_predictions,
    comparison_markdown,
    comparison_table,
    decide,
    floor_report,
    history_figures,
)
from stage1core.fingerprint import fingerprint
from stage1core.guarantees import GuaranteeConfig, fnr_threshold
from stage1core.history import (
    encode_entry,
    entries_from_tags,
    entry_key,
    history_markdown,
    rollback_target,
    rolled_back_from,
)
from stage1core.home import home_path
from stage1core.splits import read_split_manifest
from stage1core.text import num

from .evaluation import score_samples

CHAMPION = "champion"


# ---------------------------------------------------------------------------------------------------
# the registry


def parse_model_ref(ref: str, default_model: str) -> tuple[str, str | None, str | None]:
    """(model name, version, alias) from `models:/name@alias`, `models:/name/3`, `@alias`, `3` or `alias`."""
    ref = ref.strip()
    name = default_model
    if ref.startswith("models:/"):
        body = ref[len("models:/"):]
        if "@" in body:
            name, alias = body.split("@", 1)
            return name, None, alias
        name, _, version = body.partition("/")
        if not version:
            raise ValueError(f"model reference {ref!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
        return name, version, None
    ref = ref.lstrip("@")
    if ref.isdigit():
        return name, ref, None
    if not ref:
        raise ValueError("empty model reference: give a version number, an alias or models:/<name>@<alias>")
    return name, None, ref


def get_version(model_name: str, *, version: str | None = None, alias: str | None = None):
    """An MLflow ModelVersion, or None when the alias or version does not exist."""
    from mlflow.exceptions import MlflowException

    from tasks.tracking import client

    mc = client()
    try:
        if alias is not None:
            return mc.get_model_version_by_alias(model_name, alias)
        return mc.get_model_version(model_name, str(version))
    except MlflowException:
        return None


def _local_bundle(fingerprint: str) -> Path | None:
    """A bundle with this fingerprint already under $STAGE1_HOME/bundles, if it verifies."""
    for path in home_path("bundles").glob(f"*-{fingerprint[:12]}"):
        try:
            if read_manifest(path)["fingerprint"] == fingerprint:
                return path
        except BundleError:
            continue
    return None


def fetch_bundle(model_name: str, mv) -> Path:
    """The bundle directory of a registered version, verified (schema and sha256 of every file).

    Uses the local copy under $STAGE1_HOME/bundles when it verifies, else downloads the version's
    model artifacts from MLflow (the pyfunc model carries the bundle under artifacts/bundle).
    """
    import mlflow

    expected = mv.tags.get("bundle_fingerprint")
    if expected:
        local = _local_bundle(expected)
        if local is not None:
            return local
    dest = home_path("registry", model_name, f"v{mv.version}")
    if dest.exists():
        shutil.rmtree(dest)
    mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{mv.version}", dst_path=str(dest))
    manifests = sorted(dest.rglob("manifest.json"))
    if not manifests:
        raise BundleError(f"{model_name} v{mv.version}: no bundle (manifest.json) in the model artifacts")
    bundle = manifests[0].parent
    manifest = read_manifest(bundle)
    if expected and manifest["fingerprint"] != expected:
        raise BundleError(f"{model_name} v{mv.version}: bundle fingerprint {manifest['fingerprint'][:12]} does not "
                          f"match the version tag bundle_fingerprint {expected[:12]}")
    return bundle


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


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def rule_fingerprint(config: ComparisonConfig) -> str:
    """What a judgement depended on besides the two bundles: the rule (auto_promote aside)."""
    return fingerprint("comparison-rule", dataclasses.replace(config, auto_promote=True))[:16]


def requester(requested_by: str = "") -> str:
    if requested_by:
        return requested_by
    return os.environ.get("STAGE1_USER") or getpass.getuser()


# ---------------------------------------------------------------------------------------------------
# the promotion history


def read_history(model_name: str) -> list[dict[str, Any]]:
    """The model's promotion history, oldest first (empty when the model or its history is absent)."""
    from mlflow.exceptions import MlflowException

    from tasks.tracking import client

    try:
        tags = client().get_registered_model(model_name).tags
    except MlflowException:
        return []
    return entries_from_tags(tags)


def append_history(model_name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Append one entry: a new tag on the registered model and on every version it names (the new
    holder, the one it replaced, the challenger judged). Existing entries are never rewritten."""
    from tasks.tracking import client

    mc = client()
    now = _dt.datetime.now(_dt.UTC)
    entry = {"at": now.isoformat(timespec="seconds"), **entry}
    key, value = entry_key(now), encode_entry(entry)
    mc.set_registered_model_tag(model_name, key, value)
    for version in {str(entry.get(k)) for k in ("version", "from_version", "challenger") if entry.get(k)}:
        mc.set_model_version_tag(model_name, version, key, value)
    return {**entry, "key": key}


def publish_history(model_name: str, *, version: str | None = None) -> list[dict[str, Any]]:
    """The whole history as a Prefect markdown artifact (`promotion-history`, versioned by Prefect)
    and as `registry/promotion_history.json` on the MLflow run of `version` (the new champion)."""
    from mlflow.exceptions import MlflowException

    from tasks.tracking import client

    entries = read_history(model_name)
    create_markdown_artifact(key="promotion-history", markdown=history_markdown(model_name, entries),
                             description=f"alias moves and retrain decisions of {model_name}")
    mv = get_version(model_name, version=version) if version else None
    if mv is not None and mv.run_id:
        try:
            client().log_dict(mv.run_id, {"model": model_name, "entries": entries}, "registry/promotion_history.json")
        except MlflowException as exc:  # a deleted run: the tags still hold the history
            get_run_logger().warning("could not log the history on run %s: %s", mv.run_id, exc)
    return entries


# ---------------------------------------------------------------------------------------------------
# tasks


@task(name="compare_with_champion")
def compare_with_champion(*, model_name: str, challenger_version: str, split_manifest: str,
                          guarantee: GuaranteeConfig, config: ComparisonConfig) -> dict[str, Any]:
    """Score the champion on the challenger's calib and test images, refit its threshold on that calib
    split for the same (alpha, delta), compare on test, and decide (stage1core.comparison.decide).
    Returns a JSON-able report."""
    logger = get_run_logger()
    challenger_mv = get_version(model_name, version=challenger_version)
    champion_mv = get_version(model_name, alias=CHAMPION)
    challenger_dir = fetch_bundle(model_name, challenger_mv)
    challenger_metrics = json.loads((challenger_dir / "metrics.json").read_text())
    thresholds = json.loads((challenger_dir / "thresholds.json").read_text())
    _, parts, manifest = read_split_manifest(split_manifest)
    report: dict[str, Any] = {
        "model_name": model_name, "challenger_version": str(challenger_version),
        "champion_version": str(champion_mv.version) if champion_mv else None,
        "alpha": guarantee.alpha, "delta": guarantee.delta, "rule": config.describe(guarantee.alpha),
        "rule_fingerprint": rule_fingerprint(config), "split_fingerprint": manifest["fingerprint"],
        "challenger_metrics": {k: challenger_metrics.get(k) for k in ("mcc", "auroc", "fnr", "fpr", "accuracy")}
        | {"policy_coverage": challenger_metrics.get("coverage")},
        "comparison": None, "checks": [], "figures": {}, "created_at": _now(),
    }
    report["challenger_metrics"]["threshold"] = thresholds["threshold"]
    if champion_mv is not None and str(champion_mv.version) == str(challenger_version):
        report.update(decision="keep", reason=f"the challenger v{challenger_version} is the champion already "
                                              "(no new data or settings): nothing to decide")
        return report
    floor_problems = check_floor(challenger_metrics, config.floor, alpha=guarantee.alpha)
    floor_problems += baseline_problems(challenger_dir)
    demoted = rolled_back_from(read_history(model_name), str(challenger_version))
    blocked = (f"v{challenger_version} was rolled back by {demoted.get('by')} on {demoted.get('at')} "
               f"({demoted.get('reason', '')}); retrain does not bring it back, promote it by hand if wanted"
               if demoted else "")
    comp = None
    n_pos, n_test = challenger_metrics.get("n_pos", 0), challenger_metrics.get("n", 0)
    if champion_mv is not None:
        champion_dir = fetch_bundle(model_name, champion_mv)
        preds = json.loads((challenger_dir / "test_predictions.json").read_text())
        by_id = {s.sample_id: s for rows in parts.values() for s in rows}
        test_ids = preds["sample_ids"]
        calib_pos = [s for s in parts["calib"] if s.label == 1]
        scored = score_samples(load_bundle(champion_dir, device="auto"), calib_pos + [by_id[i] for i in test_ids])
        champ_calib = scored["p_raw"][:len(calib_pos)]
        champ_test = {k: v[len(calib_pos):] for k, v in scored.items()}
        # the same FNR constraint: the champion's threshold refitted on this calib split, same (alpha, delta)
        refit = fnr_threshold(champ_calib, guarantee)
        champion_thresholds = json.loads((champion_dir / "thresholds.json").read_text())
        comp = compare_predictions(
            labels=np.array(preds["labels"]), challenger=np.array(preds.get("p_roadwork_raw", preds["p_roadwork"])),
            challenger_threshold=float(thresholds["threshold"]), champion=champ_test["p_raw"],
            champion_threshold=refit.threshold, alpha=guarantee.alpha, config=config)
        comp["champion"]["deployed_threshold"] = float(champion_thresholds["threshold"])
        comp["n_test_champion"] = json.loads((champion_dir / "metrics.json").read_text()).get("n")
        # share of test images each bundle's own policy decides (1.0 for the always-decide threshold policy)
        comp["champion"]["policy_coverage"] = float(np.mean(champ_test["decision"] >= 0))
        comp["challenger"]["policy_coverage"] = (float(np.mean(np.array(preds["decision"]) >= 0))
                                                 if "decision" in preds else 1.0)
        report["comparison"] = comp
        n_pos, n_test = comp["n_test_pos"], comp["n_test"]
        logger.info("challenger v%s vs champion v%s on %d test images: MCC %.4f vs %.4f",
                    challenger_version, champion_mv.version, comp["n_test"], comp["challenger"]["mcc"],
                    comp["champion"]["mcc"])
    decision = decide(comp, config, floor_problems=floor_problems, n_test_pos=int(n_pos),
                      n_test_neg=int(n_test - n_pos), alpha=guarantee.alpha, blocked=blocked)
    report.update(decision="promote" if decision.promote else "keep", reason=decision.reason,
                  checks=list(decision.checks))
    report["figures"] = history_figures(report)
    return report


@task(name="set_champion")
def set_champion(*, model_name: str, version: str, requested_by: str, reason: str, flow_run_id: str = "",
                 alias: str = CHAMPION, action: str = "promote", challenger: str = "",
                 figures: dict[str, Any] | None = None) -> dict[str, Any]:
    """Point `alias` at `version` and append the move to the history (who, when, why, from which
    version, `figures`). Moving the alias to the version that already holds it changes nothing and
    says so (`changed: False`)."""
    from tasks.tracking import client

    logger = get_run_logger()
    mc = client()
    previous = get_version(model_name, alias=alias)
    before = str(previous.version) if previous else ""
    out = {"model_name": model_name, "alias": alias, "version": str(version), "previous_version": before,
           "requested_by": requested_by, "action": action}
    if before == str(version):
        since = previous.tags.get(f"{alias}.promoted_at", "?")
        by = previous.tags.get(f"{alias}.promoted_by", "?")
        message = f"v{version} is already @{alias} (since {since}, by {by}): nothing changed"
        logger.info("%s %s", model_name, message)
        return {**out, "changed": False, "message": message}
    mc.set_registered_model_alias(model_name, alias, str(version))
    when = _now()
    record = {f"{alias}.promoted_by": requested_by, f"{alias}.promoted_reason": reason[:4000],
              f"{alias}.promoted_at": when, f"{alias}.previous_version": before or "none",
              f"{alias}.promoted_action": action}
    if flow_run_id:
        record[f"{alias}.promoted_by_flow_run"] = flow_run_id
    for key, value in record.items():
        mc.set_model_version_tag(model_name, str(version), key, value)
    for stale in (f"{alias}.replaced_by", f"{alias}.replaced_at"):  # it holds the alias again
        if stale in (get_version(model_name, version=str(version)).tags or {}):
            mc.delete_model_version_tag(model_name, str(version), stale)
    if previous is not None:
        mc.set_model_version_tag(model_name, before, f"{alias}.replaced_by", str(version))
        mc.set_model_version_tag(model_name, before, f"{alias}.replaced_at", when)
    entry = append_history(model_name, {
        "action": action, "alias": alias, "version": str(version), "from_version": before or None,
        "challenger": challenger or None, "by": requested_by, "reason": reason, "flow_run": flow_run_id or None,
        "figures": figures or {}})
    publish_history(model_name, version=str(version))
    was = f"v{before}" if before else "(none)"
    message = f"{model_name} @{alias}: {was} -> v{version} ({action} by {requested_by})"
    logger.info("%s: %s", message, reason)
    return {**out, "changed": True, "message": message, "history_entry": entry}


@task(name="record_comparison")
def record_comparison(report: dict[str, Any], *, mlflow_run_id: str, flow_run_id: str = "") -> None:
    """The comparison on the challenger's version (tags + description) and MLflow run (metrics and
    report, when there is a run), as Prefect markdown and table artifacts, and, when the champion
    stays, as a `keep` entry of the promotion history (a promotion was recorded by set_champion)."""
    from tasks.tracking import client

    mc = client()
    name, version = report["model_name"], report["challenger_version"]
    markdown = comparison_markdown(report)
    comp = report.get("comparison")
    tags = {"retrain.decision": report["decision"], "retrain.promoted": str(report["promoted"]).lower(),
            "retrain.reason": report["reason"][:4000], "retrain.judged_at": report["created_at"],
            "retrain.champion_version": report["champion_version"] or "none",
            "retrain.policy": report["rule"][:4000], "retrain.rule_fingerprint": report["rule_fingerprint"]}
    if comp:
        for key in ("mcc_gain", "auroc_gain", "fnr_increase"):
            d = comp[key]
            tags[f"retrain.{key}"] = f"{d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
    for key, value in tags.items():
        mc.set_model_version_tag(name, version, key, value)
    current = mc.get_model_version(name, version).description or ""
    marker = "\n\n## Champion/challenger comparison\n"
    body = markdown.split("\n", 2)[2] if markdown.count("\n") >= 2 else markdown
    # the card stays first; each comparison this version went through is appended, newest last
    head = current if marker in current else current.rstrip() + marker
    mc.update_model_version(name, version, description=f"{head}\n### {report['created_at']}\n{body}")
    if mlflow_run_id:
        if comp:
            for key in ("mcc", "auroc", "fnr", "coverage_at_fnr"):
                for side in ("challenger", "champion"):
                    value = comp[side][key]
                    if isinstance(value, float) and np.isfinite(value):
                        mc.log_metric(mlflow_run_id, f"compare/{side}_{key}", value)
            for key in ("mcc_gain", "auroc_gain", "fnr_increase"):
                for end in ("estimate", "low", "high"):
                    value = comp[key][end]
                    if np.isfinite(value):
                        mc.log_metric(mlflow_run_id, f"compare/{key}" + ("" if end == "estimate" else f"_{end}"), value)
        mc.log_text(mlflow_run_id, markdown, "comparison/report.md")
        mc.log_dict(mlflow_run_id, report, "comparison/report.json")
    if not report["promoted"] and report["champion_version"] != version:
        append_history(name, {
            "action": "keep", "alias": CHAMPION, "version": report["champion_version"],
            "from_version": report["champion_version"], "challenger": version, "by": "retrain",
            "reason": report["reason"], "flow_run": flow_run_id or None, "figures": report.get("figures") or {}})
        publish_history(name)
    create_markdown_artifact(key="champion-challenger", markdown=markdown,
                             description=f"retrain decision for {name} v{version}")
    create_table_artifact(key="champion-challenger-table", table=comparison_table(report),
                          description=f"challenger v{version} vs champion on the same test split")


# ---------------------------------------------------------------------------------------------------
# retrains that change nothing


def retrain_inputs(split_fingerprint: str, parameters: dict[str, Any]) -> str:
    """Everything a retrain's challenger depends on: the split (data and assignment), the training
    parameters and the code. Equal inputs give the same bundle, so training again changes nothing."""
    from tasks.caching import code_fingerprint

    return fingerprint("retrain-inputs", split_fingerprint, parameters, code_fingerprint())


@task(name="find_retrained")
def find_retrained(*, experiment: str, model_name: str, inputs: str, config: ComparisonConfig
                   ) -> dict[str, Any] | None:
    """The finished training run of an earlier retrain with these inputs and its registered version,
    or None. `no_op` is true when judging it again could not change anything either: it is the
    champion, or it was kept against the current champion under this rule."""
    from tasks.tracking import client

    mc = client()
    exp = mc.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = mc.search_runs([exp.experiment_id], filter_string=f"tags.retrain_inputs = '{inputs}' and "
                          "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
    ref = runs[0].data.tags.get("model_version", "") if runs else ""
    if not ref.startswith(f"{model_name}/"):
        return None
    version = ref.rsplit("/", 1)[1]
    mv = get_version(model_name, version=version)
    if mv is None:
        return None
    champion = get_version(model_name, alias=CHAMPION)
    champion_version = str(champion.version) if champion else "none"
    found = {"run_id": runs[0].info.run_id, "version": version, "champion_version": champion_version}
    if champion_version == version:
        return {**found, "no_op": True,
                "why": f"v{version} was trained on the same data and settings and is the champion"}
    judged = mv.tags.get("retrain.decision")
    # a `promote` verdict that did not stick (auto-promotion off, or rolled back since) is judged again
    if (judged == "keep" and mv.tags.get("retrain.champion_version") == champion_version
            and mv.tags.get("retrain.rule_fingerprint") == rule_fingerprint(config)):
        return {**found, "no_op": True, "why": (
            f"v{version} was trained on the same data and settings and judged against champion "
            f"{'v' + champion_version if champion else 'none'} under this rule on "
            f"{mv.tags.get('retrain.judged_at', '?')}: {judged} ({mv.tags.get('retrain.reason', '')})")}
    return {**found, "no_op": False, "why": (
        f"v{version} was trained on the same data and settings; the champion or the rule changed since "
        "it was judged: judging it again without training")}


@task(name="mark_retrained")
def mark_retrained(mlflow_run_id: str, inputs: str) -> None:
    """Tag the training run with its retrain inputs, so the next retrain with the same ones is a no-op."""
    from tasks.tracking import client

    client().set_tag(mlflow_run_id, "retrain_inputs", inputs)


@task(name="report_no_op")
def report_no_op(found: dict[str, Any], *, model_name: str, trigger: str) -> dict[str, Any]:
    """A retrain that had nothing to do: says so in a Prefect artifact; writes nothing to MLflow."""
    message = (f"# retrain: nothing to do\n\nNo new images and no new settings since MLflow run "
               f"`{found['run_id']}`: {found['why']}. Nothing was trained, registered or logged "
               f"(trigger: {trigger}).\n")
    create_markdown_artifact(key="champion-challenger", markdown=message,
                             description=f"retrain no-op for {model_name} v{found['version']}")
    get_run_logger().info("retrain: no-op: %s", found["why"])
    return {"model_name": model_name, "decision": "no-op", "promoted": False, "reason": found["why"],
            "challenger_version": found["version"], "champion_version": found["champion_version"],
            "previous_run_id": found["run_id"], "trigger": trigger, "created_at": _now()}


# ---------------------------------------------------------------------------------------------------
# promotion by hand


def find_rollback_target(model_name: str, *, alias: str = CHAMPION) -> tuple[str, str]:
    """(version, why) a rollback of `alias` goes to (stage1core.history.rollback_target); raises
    ValueError, saying why, when there is none."""
    current = get_version(model_name, alias=alias)
    target, why = rollback_target(read_history(model_name), str(current.version) if current else None, alias=alias,
                                  fallback=current.tags.get(f"{alias}.previous_version") if current else None)
    if target is None:
        raise ValueError(f"{model_name}: cannot roll back: {why}")
    return target, why


@task(name="resolve_promotion")
def resolve_promotion(*, version: str, model_name: str, alias: str = CHAMPION) -> dict[str, Any]:
    """The registered version a promotion asks for, and who holds the alias now. `previous` means a
    rollback: the version the current holder replaced when it was last promoted (stage1core.history)."""
    if version.strip() == "previous":
        name = model_name
        number, rollback = find_rollback_target(name, alias=alias)
        source_alias = None
    else:
        name, number, source_alias = parse_model_ref(version, model_name)
        rollback = ""
    mv = get_version(name, version=number, alias=source_alias)
    if mv is None:
        raise ValueError(f"{name}: no version {version!r} in the MLflow registry (MLflow's Models page lists "
                         "every version; `stage1 history` the ones that held an alias)")
    holder = get_version(name, alias=alias)
    return {"model_name": name, "version": str(mv.version), "holder": str(holder.version) if holder else "",
            "rollback_target_why": rollback}


@task(name="check_promotable")
def check_promotable(*, model_name: str, version: str, floor: MetricFloor) -> dict[str, Any]:
    """Fetch and verify the version's bundle (schema, sha256 of every file, fingerprint tag) and check
    it against the floor and its baselines. Raises, naming the reason, when it may not be champion."""
    mv = get_version(model_name, version=version)
    try:
        bundle = fetch_bundle(model_name, mv)
    except BundleError as exc:
        raise BundleError(f"refusing to promote {model_name} v{version}: {exc}") from exc
    metrics, problems = floor_report(bundle, floor)
    if problems:
        raise ValueError(f"refusing to promote {model_name} v{version}: " + "; ".join(problems)
                         + " (the default floor is MetricFloor in stage1core/comparison.py)")
    summary = (f"Bundle `{bundle.name}` verified (sha256 of every file); test MCC {num(metrics.get('mcc'))}, "
               f"AUROC {num(metrics.get('auroc'))}, FNR {num(metrics.get('fnr'))} meet the floor "
               f"(MCC ≥ {floor.min_mcc}, AUROC ≥ {floor.min_auroc}, FNR ≤ "
               f"{'α' if floor.max_fnr is None else floor.max_fnr}) and no baseline beats the head.")
    figures = {f"test_{k}": round(metrics[k], 4) for k in ("mcc", "auroc", "fnr")
               if isinstance(metrics.get(k), float) and np.isfinite(metrics[k])}
    return {"bundle_path": str(bundle), "metrics": metrics, "figures": figures, "summary": summary}
