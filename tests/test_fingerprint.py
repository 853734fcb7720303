"""Content hashes and derived seeds: equal content gives equal values, in every process and run."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from stage1core.fingerprint import canonical_json, derived_seed, fingerprint, sha256_bytes, sha256_file


def test_sha256_of_bytes_and_of_a_file_read_in_chunks(tmp_path):
    assert sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    data = bytes(range(256)) * 1000
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path, chunk_size=1000) == sha256_file(path) == hashlib.sha256(data).hexdigest()


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    sizes: tuple[int, ...]
    colour: Colour = Colour.RED


def test_canonical_json_ignores_key_order_and_spells_out_configs():
    assert canonical_json({"b": 1, "a": 2}) == canonical_json({"a": 2, "b": 1}) == '{"a":2,"b":1}'
    assert canonical_json(Config("x", (1, 2))) == '{"colour":"red","name":"x","sizes":[1,2]}'
    assert canonical_json([Path("/a/b"), float("nan"), float("inf")]) == '["/a/b","nan","inf"]'
    with pytest.raises(TypeError, match="cannot fingerprint a object"):
        canonical_json(object())


def test_fingerprint_changes_with_any_part():
    base = fingerprint("store", Config("x", (1, 2)), 3)
    assert base == fingerprint("store", Config("x", (1, 2)), 3)
    assert len({base, fingerprint("store", Config("x", (1, 3)), 3), fingerprint("store", Config("x", (1, 2)), 4),
                fingerprint("store", Config("x", (1, 2)))}) == 4


def test_derived_seed_is_fixed_across_processes_and_versions():
    # pinned: exact resume of a fine-tuning run replays augmentations and sample orders from these seeds
    assert derived_seed("order", 7, 0) == 8352083183237646867
    seeds = {derived_seed("augment", 0, epoch, i) for epoch in range(3) for i in range(100)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)
    other = subprocess.run([sys.executable, "-c", "from stage1core.fingerprint import derived_seed; "
                            "print(derived_seed('order', 7, 0))"], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=Path(__file__).parents[1])
    assert other.stdout.strip() == "8352083183237646867", other.stderr
