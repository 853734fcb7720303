"""CSV and JSON label files: parsed and checked row by row before any image is read."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .records import DataError

PATH_COLUMNS = ("image_path", "filename", "path", "image")  # accepted names of the path column, in priority
LABEL_NAMES = {"roadwork": 1, "no_roadwork": 0, "1": 1, "0": 0}


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


def group_value(value: Any, *, where: str) -> str:
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
        out.append(LabelRow(i, path.strip(), parse_label(label, where=where), group_value(group, where=where)))
    if not out:
        raise DataError(f"{origin}: no entries; expected at least one labelled image")
    return out



def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc}); save the label file as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read the label file ({exc})") from exc


def read_label_file(path: Path, kind: str, *, group_column: str = "") -> list[LabelRow]:
    """The rows of a CSV (`kind` "csv") or JSON label file."""
    parse = parse_csv_labels if kind == "csv" else parse_json_labels
    return parse(read_text(path), origin=str(path), group_column=group_column)
