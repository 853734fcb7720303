"""Reading an image's bytes again from its locator, in any process (DataLoader workers included)."""

from __future__ import annotations

import bisect
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from .records import PARQUET_ROW_MARK, DataError


def image_bytes_column(batch: Any, shard: Path) -> Any:
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
            images = image_bytes_column(pf.read_row_group(group, columns=["image"]), Path(path))
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
