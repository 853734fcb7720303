"""What a source is and what scanning it yields: `SourceConfig`, `Sample`, `SourceScan`, and `DataError`,
the error every bad source raises (its message names the file, the row and what to do)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from stage1core.config import describe_fields
from stage1core.fingerprint import fingerprint as _fingerprint

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
    row: int | None = None  # its row in the CSV/JSON label file or parquet shard; None in class folders


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
