"""Scanning sources: every image of class folders, label files and parquet shards hashed into a `Sample`,
and the sources merged into one `SourceScan` with duplicates collapsed."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from stage1core.fingerprint import sha256_bytes, sha256_file

from .label_files import group_value, parse_label, read_label_file
from .reading import image_bytes_column
from .records import (
    CLASS_FOLDERS,
    IMAGE_SUFFIXES,
    PARQUET_ROW_MARK,
    DataError,
    LabelConflictError,
    Sample,
    SourceConfig,
    SourceScan,
)

log = logging.getLogger(__name__)


def group_key(source: str, value: str) -> str:
    """A group id namespaced by its source, so drive 17 of one source is not drive 17 of another."""
    return f"{source}:{value}" if value else ""


def _hash_workers() -> int:
    return min(32, 4 * (os.cpu_count() or 1))


def _hash_files(paths: Sequence[str]) -> list[str | Exception]:
    """sha256 of each file (threads: hashlib and file reads release the GIL); errors are returned."""

    def one(path: str) -> str | Exception:
        try:
            if os.path.getsize(path) == 0:
                return OSError("empty file (0 bytes)")
            return sha256_file(path)
        except OSError as exc:
            return exc

    if len(paths) < 16:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=_hash_workers()) as pool:
        return list(pool.map(one, paths))


def _reason(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(exc, PermissionError):
        return "unreadable: permission denied"
    return f"unreadable: {exc}"


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _scan_files(
    config: SourceConfig, entries: Sequence[tuple[str, int, int | None, str]]
) -> tuple[list[Sample], list[dict]]:
    """Hash (abs path, label, row, group) entries into samples; unreadable files go to quarantine."""
    digests = _hash_files([path for path, _, _, _ in entries])
    samples, quarantined = [], []
    for (path, label, row, group), digest in zip(entries, digests, strict=True):
        if isinstance(digest, Exception):
            reason = _reason(digest)
            quarantined.append({"locator": path, "source": config.name, "row": row, "reason": reason})
        else:
            samples.append(Sample(digest, label, config.name, config.role, path, group_key(config.name, group), row))
    return samples, quarantined


def _class_folders(root: Path) -> tuple[list[tuple[Path, int]], list[Path]]:
    """The class folders under `root` with their labels, sorted, and the other folders there."""
    classes, others = [], []
    for child in sorted(root.iterdir()):
        if _is_hidden(child.name) or not child.is_dir():
            continue
        label = CLASS_FOLDERS.get(child.name.lower())
        if label is None:
            others.append(child)
        else:
            classes.append((child, label))
    return classes, others


def _folder_images(folder: Path) -> list[str]:
    """The image files under a class folder, recursively and sorted; hidden files and folders left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        found += [os.path.join(dirpath, name) for name in sorted(filenames)
                  if not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES]
    return found


def _scan_folder(config: SourceConfig, root: Path) -> tuple[list[Sample], list[dict]]:
    if config.group_column:
        raise DataError(f"{root}: class folders carry no group column, but group_column="
                        f"{config.group_column!r} is set; list the images in a CSV/JSON label file or parquet "
                        f"with a {config.group_column!r} column, or unset group_column")
    classes, others = _class_folders(root)
    for child in others:
        log.warning("source %s: ignoring folder %s (not a class folder)", config.name, child)
    if not classes:
        raise DataError(
            f"{root}: no class folders; expected subfolders named "
            f"{', '.join(sorted(CLASS_FOLDERS))} holding the images"
        )
    entries = [(path, label, None, "") for folder, label in classes for path in _folder_images(folder)]
    return _scan_files(config, entries)


def _scan_label_file(config: SourceConfig, path: Path, kind: str) -> tuple[list[Sample], list[dict]]:
    rows = read_label_file(path, kind, group_column=config.group_column)
    base = path.parent
    entries = [(os.path.abspath(base / r.path), r.label, r.row, r.group) for r in rows]
    return _scan_files(config, entries)


def _parquet_shards(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    shards = sorted(
        p for p in path.rglob("*.parquet")
        if p.is_file() and not any(_is_hidden(part) for part in p.relative_to(path).parts)
    )
    if not shards:
        raise DataError(f"{path}: no *.parquet shards found; point the source at a parquet file or folder")
    return shards


def _scan_parquet(config: SourceConfig, path: Path) -> tuple[list[Sample], list[dict]]:
    import pyarrow.parquet as pq

    samples, quarantined = [], []
    for shard in _parquet_shards(path):
        try:
            pf = pq.ParquetFile(shard)
            names = pf.schema_arrow.names
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for corrupt or non-parquet files
            raise DataError(f"{shard}: not a readable parquet file ({exc}); fetch the shard again") from exc
        missing = [c for c in ("image", "label") if c not in names]
        if missing:
            raise DataError(f"{shard}: missing column(s) {missing}; has {names}. Expected the Hugging Face "
                            "natix-network-org/roadwork layout: `image` {bytes, path} and `label` 0/1")
        group_col = config.group_column or "group"
        if config.group_column and group_col not in names:
            raise DataError(f"{shard}: no group column {group_col!r}; has {names}. Add the column or fix "
                            "SourceConfig.group_column")
        columns = ["image", "label"] + ([group_col] if group_col in names else [])
        row = 0
        try:
            batches = pf.iter_batches(columns=columns, batch_size=256)
            for batch in batches:
                images = image_bytes_column(batch, shard)
                labels = batch.column("label").to_pylist()
                groups = batch.column(group_col).to_pylist() if len(columns) == 3 else [None] * len(labels)
                for i, label in enumerate(labels):
                    locator = f"{shard}{PARQUET_ROW_MARK}{row}"
                    where = f"{shard}, row {row}"
                    value = parse_label(label, where=where)
                    group = group_key(config.name, group_value(groups[i], where=where))
                    scalar = images[i]
                    data = scalar.as_py() if scalar.is_valid else None
                    if not data:
                        quarantined.append({"locator": locator, "source": config.name, "row": row,
                                            "reason": "no image bytes in this row"})
                    else:
                        samples.append(Sample(sha256_bytes(data), value, config.name, config.role, locator, group,
                                              row))
                    row += 1
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{shard}, row {row}: cannot read the shard ({exc}); download it again") from exc
    return samples, quarantined


def _resolve_kind(config: SourceConfig, path: Path) -> str:
    if config.kind != "auto":
        return config.kind
    if path.is_dir():
        try:
            children = [c for c in path.iterdir() if not _is_hidden(c.name)]
        except OSError as exc:
            raise DataError(f"{path}: cannot list the folder ({exc})") from exc
        if any(c.is_dir() and c.name.lower() in CLASS_FOLDERS for c in children):
            return "folder"
        if any(path.rglob("*.parquet")):
            return "parquet"
        raise DataError(f"{path}: neither class folders ({', '.join(sorted(CLASS_FOLDERS))}) nor *.parquet "
                        "shards; set `kind` or point at the right folder")
    suffix = path.suffix.lower()
    kinds = {".csv": "csv", ".json": "json", ".parquet": "parquet"}
    if suffix not in kinds:
        raise DataError(f"{path}: cannot tell the source kind from the suffix {suffix!r}; "
                        "set kind to folder, csv, json or parquet")
    return kinds[suffix]


def _locate(config: SourceConfig) -> tuple[Path, str]:
    """The source's absolute path and its kind, checked against what is at the path."""
    path = Path(config.path).expanduser().absolute()
    if not path.exists():
        raise DataError(f"source {config.name!r}: {path} does not exist; fix the path in the source config")
    kind = _resolve_kind(config, path)
    if kind == "folder" and not path.is_dir():
        raise DataError(f"{path}: kind 'folder' needs a directory of class folders")
    if kind in ("csv", "json") and not path.is_file():
        raise DataError(f"{path}: kind {kind!r} needs a label file")
    return path, kind


def _scan(config: SourceConfig) -> tuple[list[Sample], list[dict]]:
    path, kind = _locate(config)
    if kind == "folder":
        return _scan_folder(config, path)
    if kind in ("csv", "json"):
        return _scan_label_file(config, path, kind)
    return _scan_parquet(config, path)


def scan_source(config: SourceConfig) -> list[Sample]:
    """Every readable sample of one source, in file/row order; may contain duplicates."""
    samples, quarantined = _scan(config)
    for q in quarantined:
        log.warning("source %s: quarantined %s (row %s): %s", q["source"], q["locator"], q["row"],
                    q["reason"])
    return samples


def count_images(config: SourceConfig) -> dict[str, Any]:
    """How many labelled images a source lists, without reading them: image files in the class folders,
    rows of a CSV/JSON label file, rows of the parquet shards. Label files, manifests and other files
    beside the images are not images and are not counted. Returns {"kind", "n_images", "n_roadwork"}."""
    path, kind = _locate(config)
    labels: list[int] = []
    if kind == "folder":
        classes, _ = _class_folders(path)
        labels = [label for folder, label in classes for _ in _folder_images(folder)]
    elif kind in ("csv", "json"):
        labels = [r.label for r in read_label_file(path, kind, group_column=config.group_column)]
    else:
        import pyarrow.parquet as pq

        for shard in _parquet_shards(path):
            try:
                column = pq.read_table(shard, columns=["label"]).column("label").to_pylist()
            except Exception as exc:  # pyarrow raises ArrowInvalid/KeyError/OSError for bad shards
                raise DataError(f"{shard}: cannot read the `label` column ({exc})") from exc
            labels += [parse_label(v, where=f"{shard}, row {i}") for i, v in enumerate(column)]
    return {"kind": kind, "n_images": len(labels), "n_roadwork": int(sum(labels))}


def load_sources(configs: Sequence[SourceConfig]) -> SourceScan:
    """Scan all sources and collapse duplicate images (same bytes) into one sample each.

    A duplicate keeps its first copy (in config order), except that a copy with role `all` wins over
    `train_only` copies, so an image that is also in the target data is never held out of evaluation.
    Duplicates with different labels raise LabelConflictError (a DataError) naming both locations of
    the first and listing every conflict of the scan. A copy that carries a group
    id hands it to a kept copy without one; a copy in another group links the two groups (`links`).
    """
    if not configs:
        raise DataError("no sources configured; give at least one SourceConfig")
    names = [c.name for c in configs]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise DataError(f"source names {clashes} are used twice; give each SourceConfig a distinct name")
    merged: dict[str, Sample] = {}
    duplicates = 0
    quarantined: list[dict] = []
    also_in: list[tuple[str, str]] = []  # (sample_id, group) memberships of collapsed copies
    conflicts: list[dict] = []  # every copy whose label differs from the first copy's
    for config in configs:
        samples, bad = _scan(config)
        quarantined.extend(bad)
        for sample in samples:
            kept = merged.get(sample.sample_id)
            if kept is None:
                merged[sample.sample_id] = sample
                continue
            duplicates += 1
            if kept.label != sample.label:
                conflicts.append({"sample_id": sample.sample_id, "locator": sample.locator, "source": sample.source,
                                  "row": sample.row, "label": sample.label, "other_locator": kept.locator,
                                  "other_source": kept.source, "other_label": kept.label})
                continue
            winner, loser = (sample, kept) if kept.role != "all" and sample.role == "all" else (kept, sample)
            if not winner.group and loser.group:
                winner = dataclasses.replace(winner, group=loser.group)
            elif loser.group and loser.group != winner.group:
                also_in.append((sample.sample_id, loser.group))
            merged[sample.sample_id] = winner
    if conflicts:
        first = conflicts[0]
        more = f" ({len(conflicts) - 1} more conflicts)" if len(conflicts) > 1 else ""
        raise LabelConflictError(
            f"the same image (sha256 {first['sample_id'][:12]}...) has label {first['other_label']} at "
            f"{first['other_locator']} and label {first['label']} at {first['locator']}{more}; fix one of the labels "
            "or remove one copy", conflicts=conflicts, quarantined=quarantined)
    if quarantined:
        log.warning("%d rows quarantined (missing or unreadable files)", len(quarantined))
    samples = sorted(merged.values(), key=lambda s: s.sample_id)
    member: dict[str, str] = {}  # group -> its first sample
    for s in samples:
        if s.group:
            member.setdefault(s.group, s.sample_id)
    links = [(sid, member[group]) for sid, group in also_in if member.get(group, sid) != sid]
    return SourceScan(samples, duplicates, quarantined, links)

