"""Atomic writes: the final name only ever holds complete content, and nothing temporary is left."""

from __future__ import annotations

import json
import os

import pytest

from stage1core import storage
from stage1core.storage import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_creates_parents_and_replaces_whole_files(tmp_path):
    path = tmp_path / "a" / "b" / "file.bin"
    assert atomic_write_bytes(path, b"first") == path
    assert atomic_write_text(path, "second ü") == path
    assert path.read_bytes() == "second ü".encode()
    assert _leftovers(path.parent) == []


def test_json_is_sorted_indented_and_ends_with_a_newline(tmp_path):
    path = atomic_write_json(tmp_path / "x.json", {"b": 1, "a": [1, 2]})
    text = path.read_text()
    assert text.endswith("}\n") and text.index('"a"') < text.index('"b"')
    assert json.loads(text) == {"a": [1, 2], "b": 1}


def test_a_failed_write_keeps_the_old_content_and_no_temp_file(tmp_path, monkeypatch):
    path = atomic_write_bytes(tmp_path / "file.bin", b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_appears_complete_or_not_at_all(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "part").write_text("1")
        assert not final.exists()  # nothing under the final name while the block runs
    assert (final / "part").read_text() == "1"

    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "failed") as tmp:
        (tmp / "part").write_text("half")
        raise RuntimeError("crash")
    assert not (tmp_path / "failed").exists()
    assert _leftovers(tmp_path) == []


def test_atomic_dir_keeps_an_existing_result_unless_told_to_replace(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("first")
    with atomic_dir(final) as tmp:  # a concurrent writer finished first: its copy stays
        (tmp / "v").write_text("second")
    assert (final / "v").read_text() == "first"
    with atomic_dir(final, replace=True) as tmp:
        (tmp / "v").write_text("third")
    assert (final / "v").read_text() == "third" and os.listdir(final) == ["v"]
    assert _leftovers(tmp_path) == []
