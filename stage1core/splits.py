"""Stable hash splits: the split of a sample is a pure function of (salt, sample_id).

Because `sample_id` is the sha256 of the image bytes and the bucket comes from sha256 of
`"{salt}:{sample_id}"` (never Python's `hash()`, which is salted per process), adding images never
moves old ones: retraining runs stay comparable and the test split stays a fair judge between
champion and challenger. Changing the salt or the ratios does move samples, so both are recorded in
the split manifest and in its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stage1core.fingerprint import fingerprint
from stage1core.sources import ROLES, DataError, Sample
from stage1core.storage import atomic_write_json

SPLITS = ("train", "val", "calib", "test")
MANIFEST_KIND = "stage1.split_manifest"
_TOLERANCE = 1e-6


@dataclass(frozen=True)
class SplitConfig:
    """Hash-split ratios. val: early stopping and model selection; calib: calibrators and thresholds;
    test: reported once."""

    salt: str = "stage1"  # changing it reshuffles every sample; keep it fixed across retraining runs
    train: float = 0.70  # may be 0 (then only train_only sources train)
    val: float = 0.10  # > 0
    calib: float = 0.10  # > 0
    test: float = 0.10  # > 0

    def __post_init__(self) -> None:
        if not isinstance(self.salt, str):
            raise ValueError(f"SplitConfig.salt must be a string, got {self.salt!r}")
        ratios = self.ratios()
        for name, value in ratios.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"SplitConfig.{name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"SplitConfig.{name} must be >= 0, got {value}")
        for name in ("val", "calib", "test"):
            if ratios[name] <= 0:
                raise ValueError(f"SplitConfig.{name} must be > 0 (every evaluation split needs samples)")
        total = sum(ratios.values())
        if abs(total - 1.0) > _TOLERANCE:
            raise ValueError(f"SplitConfig ratios must sum to 1, got {total} ({ratios})")

    def ratios(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in SPLITS}


def split_unit(sample_id: str, salt: str) -> float:
    """A uniform number in [0, 1) from sha256(f"{salt}:{sample_id}"), the same in every process."""
    digest = hashlib.sha256(f"{salt}:{sample_id}".encode()).hexdigest()
    return int(digest[:16], 16) / 2**64


def assign_split(sample_id: str, config: SplitConfig) -> str:
    """The split of one sample, by cumulative ratios; a pure function of (salt, sample_id, ratios)."""
    u = split_unit(sample_id, config.salt)
    edge = 0.0
    for name in SPLITS[:-1]:
        edge += getattr(config, name)
        if u < edge:
            return name
    return SPLITS[-1]


def make_splits(samples: Sequence[Sample], config: SplitConfig) -> dict[str, list[Sample]]:
    """Split samples by hash; `train_only` samples always go to train. Each list is sorted by sample_id."""
    splits: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    seen: set[str] = set()
    for sample in sorted(samples, key=lambda s: s.sample_id):
        if sample.sample_id in seen:
            raise DataError(f"sample {sample.sample_id} appears twice (at {sample.locator}); split the "
                            "deduplicated SourceScan.samples, not raw scan_source output")
        seen.add(sample.sample_id)
        name = "train" if sample.role == "train_only" else assign_split(sample.sample_id, config)
        splits[name].append(sample)
    return splits


def split_counts(splits: Mapping[str, Sequence[Sample]]) -> dict[str, dict[str, int]]:
    """{"train": {"0": n, "1": n, "total": n}, ...} for every split."""
    counts = {}
    for name in SPLITS:
        samples = splits.get(name, ())
        positives = sum(1 for s in samples if s.label == 1)
        counts[name] = {"0": len(samples) - positives, "1": positives, "total": len(samples)}
    return counts


def splits_fingerprint(splits: Mapping[str, Sequence[Sample]], config: SplitConfig) -> str:
    """sha256 over the config and the sorted (sample_id, label, split) triples."""
    rows = sorted((s.sample_id, s.label, name) for name in SPLITS for s in splits.get(name, ()))
    return fingerprint(config, [list(r) for r in rows])


def write_split_manifest(
    path: str | Path,
    splits: Mapping[str, Sequence[Sample]],
    config: SplitConfig,
    *,
    data_fingerprint: str,
    extra: dict | None = None,
) -> str:
    """Write the split manifest atomically; returns its fingerprint (see `splits_fingerprint`)."""
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split names {unknown}; expected {SPLITS}")
    manifest_fingerprint = splits_fingerprint(splits, config)
    rows = sorted(
        (
            {"sample_id": s.sample_id, "label": s.label, "split": name, "source": s.source,
             "role": s.role, "locator": s.locator}
            for name in SPLITS
            for s in splits.get(name, ())
        ),
        key=lambda r: r["sample_id"],
    )
    atomic_write_json(
        path,
        {
            "kind": MANIFEST_KIND,
            "fingerprint": manifest_fingerprint,
            "config": asdict(config),
            "data_fingerprint": data_fingerprint,
            "counts": split_counts(splits),
            "extra": extra or {},
            "samples": rows,
        },
    )
    return manifest_fingerprint


_SAMPLE_KEYS = ("sample_id", "label", "split", "source", "role", "locator")


def read_split_manifest(path: str | Path) -> tuple[SplitConfig, dict[str, list[Sample]], dict[str, Any]]:
    """(config, splits, full manifest JSON). Raises DataError naming the file when it is malformed,
    or when its content no longer matches the fingerprint it was written with."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the split manifest ({exc}); write it again") from exc
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or not isinstance(
        data.get("samples"), list
    ):
        raise DataError(f"{path}: not a split manifest (needs `config` and `samples`); write it again")
    try:
        config = SplitConfig(**data["config"])
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: invalid split config {data['config']!r} ({exc})") from exc

    splits: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for i, row in enumerate(data["samples"]):
        where = f"{path}, samples[{i}]"
        if not isinstance(row, dict) or any(k not in row for k in _SAMPLE_KEYS):
            raise DataError(f"{where}: each sample needs the keys {_SAMPLE_KEYS}")
        if row["split"] not in SPLITS or row["role"] not in ROLES:
            raise DataError(f"{where}: split {row['split']!r} or role {row['role']!r} is not valid")
        label = row["label"]
        if isinstance(label, bool) or label not in (0, 1):
            raise DataError(f"{where}: label {label!r} is not 0 or 1")
        if not all(isinstance(row[k], str) for k in ("sample_id", "source", "locator")):
            raise DataError(f"{where}: sample_id, source and locator must be strings")
        splits[row["split"]].append(
            Sample(row["sample_id"], int(label), row["source"], row["role"], row["locator"])
        )
    for samples in splits.values():
        samples.sort(key=lambda s: s.sample_id)
    stored = data.get("fingerprint")
    if stored is not None and stored != splits_fingerprint(splits, config):
        raise DataError(f"{path}: content does not match its fingerprint {stored} (edited by hand or "
                        "truncated?); regenerate it with write_split_manifest")
    return config, splits, data
