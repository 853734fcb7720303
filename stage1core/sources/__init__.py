"""Labelled images from several sources: class folders, CSV/JSON label files, Hugging Face parquet shards.

Every image becomes one `Sample` whose `sample_id` is the sha256 of its bytes, so the same picture
reached through two sources (or twice in one) collapses to one sample and can never sit in two splits.
A `locator` says where the bytes live: an absolute file path, or `<abs parquet path>#row=<i>`;
`read_bytes(locator)` fetches them again, from any process (DataLoader workers included).

Bad input raises `DataError` naming the file, the row and what to do. The one exception is a label
file row whose image file is missing or unreadable: it is quarantined (reported, not fatal), because
exported datasets often lose a few files and the caller decides what fraction is acceptable.

The modules, each built on the one before: `records` (SourceConfig, Sample, SourceScan, DataError),
`label_files` (CSV and JSON label files parsed and checked), `reading` (bytes back from a locator),
`scanning` (each source kind scanned, `load_sources` merging them).
"""

from .label_files import (
    LABEL_NAMES,
    PATH_COLUMNS,
    LabelRow,
    parse_csv_labels,
    parse_json_labels,
    parse_label,
)
from .reading import read_bytes
from .records import (
    CLASS_FOLDERS,
    IMAGE_SUFFIXES,
    KINDS,
    PARQUET_ROW_MARK,
    ROLES,
    DataError,
    LabelConflictError,
    Sample,
    SourceConfig,
    SourceScan,
)
from .scanning import count_images, group_key, load_sources, scan_source

__all__ = [
    "CLASS_FOLDERS",
    "IMAGE_SUFFIXES",
    "KINDS",
    "LABEL_NAMES",
    "PARQUET_ROW_MARK",
    "PATH_COLUMNS",
    "ROLES",
    "DataError",
    "LabelConflictError",
    "LabelRow",
    "Sample",
    "SourceConfig",
    "SourceScan",
    "count_images",
    "group_key",
    "load_sources",
    "parse_csv_labels",
    "parse_json_labels",
    "parse_label",
    "read_bytes",
    "scan_source",
]
