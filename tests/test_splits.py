"""Hash splits: stable as data grows, ratios respected, train_only kept out of evaluation."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stage1core.sources import DataError, Sample
from stage1core.splits import (
    SPLITS,
    SplitConfig,
    assign_split,
    make_splits,
    read_split_manifest,
    split_counts,
    splits_fingerprint,
    write_split_manifest,
)

ROOT = Path(__file__).resolve().parents[1]


def fake_ids(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [hashlib.sha256(rng.bytes(16)).hexdigest() for _ in range(n)]


def samples_for(ids, *, role: str = "all", source: str = "natix", label_of=None) -> list[Sample]:
    label_of = label_of or (lambda sid: int(sid[-1], 16) % 2)
    return [Sample(sid, label_of(sid), source, role, f"/data/{sid[:8]}.jpg") for sid in ids]


def test_config_validation():
    SplitConfig(train=0.0, val=0.4, calib=0.3, test=0.3)
    SplitConfig(train=0.7 + 5e-7)  # within tolerance
    for bad in (dict(train=0.8), dict(val=0.0, train=0.8), dict(train=-0.1, val=0.3, calib=0.4, test=0.4),
                dict(test=float("nan")), dict(train=True), dict(salt=3)):
        with pytest.raises(ValueError):
            SplitConfig(**bad)


def test_assign_split_matches_the_documented_formula():
    config = SplitConfig(salt="s")
    for sid in fake_ids(200):
        u = int(hashlib.sha256(f"s:{sid}".encode()).hexdigest()[:16], 16) / 2**64
        expected = "train" if u < 0.7 else "val" if u < 0.8 else "calib" if u < 0.9 else "test"
        assert assign_split(sid, config) == expected


def test_ratios_are_respected_on_10k_ids():
    config = SplitConfig(train=0.6, val=0.15, calib=0.15, test=0.1)
    counts = split_counts(make_splits(samples_for(fake_ids(10_000)), config))
    for name in SPLITS:
        # binomial sd at n=10k is <= 0.005; 4 sd
        assert abs(counts[name]["total"] / 10_000 - getattr(config, name)) < 0.02, counts
    assert sum(c["total"] for c in counts.values()) == 10_000


def test_adding_ten_percent_new_samples_never_moves_an_old_one():
    config = SplitConfig()
    old = samples_for(fake_ids(3_000, seed=1))
    new = samples_for(fake_ids(300, seed=2))
    before = {s.sample_id: name for name, rows in make_splits(old, config).items() for s in rows}
    after = {s.sample_id: name for name, rows in make_splits(old + new, config).items() for s in rows}
    assert all(after[sid] == split for sid, split in before.items())
    assert len(after) == 3_300


def test_salt_reshuffles():
    ids = fake_ids(1_000)
    a = [assign_split(sid, SplitConfig(salt="a")) for sid in ids]
    b = [assign_split(sid, SplitConfig(salt="b")) for sid in ids]
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 200


def test_train_only_never_lands_in_an_evaluation_split():
    config = SplitConfig()
    extra = samples_for(fake_ids(2_000, seed=3), role="train_only", source="roadwork_extra")
    target = samples_for(fake_ids(2_000, seed=4))
    splits = make_splits(extra + target, config)
    for name in ("val", "calib", "test"):
        assert splits[name] and all(s.role == "all" for s in splits[name])
    assert {s.sample_id for s in extra} <= {s.sample_id for s in splits["train"]}
    # the target samples split exactly as they would without the extra source
    assert make_splits(target, config)["test"] == splits["test"]


def test_splits_are_sorted_and_duplicates_refused():
    samples = samples_for(fake_ids(500))
    splits = make_splits(samples[::-1], SplitConfig())
    for rows in splits.values():
        assert [s.sample_id for s in rows] == sorted(s.sample_id for s in rows)
    with pytest.raises(DataError, match="appears twice"):
        make_splits(samples + samples[:1], SplitConfig())


def test_deterministic_across_processes_with_different_hash_seeds():
    ids = fake_ids(300)
    here = [assign_split(sid, SplitConfig(salt="x")) for sid in ids]
    code = (
        "import json, sys\n"
        "from stage1core.splits import SplitConfig, assign_split\n"
        "ids = json.load(sys.stdin)\n"
        "print(json.dumps([assign_split(i, SplitConfig(salt='x')) for i in ids]))\n"
    )
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids), capture_output=True,
                             text=True, env=env, cwd=ROOT, check=True, timeout=60)
        assert json.loads(out.stdout) == here


def test_counts():
    samples = [
        Sample("a" * 64, 1, "s", "train_only", "/a"),
        Sample("b" * 64, 0, "s", "train_only", "/b"),
        Sample("c" * 64, 1, "s", "train_only", "/c"),
    ]
    counts = split_counts(make_splits(samples, SplitConfig()))
    assert counts["train"] == {"0": 1, "1": 2, "total": 3}
    assert counts["val"] == counts["calib"] == counts["test"] == {"0": 0, "1": 0, "total": 0}
    assert list(counts) == list(SPLITS)


def test_manifest_round_trip(tmp_path):
    config = SplitConfig(salt="run-7")
    extra = samples_for(fake_ids(50, seed=9), role="train_only", source="extra")
    samples = samples_for(fake_ids(400)) + extra
    splits = make_splits(samples, config)
    path = tmp_path / "splits" / "manifest.json"
    fp = write_split_manifest(path, splits, config, data_fingerprint="d" * 64, extra={"note": "x"})
    assert fp == splits_fingerprint(splits, config)

    loaded_config, loaded, data = read_split_manifest(path)
    assert loaded_config == config
    assert loaded == splits
    assert data["data_fingerprint"] == "d" * 64 and data["extra"] == {"note": "x"}
    assert data["counts"] == split_counts(splits)
    assert data["fingerprint"] == fp
    assert [r["sample_id"] for r in data["samples"]] == sorted(s.sample_id for s in samples)
    assert set(data["samples"][0]) == {"sample_id", "label", "split", "source", "role", "locator"}
    assert not list(path.parent.glob("*.tmp"))  # written atomically


def test_manifest_fingerprint_tracks_labels_splits_and_config_only():
    config = SplitConfig()
    samples = samples_for(fake_ids(100))
    splits = make_splits(samples, config)
    fp = splits_fingerprint(splits, config)
    moved = make_splits([Sample(s.sample_id, s.label, "other", s.role, "/x") for s in samples], config)
    assert splits_fingerprint(moved, config) == fp  # locations do not matter
    relabelled = make_splits([Sample(s.sample_id, 1 - s.label, s.source, s.role, s.locator) for s in samples],
                             config)
    assert splits_fingerprint(relabelled, config) != fp
    assert splits_fingerprint(splits, SplitConfig(salt="other")) != fp


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: "not json{", "cannot read"),
        (lambda d: [], "not a split manifest"),
        (lambda d: {**d, "config": {**d["config"], "train": 0.9}}, "invalid split config"),
        (lambda d: {**d, "config": {**d["config"], "bogus": 1}}, "invalid split config"),
        (lambda d: {**d, "samples": d["samples"][:-1]}, "does not match its fingerprint"),
        (lambda d: {**d, "samples": [{**d["samples"][0], "label": 2}]}, r"samples\[0\]: label 2"),
        (lambda d: {**d, "samples": [{**d["samples"][0], "split": "dev"}]}, r"samples\[0\]: split 'dev'"),
        (lambda d: {**d, "samples": [{"sample_id": "x"}]}, r"samples\[0\]: each sample needs"),
    ],
)
def test_malformed_manifest_is_a_data_error_naming_the_file(tmp_path, mutate, match):
    path = tmp_path / "m.json"
    config = SplitConfig()
    write_split_manifest(path, make_splits(samples_for(fake_ids(20)), config), config, data_fingerprint="d")
    data = mutate(json.loads(path.read_text()))
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(DataError, match=match) as info:
        read_split_manifest(path)
    assert str(path) in str(info.value)


def test_missing_manifest_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_split_manifest(tmp_path / "none.json")
