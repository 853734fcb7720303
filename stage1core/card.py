"""The bundle's model card (model_card.md): what the model is, what it was trained and judged on, the
decision rule it applies with the guarantee that rule carries (if any), and how it compares with the
baselines scored on the same features and split. Written from the same numbers the bundle holds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .backbone import BackboneSpec
from .policy import FittedPolicy, calibrated_positive
from .text import num


def calibrated_at(policy_files: dict[str, dict[str, Any]], p_raw: float) -> float:
    """The reported (calibrated) probability of an image whose raw head probability is `p_raw`."""
    fitted = FittedPolicy.from_files(policy_files)
    p = min(max(p_raw, 1e-12), 1 - 1e-12)
    logits = np.array([[0.0, math.log(p / (1 - p))]])
    return float(calibrated_positive(fitted.calibrator, logits)[0])


def decision_rule(policy_files: dict[str, dict[str, Any]], metrics: dict[str, Any]) -> str:
    """The active policy's rule, which probability it reads, and its guarantee (or that it has none)."""
    thr = policy_files["thresholds.json"]
    policy = policy_files["policy.json"]
    calibrator = policy_files.get("calibration.json", {}).get("kind", "none")
    reported = ("The Predictor reports p(roadwork) calibrated with "
                f"`{calibrator}` (fitted on calib); the rules below read the head's raw probability p_raw."
                if calibrator != "none" else "The Predictor reports the head's raw probability p_raw.")
    fnr = (f"P(FNR <= {thr['alpha']}) >= 1 - {thr['delta']} over calib draws (the threshold is the "
           f"{thr['k']}-th smallest of {thr['n_positives']} calib positive scores; violation bound "
           f"{thr['violation_bound']:.4f}; docs/guarantees.md)")
    t = float(thr["threshold"])
    if policy["policy"] == "threshold":
        same = ""
        if calibrator != "none":
            cut = calibrated_at(policy_files, t)
            same = f" For the reported probability the same rule reads p(roadwork) >= {cut:.6f}."
        return (f"**Policy `threshold`**: roadwork iff p_raw >= {t:.6f}, else no roadwork; never abstains. "
                f"Guarantee: {fnr}.{same}\n\n{reported}")
    if policy["policy"] == "gate":
        return (f"**Policy `gate`** (selective head): decide the argmax class (roadwork iff p_raw >= 0.5) when "
                f"the Platt-calibrated gate says P(argmax correct) >= {policy['gate_min_confidence']}; otherwise "
                "abstain. **No statistical guarantee** for this policy: the FNR-guaranteed threshold "
                f"{t:.6f} is fitted and stored in thresholds.json but not applied (test coverage "
                f"{num(metrics.get('coverage'))}, FNR among accepted {num(metrics.get('selective_fnr'))}).\n\n"
                f"{reported}")
    scrc = policy_files["scrcparams.json"]
    score = "the gate probability" if scrc.get("score") == "gate" else "max(p_raw, 1 - p_raw)"
    return (f"**Policy `scrc`** (SCRC-I): accept an image iff {score} >= {scrc['selection_threshold']:.6f}, "
            "else abstain; for an accepted image the prediction set holds roadwork iff p_raw >= "
            f"{scrc['set_threshold']:.6f} and no roadwork iff 1 - p_raw >= {scrc['set_threshold']:.6f}; the "
            "decision is roadwork iff the set holds roadwork. Guarantee: with probability >= 1 - "
            f"{scrc['delta']} over calib draws, the acceptance rate is >= {scrc['xi']} and the FNR among "
            f"accepted images is <= {scrc['alpha']} (calib coverage lower bound "
            f"{scrc['coverage_lower_bound']:.4f}, risk p-value {scrc['risk_p_value']:.4g}; docs/guarantees.md). "
            f"The threshold-policy cut p_raw >= {t:.6f} is stored but not applied.\n\n{reported}")


def _head_section(head: dict[str, Any], backbone_mode: str) -> str:
    where = "frozen backbone, head trained on cached features" if backbone_mode == "frozen" else (
        f"{backbone_mode.upper()} adapters fine-tuned with the head on images")
    line = (f"- Head: `{head['kind']}` on {head['in_dim']}-d features ({where}); chosen epoch "
            f"{head['best_epoch']} of {head['epochs_run']} run")
    if head.get("n_candidates", 1) > 1:
        line += (f"\n- Head selection: **{head['chosen']}**, chosen of {head['n_candidates']} candidates by "
                 f"{head['criterion']} (docs/selection.md; the grid is in head.json)")
    elif head.get("criterion"):
        line += f"\n- Checkpoint: {head['criterion']}"
    return line


def _baseline_section(baselines: dict[str, Any] | None) -> str:
    if not baselines:
        return "Baselines were not scored for this run."
    head = baselines["head"]
    rows = [f"| **head** | {num(head['accuracy_at_0.5'])} | {num(head['mcc_at_0.5'])} | {num(head['auroc'])} | "
            f"{num(head['brier'])} | {num(head.get('chosen', 'see above'))} |"]
    for name, m in baselines["baselines"].items():
        rows.append(f"| {name} | {num(m['accuracy_at_0.5'])} | {num(m['mcc_at_0.5'])} | {num(m['auroc'])} | "
                    f"{num(m['brier'])} | {m['chosen']} |")
    comp = baselines["comparison"]
    verdict = (f"> **WARNING: {comp['verdict']}.** This version is tagged `quality=loses_to_baseline` and "
               "`retrain` never promotes it." if comp["loses"] else f"Verdict: {comp['verdict']}.")
    return ("Same cached features and split, fitted on train, scored on test at p >= 0.5 (logistic: C by "
            "cross-validation on train; kNN: cosine, DINOv3's exp(sim/T) vote, k by cross-validation).\n\n"
            "| model | accuracy | MCC | AUROC | Brier | chosen |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + f"\n\n{verdict}")


def model_card(*, name: str, spec: BackboneSpec, backbone_mode: str, data: dict[str, Any],
               counts: dict[str, dict[str, int]], metrics: dict[str, Any], policy_files: dict[str, dict[str, Any]],
               head: dict[str, Any], baselines: dict[str, Any] | None) -> str:
    """Markdown for model_card.md. `data`: data_fingerprint, split_fingerprint, n_samples, duplicates,
    quarantined (and, when the split manifest has them, n_groups, largest_group). `head`: kind, in_dim,
    best_epoch, epochs_run, chosen, n_candidates, criterion. `baselines`: score_baselines' result."""
    rows = "\n".join(f"| {s} | {c.get('0', 0)} | {c.get('1', 0)} | {c.get('total', 0)} |" for s, c in counts.items())
    notes = ""
    if "dinov3" not in spec.name:
        notes = (f"\n> The backbone `{spec.name}` stands in for DINOv3 (demo or test run); production "
                 "bundles use a DINOv3 backbone.\n")
    if spec.weights_kind == "random":
        notes += "\n> **Random-init backbone**: features carry no pretrained knowledge (baseline/test only).\n"
    groups = ""
    if data.get("n_groups") is not None:
        groups = (f" Near-duplicate / drive groups: {data['n_groups']} groups, the largest {data['largest_group']} "
                  "images; a group never spans two splits.")
    m = lambda key: num(metrics.get(key))
    images = (f"{data['n_samples']} unique images ({data['duplicates']} duplicates collapsed, "
              f"{data['quarantined']} quarantined).{groups}")
    return f"""# {name}: roadwork classifier bundle
{notes}
## Model
- Backbone: `{spec.name}` (weights: {spec.weights_kind}, sha256 `{(spec.weights_sha256 or 'none')[:16]}`),
  pooling `{spec.pooling}`, fingerprint `{spec.fingerprint[:16]}`
{_head_section(head, backbone_mode)}

## Data
Data fingerprint `{data['data_fingerprint'][:16]}`, split manifest `{data['split_fingerprint'][:16]}`,
{images}

| split | no roadwork | roadwork | total |
|---|---|---|---|
{rows}

## Decision rule
{decision_rule(policy_files, metrics)}

Calibration on test: ECE {m('calibration/raw/ece')} raw, {m('calibration/temperature/ece')} temperature,
{m('calibration/dirichlet/ece')} Dirichlet (top-label, 15 equal-width bins).

## Test metrics
Under the active policy: coverage {m('coverage')}, accuracy among decided {m('selective_accuracy')}, FNR among
accepted {m('selective_fnr')}. At the FNR-guaranteed threshold: accuracy {m('accuracy')}, MCC {m('mcc')},
FNR {m('fnr')}, FPR {m('fpr')}. At p_raw >= 0.5: accuracy {m('accuracy_at_0.5')}, MCC {m('mcc_at_0.5')}.
AUROC {m('auroc')}, NLL {m('nll')}, Brier {m('brier')}.

## Head vs baselines
{_baseline_section(baselines)}

## Known limits
Guarantees hold for data distributed like the calib split; a shift in cameras, regions or seasons voids
them until recalibrated. Test metrics come from {counts.get('test', {}).get('total', 0)} images.
"""
