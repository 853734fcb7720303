"""Labelled images from several sources: class folders, CSV/JSON label files, Hugging Face parquet shards.

Every image becomes one `Sample` whose `sample_id` is the sha256 of its bytes, so the same picture
reached through two sources (or twice in one) collapses to one sample and can never sit in two splits.
A `locator` says where the bytes live: an absolute file path, or `<abs parquet path>#row=<i>`;
`read_bytes(locator)` fetches them again, from any process (DataLoader workers included).

Bad input raises `DataError` naming the file, the row and what to do. The one exception is a label
file row whose image file is missing or unreadable: it is quarantined (reported, not fatal), because
exported datasets often lose a few files and the caller decides what fraction is acceptable.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import io
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stage1core.config import describe_fields
from stage1core.fingerprint import fingerprint as _fingerprint
from stage1core.fingerprint import sha256_bytes, sha256_file

log = logging.getLogger(__name__)

ROLES = ("all", "train_only")  # train_only: extra positives used for training only, never val/calib/test
KINDS = ("auto", "folder", "csv", "json", "parquet")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
# class-folder names (compared lower-case) and the label they carry
CLASS_FOLDERS = {
    "roadwork": 1,
    "1": 1,
    "positive": 1,
    "no_roadwork": 0,
    "0": 0,
    "negative": 0,
}
PATH_COLUMNS = ("image_path", "filename", "path", "image")  # accepted names of the path column, in priority
LABEL_NAMES = {"roadwork": 1, "no_roadwork": 0, "1": 1, "0": 0}
PARQUET_ROW_MARK = "#row="


class DataError(ValueError):
    """A source that cannot be used as given; the message names the file, the row and what to do."""


class LabelConflictError(DataError):
    """The same image (same bytes) carries different labels. `conflicts` lists every one found in the
    scan (not only the first), `quarantined` the rows quarantined by the same scan, so that a report
    can be written before the run stops."""

    def __init__(self, message: str, *, conflicts: list[dict], quarantined: list[dict]):
        super().__init__(message)
        self.conflicts = conflicts
        self.quarantined = quarantined


@describe_fields
@dataclass(frozen=True)
class SourceConfig:
    """One labelled-image source."""

    path: str  # a class-folder root, a .csv / .json label file, a .parquet file or a folder of parquet shards
    # class folders, a CSV or JSON label file, or parquet shards; auto: decided from the path
    kind: Literal["auto", "folder", "csv", "json", "parquet"] = "auto"
    role: Literal["all", "train_only"] = "all"  # all | train_only (extra training positives, never in val/calib/test)
    name: str = ""  # source name in samples and reports; defaults to the path's basename
    # CSV column, JSON key or parquet column holding a group id (drive, session): images of one group
    # always share a split. "" uses a column named `group` when there is one; class folders have none
    group_column: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
            raise DataError(f"SourceConfig.path must be a non-empty path, got {self.path!r}")
        object.__setattr__(self, "path", str(self.path))
        if self.kind not in KINDS:
            raise DataError(f"source {self.path}: kind {self.kind!r} is not one of {KINDS}")
        if self.role not in ROLES:
            raise DataError(f"source {self.path}: role {self.role!r} is not one of {ROLES}")
        if not self.name:
            object.__setattr__(self, "name", Path(self.path).name or str(self.path))
        if not isinstance(self.group_column, str):
            raise DataError(f"source {self.path}: group_column must be a column name (a string), "
                            f"got {self.group_column!r}")
        object.__setattr__(self, "group_column", self.group_column.strip())


@dataclass(frozen=True)
class Sample:
    sample_id: str  # sha256 of the image bytes
    label: int  # 0 no roadwork, 1 roadwork
    source: str  # source name
    role: str  # all | train_only
    locator: str  # absolute file path, or "<abs parquet path>#row=<i>"
    group: str = ""  # "<source name>:<group id>" from the source's group column; "" when it has none


def group_key(source: str, value: str) -> str:
    """A group id namespaced by its source, so drive 17 of one source is not drive 17 of another."""
    return f"{source}:{value}" if value else ""


@dataclass
class SourceScan:
    samples: list[Sample]  # unique by sample_id, sorted by sample_id
    duplicates: int  # rows collapsed into an earlier copy of the same bytes
    quarantined: list[dict] = field(default_factory=list)  # {"locator", "source", "row", "reason"}
    # sample_id pairs that must share a group: an image listed under two group ids joins both groups
    links: list[tuple[str, str]] = field(default_factory=list)

    def fingerprint(self) -> str:
        """The data fingerprint: sha256 over the sorted (sample_id, label, role[, group]) rows; the group
        is left out when empty, so ungrouped data keeps the fingerprint it always had."""
        return _fingerprint([[s.sample_id, s.label, s.role] + ([s.group] if s.group else [])
                             for s in self.samples])

    @property
    def quarantined_fraction(self) -> float:
        """Quarantined rows over all rows seen (usable, duplicate and quarantined)."""
        total = len(self.samples) + self.duplicates + len(self.quarantined)
        return len(self.quarantined) / total if total else 0.0


# ----------------------------------------------------------------------------------------------- labels


def parse_label(value: Any, *, where: str) -> int:
    """0/1 ints, "0"/"1", or "roadwork"/"no_roadwork" (case and surrounding spaces ignored)."""
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_NAMES:
        return LABEL_NAMES[value.strip().lower()]
    raise DataError(
        f"{where}: label {value!r} is not one of 0, 1, '0', '1', 'roadwork', 'no_roadwork'; "
        "fix the label or drop the row"
    )


@dataclass(frozen=True)
class LabelRow:
    """One row of a label file, before its image is read."""

    row: int  # CSV: 1-based line in the file; JSON: 0-based entry index
    path: str  # as written in the file
    label: int
    group: str = ""  # the group column's value as written (not yet namespaced by source); "" for none


def _group_value(value: Any, *, where: str) -> str:
    """A group id from a JSON or parquet cell: a string or an integer; null or "" means no group."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: group {value!r} is not a string or an integer id; fix the value or leave it "
                    "empty for an image with no group")


def parse_csv_labels(text: str, *, origin: str, group_column: str = "") -> list[LabelRow]:
    """Parse `image_path,label` CSV text, with or without a header.

    A header is recognised when its cells name a path column (image_path, filename, path or image) and
    `label`; without one, every row is exactly `path,label`. With a header, the column `group_column`
    (default: `group`, when present) gives each row's group id; an empty cell means no group.
    Raises DataError on anything malformed, and when a configured group column is missing.
    """
    try:
        rows = [(i + 1, r) for i, r in enumerate(csv.reader(io.StringIO(text, newline=""))) if r]
    except csv.Error as exc:
        raise DataError(f"{origin}: not a readable CSV file ({exc}); export it again as plain CSV") from exc
    rows = [(n, r) for n, r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"{origin}: no rows; expected lines of `image_path,label`")

    first_line, first = rows[0]
    names = [cell.strip().lower() for cell in first]
    path_col = next((names.index(c) for c in PATH_COLUMNS if c in names), None)
    label_col = names.index("label") if "label" in names else None
    has_header = path_col is not None and label_col is not None
    if has_header:
        width, body = len(first), rows[1:]
    elif path_col is not None or label_col is not None or len(first) != 2:
        raise DataError(
            f"{origin}, row {first_line}: header {first!r} needs a path column "
            f"({', '.join(PATH_COLUMNS)}) and a `label` column; without a header every row is `path,label`"
        )
    else:
        if group_column:
            raise DataError(f"{origin}: group column {group_column!r} is configured but the file has no header; "
                            f"add a header row such as `image_path,label,{group_column}`")
        path_col, label_col, width, body = 0, 1, 2, rows
        try:
            parse_label(first[1], where="")
        except DataError:
            raise DataError(
                f"{origin}, row {first_line}: {first!r} is neither a header (a path column "
                f"{', '.join(PATH_COLUMNS)} and `label`) nor a `path,label` row with a 0/1 label"
            ) from None
    if not body:
        raise DataError(f"{origin}: a header and no data rows; add `path,label` lines")
    group_col = None
    if has_header:
        wanted = (group_column or "group").lower()
        group_col = names.index(wanted) if wanted in names else None
        if group_column and group_col is None:
            raise DataError(f"{origin}, row {first_line}: no group column {group_column!r} in the header "
                            f"{first!r}; add the column or fix SourceConfig.group_column")

    out = []
    for line, r in body:
        where = f"{origin}, row {line}"
        if len(r) != width:
            expected = f"the header has {width}" if has_header else "headerless rows have 2 (path,label)"
            raise DataError(f"{where}: {len(r)} fields where {expected}; quote paths that contain commas")
        path = r[path_col].strip()
        if not path or "\x00" in path:
            raise DataError(f"{where}: empty or invalid image path {r[path_col]!r}; fix it or drop the row")
        group = r[group_col].strip() if group_col is not None else ""
        out.append(LabelRow(line, path, parse_label(r[label_col], where=where), group))
    return out


def parse_json_labels(text: str, *, origin: str, group_column: str = "") -> list[LabelRow]:
    """Parse `[{"filename": ..., "label": ...}]` (or `image_path`/`path` keys) or `{"<filename>": label}`.

    In the list form, the key `group_column` (default: `group`) gives an entry's group id (a string or an
    integer; absent, null or "" means no group). A configured key that no entry has is a DataError.
    """
    group_key_name = group_column or "group"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{origin}: not valid JSON ({exc}); fix or re-export the label file") from exc
    if isinstance(data, dict):
        if group_column:
            raise DataError(f"{origin}: a {{filename: label}} object has no room for the group key "
                            f"{group_column!r}; write a list of {{filename, label, {group_column}}} objects")
        entries: Iterable[tuple[Any, Any, Any]] = [(k, v, None) for k, v in data.items()]
    elif isinstance(data, list):
        entries = []
        for i, item in enumerate(data):
            where = f"{origin}, entry {i}"
            if not isinstance(item, dict):
                raise DataError(f"{where}: expected an object like {{\"filename\": ..., \"label\": ...}}, "
                                f"got {type(item).__name__}")
            key = next((k for k in ("filename", "image_path", "path") if k in item), None)
            if key is None or "label" not in item:
                raise DataError(f"{where}: needs a `filename` (or `image_path`/`path`) and a `label` key; "
                                f"has {sorted(item)}")
            entries.append((item[key], item["label"], item.get(group_key_name)))
        if group_column and data and not any(isinstance(i, dict) and group_column in i for i in data):
            raise DataError(f"{origin}: no entry has the group key {group_column!r}; add it to the entries or "
                            "fix SourceConfig.group_column")
    else:
        raise DataError(f"{origin}: expected a list of {{filename, label}} objects or a {{filename: label}} "
                        f"object, got {type(data).__name__}")
    out = []
    for i, (path, label, group) in enumerate(entries):
        where = f"{origin}, entry {i}"
        if not isinstance(path, str) or not path.strip() or "\x00" in path:
            raise DataError(f"{where}: image path {path!r} is not a non-empty string")
        out.append(LabelRow(i, path.strip(), parse_label(label, where=where), _group_value(group, where=where)))
    if not out:
        raise DataError(f"{origin}: no entries; expected at least one labelled image")
    return out


# ----------------------------------------------------------------------------------------------- scanning


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
            samples.append(Sample(digest, label, config.name, config.role, path, group_key(config.name, group)))
    return samples, quarantined


def _scan_folder(config: SourceConfig, root: Path) -> tuple[list[Sample], list[dict]]:
    if config.group_column:
        raise DataError(f"{root}: class folders carry no group column, but group_column="
                        f"{config.group_column!r} is set; list the images in a CSV/JSON label file or parquet "
                        f"with a {config.group_column!r} column, or unset group_column")
    classes = []
    for child in sorted(root.iterdir()):
        if _is_hidden(child.name) or not child.is_dir():
            continue
        if child.name.lower() in CLASS_FOLDERS:
            classes.append((child, CLASS_FOLDERS[child.name.lower()]))
        else:
            log.warning("source %s: ignoring folder %s (not a class folder)", config.name, child)
    if not classes:
        raise DataError(
            f"{root}: no class folders; expected subfolders named "
            f"{', '.join(sorted(CLASS_FOLDERS))} holding the images"
        )
    entries = []
    for folder, label in classes:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            for name in sorted(filenames):
                if not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                    entries.append((os.path.join(dirpath, name), label, None, ""))
    return _scan_files(config, entries)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc}); save the label file as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read the label file ({exc})") from exc


def _scan_label_file(config: SourceConfig, path: Path, kind: str) -> tuple[list[Sample], list[dict]]:
    parse = parse_csv_labels if kind == "csv" else parse_json_labels
    rows = parse(_read_text(path), origin=str(path), group_column=config.group_column)
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


def _image_bytes_column(batch: Any, shard: Path) -> Any:
    """The column of image bytes: `image` as struct {bytes, path} (Hugging Face) or plain binary."""
    import pyarrow as pa

    column = batch.column("image")
    if hasattr(column, "combine_chunks"):  # a Table's ChunkedArray (row groups); batches hold plain arrays
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        if column.type.get_field_index("bytes") < 0:
            raise DataError(f"{shard}: column `image` is a struct without a `bytes` field; "
                            "expected the Hugging Face layout image {bytes, path}")
        return column.field("bytes")
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return column
    raise DataError(f"{shard}: column `image` has type {column.type}; expected struct {{bytes, path}}")


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
                images = _image_bytes_column(batch, shard)
                labels = batch.column("label").to_pylist()
                groups = batch.column(group_col).to_pylist() if len(columns) == 3 else [None] * len(labels)
                for i, label in enumerate(labels):
                    locator = f"{shard}{PARQUET_ROW_MARK}{row}"
                    where = f"{shard}, row {row}"
                    value = parse_label(label, where=where)
                    group = group_key(config.name, _group_value(groups[i], where=where))
                    scalar = images[i]
                    data = scalar.as_py() if scalar.is_valid else None
                    if not data:
                        quarantined.append({"locator": locator, "source": config.name, "row": row,
                                            "reason": "no image bytes in this row"})
                    else:
                        samples.append(Sample(sha256_bytes(data), value, config.name, config.role, locator, group))
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


def _scan(config: SourceConfig) -> tuple[list[Sample], list[dict]]:
    path = Path(config.path).expanduser().absolute()
    if not path.exists():
        raise DataError(f"source {config.name!r}: {path} does not exist; fix the path in the source config")
    kind = _resolve_kind(config, path)
    if kind == "folder":
        if not path.is_dir():
            raise DataError(f"{path}: kind 'folder' needs a directory of class folders")
        return _scan_folder(config, path)
    if kind in ("csv", "json"):
        if not path.is_file():
            raise DataError(f"{path}: kind {kind!r} needs a label file")
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
    path = Path(config.path).expanduser().absolute()
    if not path.exists():
        raise DataError(f"source {config.name!r}: {path} does not exist; fix the path")
    kind = _resolve_kind(config, path)
    labels: list[int] = []
    if kind == "folder":
        if not path.is_dir():
            raise DataError(f"{path}: kind 'folder' needs a directory of class folders")
        for child in sorted(path.iterdir()):
            label = CLASS_FOLDERS.get(child.name.lower())
            if label is None or _is_hidden(child.name) or not child.is_dir():
                continue
            for _, dirnames, filenames in os.walk(child):
                dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
                labels += [label for name in filenames
                           if not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES]
    elif kind in ("csv", "json"):
        parse = parse_csv_labels if kind == "csv" else parse_json_labels
        labels = [r.label for r in parse(_read_text(path), origin=str(path), group_column=config.group_column)]
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
                                  "label": sample.label, "other_locator": kept.locator,
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


# ----------------------------------------------------------------------------------------------- reading

# Per-process caches: DataLoader workers are forked, so each process opens its own parquet handles
# (keyed by pid) and keeps a few decoded row groups, bounded in bytes, instead of whole shards.
_CACHE_BYTES = 256 << 20
_lock = threading.Lock()
_pid = -1
_files: dict[str, tuple[Any, list[int]]] = {}
_groups: OrderedDict[tuple[str, int], Any] = OrderedDict()
_group_bytes = 0


def _reset_if_forked() -> None:
    global _pid, _group_bytes
    if _pid != os.getpid():
        _pid = os.getpid()
        _files.clear()
        _groups.clear()
        _group_bytes = 0


def _parquet_row(path: str, row: int) -> bytes:
    import pyarrow.parquet as pq

    global _group_bytes
    with _lock:
        _reset_if_forked()
        if path not in _files:
            pf = pq.ParquetFile(path, memory_map=True)
            starts = [0]
            for g in range(pf.num_row_groups):
                starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
            _files[path] = (pf, starts)
        pf, starts = _files[path]
        if not 0 <= row < starts[-1]:
            raise DataError(f"{path}: row {row} out of range (the shard has {starts[-1]} rows); "
                            "the shard changed since scanning: rescan the sources")
        group = bisect.bisect_right(starts, row) - 1
        key = (path, group)
        if key in _groups:
            _groups.move_to_end(key)
            images = _groups[key]
        else:
            images = _image_bytes_column(pf.read_row_group(group, columns=["image"]), Path(path))
            _groups[key] = images
            _group_bytes += images.nbytes
            while _group_bytes > _CACHE_BYTES and len(_groups) > 1:
                _, old = _groups.popitem(last=False)
                _group_bytes -= old.nbytes
        data = images[row - starts[group]].as_py()
    if not data:
        raise DataError(f"{path}, row {row}: no image bytes in this row")
    return data


def read_bytes(locator: str) -> bytes:
    """The image bytes behind a locator: an absolute file path or `<parquet path>#row=<i>`."""
    path, mark, row = locator.rpartition(PARQUET_ROW_MARK)
    try:
        if mark and row.isdigit():
            return _parquet_row(path, int(row))
        with open(locator, "rb") as handle:
            return handle.read()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{locator}: cannot read the image ({exc}); the file moved or changed since "
                        "scanning: rescan the sources") from exc
