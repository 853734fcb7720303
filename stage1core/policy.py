"""Decision policies: how p(roadwork) becomes a decision, an abstention or a prediction set.

Fitted on the calib split only. Every policy keeps the FNR-guaranteed threshold on the raw head
probability; on top of it:
- `threshold`: always decide, roadwork iff p_raw >= t (P(FNR <= alpha) >= 1 - delta);
- `gate`: SelectiveNet's selective classifier: the argmax decision where the Platt-calibrated gate says
  P(argmax correct) >= gate_min_confidence, else abstain (selective head; no FNR guarantee);
- `scrc`: SCRC-I selection and prediction sets (stage1core.guarantees.fit_scrc).

The reported p(roadwork) is calibrated (temperature or Dirichlet/beta, fitted on calib). Thresholds
and SCRC use the raw head outputs, which do not depend on the calib split, so their guarantees hold
exactly; the threshold is unchanged by any monotone calibrator anyway (docs/selective.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .calibration import DirichletCalibration, PlattScaling, TemperatureScaling, fit_gate_platt, load_calibrator
from .config import describe_fields
from .guarantees import FNRThreshold, GuaranteeConfig, SCRCConfig, SCRCParams, apply_scrc, fit_scrc, fnr_threshold

POLICIES = ("threshold", "gate", "scrc")
CALIBRATORS = ("none", "temperature", "dirichlet")
SCRC_SCORES = ("gate", "maxprob")


@describe_fields
@dataclass(frozen=True)
class PolicyConfig:
    # threshold | gate | scrc: the decision rule the bundle applies
    policy: Literal["threshold", "gate", "scrc"] = "threshold"
    # none | temperature | dirichlet: calibrator of the reported p(roadwork)
    calibrator: Literal["none", "temperature", "dirichlet"] = "temperature"
    # gate policy: abstain when the calibrated gate's P(argmax prediction correct) is below this
    gate_min_confidence: float = 0.9
    # scrc policy: max FNR among accepted samples, failure probability, minimum coverage
    scrc_alpha: float = 0.05  # max FNR among accepted samples
    scrc_delta: float = 0.1  # probability that the calib draw breaks the certificate
    scrc_xi: float = 0.6  # minimum share of images accepted (coverage)
    # scrc policy: confidence that selects samples: the gate (selective head) or max(p, 1 - p)
    scrc_score: Literal["gate", "maxprob"] = "gate"
    # scrc policy: number of selection thresholds searched (Bonferroni divisor of the risk test)
    scrc_grid_size: int = 10

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.calibrator not in CALIBRATORS:
            raise ValueError(f"calibrator must be one of {CALIBRATORS}, got {self.calibrator!r}")
        if self.scrc_score not in SCRC_SCORES:
            raise ValueError(f"scrc_score must be one of {SCRC_SCORES}, got {self.scrc_score!r}")
        if not 0.0 < self.gate_min_confidence < 1.0:
            raise ValueError("gate_min_confidence must be in (0, 1)")

    def scrc_config(self) -> SCRCConfig:
        low = 0.0 if self.scrc_score == "gate" else 0.5
        return SCRCConfig(alpha=self.scrc_alpha, delta=self.scrc_delta, xi=self.scrc_xi,
                          grid_size=self.scrc_grid_size, conf_low=low, conf_high=1.0)

    def needs_gate(self) -> bool:
        return self.policy == "gate" or (self.policy == "scrc" and self.scrc_score == "gate")


def softmax_positive(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e[:, 1] / e.sum(axis=1)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def fit_calibrator(kind: str, logits: np.ndarray, y: np.ndarray):
    if kind == "temperature":
        return TemperatureScaling().fit(logits, y)
    if kind == "dirichlet":
        return DirichletCalibration().fit(softmax_positive(logits), y)
    return None


def calibrated_positive(calibrator, logits: np.ndarray) -> np.ndarray:
    if calibrator is None:
        return softmax_positive(logits)
    if isinstance(calibrator, TemperatureScaling):
        return np.asarray(calibrator.apply(logits))[:, 1]
    return np.asarray(calibrator.apply(softmax_positive(logits)))


@dataclass
class FittedPolicy:
    policy: str
    threshold: FNRThreshold
    calibrator: TemperatureScaling | DirichletCalibration | None = None
    gate: PlattScaling | None = None
    gate_min_confidence: float | None = None
    scrc: SCRCParams | None = None
    scrc_score: str | None = None

    def files(self) -> dict[str, dict[str, Any]]:
        """The bundle's JSON files for this policy (schemas: thresholds, calibration, gateparams, scrcparams)."""
        out: dict[str, dict[str, Any]] = {
            "thresholds.json": {"policy": "threshold", "score": "p_roadwork_raw", **self.threshold.to_json()},
        }
        if self.calibrator is not None:
            out["calibration.json"] = self.calibrator.to_json()
        if self.gate is not None:
            out["gateparams.json"] = self.gate.to_json()
        if self.scrc is not None:
            out["scrcparams.json"] = {"score": self.scrc_score, **self.scrc.to_json()}
        out["policy.json"] = {"policy": self.policy, "gate_min_confidence": self.gate_min_confidence}
        return out

    @classmethod
    def from_files(cls, files: dict[str, dict[str, Any]]) -> FittedPolicy:
        thr = {k: v for k, v in files["thresholds.json"].items() if k not in ("policy", "score")}
        policy = files.get("policy.json", {"policy": "threshold", "gate_min_confidence": None})
        scrc = files.get("scrcparams.json")
        return cls(
            policy=policy["policy"], threshold=FNRThreshold.from_json(thr),
            calibrator=load_calibrator(files["calibration.json"]) if "calibration.json" in files else None,
            gate=PlattScaling.from_json(files["gateparams.json"]) if "gateparams.json" in files else None,
            gate_min_confidence=policy.get("gate_min_confidence"),
            scrc=SCRCParams.from_json({k: v for k, v in scrc.items() if k != "score"}) if scrc else None,
            scrc_score=scrc["score"] if scrc else None,
        )

    def apply(self, logits: np.ndarray, gate_logit: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per sample: p_raw, p (calibrated), accepted, decision (1/0, -1 when abstaining), set code
        (-1 abstain, 0 {no roadwork}, 1 {roadwork}, 2 {both})."""
        p_raw = softmax_positive(logits)
        p = calibrated_positive(self.calibrator, logits)
        decision = (p_raw >= self.threshold.threshold).astype(np.int64)
        accepted = np.ones(len(p_raw), dtype=bool)
        sets = decision.copy()
        if self.policy == "gate":
            confidence = self.gate.apply(_need_gate(gate_logit))
            accepted = confidence >= self.gate_min_confidence
            decision = (p_raw >= 0.5).astype(np.int64)
            sets = decision.copy()
        elif self.policy == "scrc":
            conf = sigmoid(_need_gate(gate_logit)) if self.scrc_score == "gate" else None
            accepted, sets = apply_scrc(self.scrc, p_raw, conf)
            # a set holding roadwork decides roadwork: missing roadwork is the error the FNR bound controls
            decision = np.where(sets >= 1, 1, 0).astype(np.int64)
        decision = np.where(accepted, decision, -1)
        sets = np.where(accepted, sets, -1)
        return {"p_raw": p_raw, "p": p, "accepted": accepted, "decision": decision, "set": sets}


def _need_gate(gate_logit: np.ndarray | None) -> np.ndarray:
    if gate_logit is None:
        raise ValueError("this policy needs the gate of a selective head (HeadConfig(kind='selective'))")
    return np.asarray(gate_logit, dtype=np.float64)


def fit_policy(logits: np.ndarray, y: np.ndarray, gate_logit: np.ndarray | None, *,
               guarantee: GuaranteeConfig, config: PolicyConfig) -> FittedPolicy:
    """Fit the threshold, the calibrator and the chosen policy on the calib split."""
    y = np.asarray(y).astype(np.int64)
    if config.needs_gate() and gate_logit is None:
        raise ValueError(f"policy {config.policy!r} with scrc_score={config.scrc_score!r} needs a selective head "
                         "(HeadConfig(kind='selective')); this head has no gate")
    p_raw = softmax_positive(logits)
    fitted = FittedPolicy(policy=config.policy, threshold=fnr_threshold(p_raw[y == 1], guarantee),
                          calibrator=fit_calibrator(config.calibrator, logits, y))
    if gate_logit is not None:
        # the gate was trained to accept where the classifier's argmax is right: calibrate it for that
        correct = ((p_raw >= 0.5).astype(np.int64) == y).astype(np.int64)
        if 0 < correct.sum() < len(correct):
            fitted.gate = fit_gate_platt(gate_logit, correct)
        elif config.policy == "gate":
            raise ValueError("cannot calibrate the gate: the calib predictions are all right or all wrong")
    if config.policy == "gate":
        fitted.gate_min_confidence = config.gate_min_confidence
    if config.policy == "scrc":
        conf = sigmoid(gate_logit) if config.scrc_score == "gate" else None
        fitted.scrc = fit_scrc(p_raw, conf, y, config.scrc_config())
        fitted.scrc_score = config.scrc_score
    return fitted
