"""Group-aware hash splits, stable as data grows.

A split is chosen per group: the images of one drive or session (a source's group column) and the
near-duplicates found by perceptual hash (`stage1core.near_duplicates`) always land in one split, so
near-identical frames never sit on both sides of train/test or calib/test. An image in no group is a
group of one, and its split is exactly what it always was: a pure function of sha256(f"{salt}:{sample_id}")
(hashlib, never Python's salted `hash()`). A larger group hashes a deterministic anchor instead: its
smallest group-column id, else its smallest sample_id.

Stability as data grows comes from pinning: images already assigned in the previous manifest made with
the same config keep their split, and a new image that joins a group takes the split of the group's
pinned images. When a new image links groups that already sit in different splits (a bridge), old
images never move: the new images of that group take the split holding most of its pinned images
(ties: train, val, calib, test in that order), and the bridge is counted in the manifest.
Changing the salt, the ratios or the grouping settings moves samples, so all are recorded in the split
manifest and in its fingerprint. See docs/splits.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stage1core.fingerprint import fingerprint
from stage1core.sources import ROLES, DataError, Sample
from stage1core.storage import atomic_write_json

from .config import describe_fields

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "calib", "test")
MANIFEST_KIND = "stage1.split_manifest"
LINEAGE_KIND = "stage1.split_lineage"
LINEAGE_DIR = "latest"  # under the splits folder: one small file per split config naming its latest manifest
MAX_RADIUS = 24  # beyond this, unrelated images' pHashes meet everywhere (random pairs differ in ~32 of 64 bits)
_TOLERANCE = 1e-6


@describe_fields
@dataclass(frozen=True)
class SplitConfig:
    """Hash-split ratios. val: early stopping and model selection; calib: calibrators and thresholds;
    test: reported once."""

    salt: str = "stage1"  # changing it reshuffles every sample; keep it fixed across retraining runs
    train: float = 0.70  # share of images in train; may be 0 (then only train_only sources train)
    val: float = 0.10  # share in val (early stopping, head selection); > 0
    calib: float = 0.10  # share in calib (calibrators, guaranteed thresholds); > 0
    test: float = 0.10  # share in test (reported once, judges champion and challenger); > 0
    # group near-duplicate images (perceptual hashes within near_duplicate_radius), so they share a split
    near_duplicates: bool = True
    # most of the 64 pHash bits two images may differ in to be linked as near-duplicates (docs/splits.md)
    near_duplicate_radius: int = 10
    # most bits any two images of one near-duplicate group may differ in: stops look-alikes from chaining
    near_duplicate_diameter: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.salt, str):
            raise ValueError(f"SplitConfig.salt must be a string, got {self.salt!r}")
        if not isinstance(self.near_duplicates, bool):
            raise ValueError(f"SplitConfig.near_duplicates must be true or false, got {self.near_duplicates!r}")
        for name in ("near_duplicate_radius", "near_duplicate_diameter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RADIUS:
                raise ValueError(f"SplitConfig.{name} must be an integer in [0, {MAX_RADIUS}] (bits of 64), "
                                 f"got {value!r}")
        if self.near_duplicate_diameter < self.near_duplicate_radius:
            raise ValueError(f"SplitConfig.near_duplicate_diameter ({self.near_duplicate_diameter}) must be >= "
                             f"near_duplicate_radius ({self.near_duplicate_radius}): linked images are that close")
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
    """The split of one sample (or group anchor), by cumulative ratios; a pure function of
    (salt, sample_id, ratios)."""
    u = split_unit(sample_id, config.salt)
    edge = 0.0
    for name in SPLITS[:-1]:
        edge += getattr(config, name)
        if u < edge:
            return name
    return SPLITS[-1]


@dataclass(frozen=True)
class GroupStats:
    """How the samples were grouped and split; recorded in the split manifest."""

    n_groups: int  # groups over all samples; an image in no group and with no near-duplicate is a group of one
    largest_group: int  # images in the largest group
    grouped_samples: int  # images in groups of two or more
    column_groups: int  # distinct group-column ids (drives, sessions)
    links: int  # links given (near-duplicate pairs, images listed under two group ids)
    pinned: int  # images that kept their split from the parent manifest
    bridges: int  # groups whose pinned images sit in several splits (joined by new images; old ones never move)
    groups_across_splits: int  # groups with images in several splits: bridges, or train_only images in an eval group
    pairs_across_splits: int  # linked or loose near-duplicate pairs whose two images landed in different splits


@dataclass(frozen=True)
class SplitPlan:
    splits: dict[str, list[Sample]]  # split name -> samples, each list sorted by sample_id
    group_of: dict[str, str]  # sample_id -> its group's anchor (the key hashed when nothing is pinned)
    stats: GroupStats


def _connected_groups(ordered: Sequence[Sample], links: Sequence[tuple[int, int]]) -> tuple[int, np.ndarray, int]:
    """(number of groups, group label of each sample, number of group-column ids): the connected
    components of "shares a group-column id" and the `links` (index pairs into `ordered`)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges_a: list[int] = []
    edges_b: list[int] = []
    first_of: dict[str, int] = {}
    for i, sample in enumerate(ordered):
        if sample.group:
            edges_a.append(first_of.setdefault(sample.group, i))
            edges_b.append(i)
    for a, b in links:
        edges_a.append(a)
        edges_b.append(b)
    n = len(ordered)
    graph = coo_matrix((np.ones(len(edges_a), dtype=np.int32), (edges_a, edges_b)), shape=(n, n))
    n_groups, labels = connected_components(graph, directed=False)
    return n_groups, labels, len(first_of)


def plan_splits(
    samples: Sequence[Sample],
    config: SplitConfig,
    *,
    links: Iterable[tuple[str, str]] = (),
    pinned: Mapping[str, str] | None = None,
    loose_pairs: Iterable[tuple[str, str]] = (),
) -> SplitPlan:
    """Split samples so that every group lands in one split.

    Groups are the connected components of: samples sharing a group-column id (`Sample.group`) and the
    sample_id pairs in `links` (near-duplicates; links naming unknown samples are ignored).
    `loose_pairs` (near-duplicates that were not linked) do not group; those that end up in different
    splits are counted with the links that do (`pairs_across_splits`: the leakage left). `pinned`
    (sample_id -> split, from the parent manifest) fixes the split of samples seen before. Per group:
    pinned samples keep their split; the others take the split holding most of the group's pinned
    samples (ties: earlier in SPLITS); a group with nothing pinned goes to train if it holds a
    `train_only` sample, else to assign_split(anchor). `train_only` samples always go to train.
    With no groups, links or pins, every sample gets exactly assign_split(sample_id).
    """
    ordered = sorted(samples, key=lambda s: s.sample_id)
    index: dict[str, int] = {}
    for i, sample in enumerate(ordered):
        if sample.sample_id in index:
            raise DataError(f"sample {sample.sample_id} appears twice (at {sample.locator}); split the "
                            "deduplicated SourceScan.samples, not raw scan_source output")
        index[sample.sample_id] = i
    pinned = dict(pinned or {})
    bad = sorted({name for name in pinned.values() if name not in SPLITS})
    if bad:
        raise ValueError(f"pinned splits {bad} are not split names {SPLITS}")

    known = [(index[a], index[b]) for a, b in links if a in index and b in index]
    n_groups, labels, column_groups = _connected_groups(ordered, known)
    n = len(ordered)

    splits: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    group_of: dict[str, str] = {}
    n_pinned = bridges = across = largest = grouped = 0
    order = np.argsort(labels, kind="stable")  # members of a group stay in sample_id order
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for members_idx in np.split(order, bounds) if n else []:
        members = [ordered[i] for i in members_idx]
        column_ids = sorted({m.group for m in members if m.group})
        anchor = column_ids[0] if column_ids else members[0].sample_id
        kept = {m.sample_id: pinned[m.sample_id] for m in members if m.sample_id in pinned
                and (m.role != "train_only" or pinned[m.sample_id] == "train")}
        votes = Counter(kept.values())
        if votes:
            choice = max(SPLITS, key=lambda name: (votes[name], -SPLITS.index(name)))
            bridges += len(votes) > 1
        elif any(m.role == "train_only" for m in members):
            choice = "train"
        else:
            choice = assign_split(anchor, config)
        used = set()
        for m in members:
            name = "train" if m.role == "train_only" else kept.get(m.sample_id, choice)
            splits[name].append(m)
            group_of[m.sample_id] = anchor
            used.add(name)
        n_pinned += len(kept)
        across += len(used) > 1
        largest = max(largest, len(members))
        grouped += len(members) if len(members) > 1 else 0
    split_of = {s.sample_id: name for name, rows in splits.items() for s in rows}
    watched = [(ordered[a].sample_id, ordered[b].sample_id) for a, b in known]
    watched += [(a, b) for a, b in loose_pairs if a in index and b in index]
    apart = sum(split_of[a] != split_of[b] for a, b in watched)
    for rows in splits.values():
        rows.sort(key=lambda s: s.sample_id)
    stats = GroupStats(n_groups=int(n_groups) if n else 0, largest_group=largest, grouped_samples=grouped,
                       column_groups=column_groups, links=len(known), pinned=n_pinned, bridges=bridges,
                       groups_across_splits=across, pairs_across_splits=apart)
    return SplitPlan(splits=splits, group_of=group_of, stats=stats)


def make_splits(
    samples: Sequence[Sample],
    config: SplitConfig,
    *,
    links: Iterable[tuple[str, str]] = (),
    pinned: Mapping[str, str] | None = None,
) -> dict[str, list[Sample]]:
    """Split samples by group (see `plan_splits`); `train_only` samples always go to train. Each list is
    sorted by sample_id. Without groups, links or pins: assign_split(sample_id) per sample."""
    return plan_splits(samples, config, links=links, pinned=pinned).splits


def pinned_splits(splits: Mapping[str, Sequence[Sample]]) -> dict[str, str]:
    """sample_id -> split name, the pins a manifest's splits give the next run."""
    return {s.sample_id: name for name, rows in splits.items() for s in rows}


def samples_of(splits: Mapping[str, Sequence[Sample]], split: str) -> list[Sample]:
    """The samples an evaluation on `split` scores: one split's evaluable samples (`train_only` sources
    are not the target distribution), or with `all` every image of the sources, train and
    `train_only` included (optimistic for a model trained on them: it has seen those images)."""
    if split == "all":
        return [s for name in SPLITS for s in splits.get(name, ())]
    if split not in SPLITS:
        raise ValueError(f"split must be one of {(*SPLITS, 'all')}, got {split!r}")
    return [s for s in splits.get(split, ()) if s.role != "train_only"]


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
    group_of: Mapping[str, str] | None = None,
    groups: Mapping[str, Any] | None = None,
    parent: Mapping[str, Any] | None = None,
) -> str:
    """Write the split manifest atomically; returns its fingerprint (see `splits_fingerprint`).

    Each sample row records its group-column id (`group`) and the anchor of the group that decided its
    split (`split_group`, from `group_of`; the sample_id itself when not given). `groups` (group
    statistics) and `parent` (the manifest whose splits were pinned) are recorded as given.
    """
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split names {unknown}; expected {SPLITS}")
    manifest_fingerprint = splits_fingerprint(splits, config)
    group_of = group_of or {}
    rows = sorted(
        (
            {"sample_id": s.sample_id, "label": s.label, "split": name, "source": s.source,
             "role": s.role, "locator": s.locator, "group": s.group, "row": s.row,
             "split_group": group_of.get(s.sample_id, s.sample_id)}
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
            "groups": dict(groups or {}),
            "parent": dict(parent) if parent else None,
            "extra": extra or {},
            "samples": rows,
        },
    )
    return manifest_fingerprint


_SAMPLE_KEYS = ("sample_id", "label", "split", "source", "role", "locator")  # `group` is optional (older manifests)


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
        if not all(isinstance(row.get(k, ""), str) for k in ("sample_id", "source", "locator", "group")):
            raise DataError(f"{where}: sample_id, source, locator and group must be strings")
        line = row.get("row")  # optional (older manifests)
        if line is not None and (isinstance(line, bool) or not isinstance(line, int) or line < 0):
            raise DataError(f"{where}: row {line!r} is not a row number")
        splits[row["split"]].append(
            Sample(row["sample_id"], int(label), row["source"], row["role"], row["locator"], row.get("group", ""),
                   line)
        )
    for samples in splits.values():
        samples.sort(key=lambda s: s.sample_id)
    stored = data.get("fingerprint")
    # checked against the config as written: a manifest from before a SplitConfig field existed stays valid
    rows = sorted((s.sample_id, s.label, name) for name in SPLITS for s in splits[name])
    if stored is not None and stored != fingerprint(data["config"], [list(r) for r in rows]):
        raise DataError(f"{path}: content does not match its fingerprint {stored} (edited by hand or "
                        "truncated?); regenerate it with write_split_manifest")
    return config, splits, data


# ----------------------------------------------------------------------------------------------- lineage


def _lineage_file(splits_dir: Path, config: SplitConfig) -> Path:
    return Path(splits_dir) / LINEAGE_DIR / f"{fingerprint(config)[:24]}.json"


def record_latest_manifest(splits_dir: str | Path, config: SplitConfig, manifest: str | Path) -> None:
    """Remember `manifest` (a file in splits_dir) as the latest made with `config`: the next run pins it."""
    atomic_write_json(_lineage_file(Path(splits_dir), config),
                      {"kind": LINEAGE_KIND, "config": asdict(config), "manifest": Path(manifest).name})


def latest_manifest(splits_dir: str | Path, config: SplitConfig) -> Path | None:
    """The latest split manifest written under splits_dir with exactly this config, or None.

    A record naming a manifest that was deleted starts a new lineage (logged): the next split is made
    as if for the first time. An unreadable record is a DataError naming the file.
    """
    record = _lineage_file(Path(splits_dir), config)
    if not record.exists():
        return None
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        name = data["manifest"]
        same = data["config"] == asdict(config)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{record}: unreadable split lineage record ({exc}); delete it to start a new "
                        "lineage (old images may then change split)") from exc
    if not same or not isinstance(name, str) or Path(name).name != name:
        raise DataError(f"{record}: not a lineage record for this split config; delete it")
    path = Path(splits_dir) / name
    if not path.exists():
        log.warning("%s names %s, which no longer exists: splits start a new lineage", record, path)
        return None
    return path


def parent_pins(splits_dir: str | Path, config: SplitConfig, *, output: str | Path
                ) -> tuple[dict[str, str], dict[str, Any] | None]:
    """(pins, parent record) for a new manifest at `output`: the splits of the latest manifest made with
    this config, and {"path", "fingerprint"} of that manifest.

    When the latest is `output` itself (the same data split again), it is made again from its own
    parent, so a rerun writes the same bytes (bundles record the manifest's sha256) and a manifest
    never names itself; if that parent is gone, the manifest's own splits are the pins.
    """
    previous = latest_manifest(splits_dir, config)
    if previous is None:
        return {}, None
    _, parts, data = read_split_manifest(previous)
    if fingerprint(data["config"]) != fingerprint(config):
        raise DataError(f"{previous}: its split config differs from the lineage record's; delete "
                        f"{_lineage_file(Path(splits_dir), config)} to start a new lineage")
    if Path(previous).resolve() != Path(output).resolve():
        return pinned_splits(parts), {"path": str(previous), "fingerprint": data.get("fingerprint")}
    parent = data.get("parent")
    if not parent:
        return {}, None  # the first of its lineage: made again from scratch, as it was
    grandparent = Path(str(parent.get("path", "")))
    if grandparent.is_file():
        _, grand_parts, grand_data = read_split_manifest(grandparent)
        if fingerprint(grand_data["config"]) == fingerprint(config):
            return pinned_splits(grand_parts), parent
    return pinned_splits(parts), parent
