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

from stage1core.fingerprint import fingerprint
from stage1core.sources import DataError, Sample
from stage1core.splits import (
    SPLITS,
    SplitConfig,
    assign_split,
    latest_manifest,
    make_splits,
    parent_pins,
    pinned_splits,
    plan_splits,
    read_split_manifest,
    record_latest_manifest,
    split_counts,
    splits_fingerprint,
    write_split_manifest,
)
from tests.common import HANG_TIMEOUT_S

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
    SplitConfig(near_duplicates=False, near_duplicate_radius=0, near_duplicate_diameter=0)
    for bad in (dict(train=0.8), dict(val=0.0, train=0.8), dict(train=-0.1, val=0.3, calib=0.4, test=0.4),
                dict(test=float("nan")), dict(train=True), dict(salt=3), dict(near_duplicates=1),
                dict(near_duplicate_radius=-1), dict(near_duplicate_radius=30), dict(near_duplicate_radius=True),
                dict(near_duplicate_radius=12, near_duplicate_diameter=8)):
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
                             text=True, env=env, cwd=ROOT, check=True, timeout=HANG_TIMEOUT_S)
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
    assert set(data["samples"][0]) == {"sample_id", "label", "split", "source", "role", "locator", "group",
                                       "row", "split_group"}
    assert data["samples"][0]["split_group"] == data["samples"][0]["sample_id"]  # no groups given
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


# ----------------------------------------------------------------------------------------------- groups


def grouped(ids, size: int, *, source: str = "natix") -> list[Sample]:
    """Samples in group-column groups of `size` consecutive ids."""
    return [Sample(sid, i % 2, source, "all", f"/data/{sid[:8]}.jpg", f"{source}:drive{i // size}")
            for i, sid in enumerate(ids)]


def split_of(splits) -> dict[str, str]:
    return {s.sample_id: name for name, rows in splits.items() for s in rows}


def test_without_groups_links_or_pins_every_sample_keeps_its_pure_hash_split():
    config = SplitConfig(salt="pure")
    plan = plan_splits(samples_for(fake_ids(2_000)), config)
    assert all(name == assign_split(sid, config) for sid, name in split_of(plan.splits).items())
    assert plan.group_of == {sid: sid for sid in plan.group_of}
    assert (plan.stats.n_groups, plan.stats.largest_group, plan.stats.grouped_samples) == (2_000, 1, 0)


def test_a_group_lands_in_one_split_by_its_anchor_and_ratios_hold_over_groups():
    config = SplitConfig()
    samples = grouped(fake_ids(6_000, seed=5), 3)
    plan = plan_splits(samples, config)
    where = split_of(plan.splits)
    for i in range(0, 6_000, 3):
        members = [s.sample_id for s in samples[i:i + 3]]
        assert len({where[m] for m in members}) == 1
        # the group's split is the hash of its group-column id, whatever its members
        assert where[members[0]] == assign_split(f"natix:drive{i // 3}", config)
        assert plan.group_of[members[0]] == f"natix:drive{i // 3}"
    counts = split_counts(plan.splits)
    for name in SPLITS:  # 2,000 groups: binomial sd of a share <= 0.011; 4 sd
        assert abs(counts[name]["total"] / 6_000 - getattr(config, name)) < 0.045, counts
    assert (plan.stats.n_groups, plan.stats.largest_group, plan.stats.column_groups) == (2_000, 3, 2_000)


def test_links_merge_groups_and_a_link_to_an_unknown_sample_is_ignored():
    ids = fake_ids(6, seed=8)
    samples = samples_for(ids)
    plan = plan_splits(samples, SplitConfig(), links=[(ids[0], ids[1]), (ids[1], ids[2]), (ids[3], "f" * 64)])
    assert len({plan.group_of[sid] for sid in ids[:3]}) == 1 and plan.group_of[ids[0]] == min(ids[:3])
    assert len(set(split_of(plan.splits)[sid] for sid in ids[:3])) == 1
    assert (plan.stats.n_groups, plan.stats.largest_group, plan.stats.links) == (4, 3, 2)


def test_a_group_with_a_train_only_image_goes_to_train():
    ids = fake_ids(400, seed=6)
    extra = [Sample(sid, 1, "extra", "train_only", "/x") for sid in fake_ids(200, seed=7)]
    # each extra image is a near-duplicate of one target image
    plan = plan_splits(samples_for(ids) + extra, SplitConfig(),
                       links=list(zip(ids, [s.sample_id for s in extra], strict=False)))
    where = split_of(plan.splits)
    assert all(where[sid] == "train" for sid in ids[:200]) and all(where[s.sample_id] == "train" for s in extra)
    assert {where[sid] for sid in ids[200:]} == set(SPLITS)
    assert plan.stats.groups_across_splits == 0 and plan.stats.pairs_across_splits == 0


def test_adding_images_never_moves_an_old_one_and_a_new_near_duplicate_joins_its_group():
    config = SplitConfig()
    old_ids = fake_ids(3_000, seed=1)
    old = samples_for(old_ids)
    old_links = list(zip(old_ids[0::3], old_ids[1::3], strict=True))  # 1,000 near-duplicate pairs
    before = plan_splits(old, config, links=old_links)
    pins = pinned_splits(before.splits)
    # a new near-duplicate of every pair; its sample_id often sorts first, so the group's anchor changes
    new_ids = fake_ids(1_000, seed=2)
    links = old_links + list(zip(new_ids, old_ids[0::3], strict=True))
    after = plan_splits(old + samples_for(new_ids), config, links=links, pinned=pins)
    where = split_of(after.splits)
    assert all(where[sid] == name for sid, name in pins.items())
    assert all(where[new] == pins[sid] for new, sid in zip(new_ids, old_ids[0::3], strict=True))
    assert after.stats.pinned == 3_000 and after.stats.bridges == 0 and after.stats.pairs_across_splits == 0
    # without the pins, the changed anchors would have moved old images: the pins are what holds them
    unpinned = split_of(plan_splits(old + samples_for(new_ids), config, links=links).splits)
    assert sum(unpinned[sid] != name for sid, name in pins.items()) > 100


def test_a_bridge_never_moves_old_images_and_is_counted():
    config = SplitConfig()
    ids = fake_ids(400, seed=3)
    by_split = {name: [sid for sid in ids if assign_split(sid, config) == name] for name in SPLITS}
    a, b, e = by_split["test"][0], by_split["train"][0], by_split["train"][1]
    c, d = by_split["calib"][:2]
    pins = pinned_splits(plan_splits(samples_for(ids), config).splits)
    new1, new2 = fake_ids(2, seed=4)
    # new1 joins a (test) and b (train): a tie, settled by split order (train first);
    # new2 joins c and d (calib) and e (train): the majority, calib, wins
    links = [(new1, a), (new1, b), (new2, c), (new2, d), (new2, e)]
    plan = plan_splits(samples_for(ids + [new1, new2]), config, links=links, pinned=pins)
    after = split_of(plan.splits)
    assert all(after[sid] == pins[sid] for sid in ids)
    assert after[new1] == "train" and after[new2] == "calib"
    assert plan.stats.bridges == 2 and plan.stats.groups_across_splits == 2
    # the links left straddling splits: new1-a and new2-e
    assert plan.stats.pairs_across_splits == 2


def test_loose_pairs_are_only_counted():
    ids = fake_ids(200, seed=9)
    where = {sid: assign_split(sid, SplitConfig()) for sid in ids}
    loose = [(x, y) for x, y in zip(ids[0::2], ids[1::2], strict=True)]
    plan = plan_splits(samples_for(ids), SplitConfig(), loose_pairs=loose)
    assert split_of(plan.splits) == where and plan.stats.n_groups == 200
    assert plan.stats.pairs_across_splits == sum(where[x] != where[y] for x, y in loose) > 0


def test_bad_pins_are_refused():
    with pytest.raises(ValueError, match="pinned splits"):
        plan_splits(samples_for(fake_ids(3)), SplitConfig(), pinned={"a" * 64: "dev"})


def test_manifest_records_groups_parent_and_round_trips_the_group_column(tmp_path):
    config = SplitConfig()
    samples = grouped(fake_ids(60, seed=10), 4)
    plan = plan_splits(samples, config)
    path = tmp_path / "m.json"
    parent = {"path": "/p.json", "fingerprint": "f" * 64}
    fp = write_split_manifest(path, plan.splits, config, data_fingerprint="d", group_of=plan.group_of,
                              groups={"n_groups": plan.stats.n_groups}, parent=parent)
    _, loaded, data = read_split_manifest(path)
    assert loaded == plan.splits and data["fingerprint"] == fp
    assert data["groups"] == {"n_groups": 15} and data["parent"] == parent
    assert {r["split_group"] for r in data["samples"]} == {f"natix:drive{k}" for k in range(15)}
    assert all(r["group"] == r["split_group"] for r in data["samples"])


def test_a_manifest_from_before_groups_still_reads(tmp_path):
    """Written without the group fields and the SplitConfig fields that came with them."""
    config = SplitConfig()
    splits = make_splits(samples_for(fake_ids(30)), config)
    path = tmp_path / "old.json"
    write_split_manifest(path, splits, config, data_fingerprint="d")
    data = json.loads(path.read_text())
    old_config = {k: v for k, v in data["config"].items() if not k.startswith("near_duplicate")}
    for row in data["samples"]:
        del row["group"], row["split_group"]
    rows = sorted([r["sample_id"], r["label"], r["split"]] for r in data["samples"])
    data.update(config=old_config, fingerprint=fingerprint(old_config, rows))
    del data["groups"], data["parent"]
    path.write_text(json.dumps(data))
    _, loaded, _ = read_split_manifest(path)
    assert loaded == splits


def test_the_lineage_pins_the_latest_manifest_of_the_same_config(tmp_path, caplog):
    config = SplitConfig()
    assert latest_manifest(tmp_path, config) is None and parent_pins(tmp_path, config, output=tmp_path / "a.json") \
        == ({}, None)
    splits = make_splits(samples_for(fake_ids(50)), config)
    first = tmp_path / "first.json"
    fp = write_split_manifest(first, splits, config, data_fingerprint="d")
    record_latest_manifest(tmp_path, config, first)
    assert latest_manifest(tmp_path, config) == first
    assert latest_manifest(tmp_path, SplitConfig(salt="other")) is None  # another config, another lineage
    assert latest_manifest(tmp_path, SplitConfig(near_duplicate_radius=8)) is None

    pins, parent = parent_pins(tmp_path, config, output=tmp_path / "second.json")
    assert pins == pinned_splits(splits) and parent == {"path": str(first), "fingerprint": fp}
    # the same file again: made again from its own parent (pins and all), never naming itself
    older = tmp_path / "older.json"
    older_splits = make_splits(samples_for(fake_ids(50)[:20]), config)
    write_split_manifest(older, older_splits, config, data_fingerprint="o")
    write_split_manifest(first, splits, config, data_fingerprint="d", parent={"path": str(older)})
    assert parent_pins(tmp_path, config, output=first) == (pinned_splits(older_splits), {"path": str(older)})
    older.unlink()  # the parent is gone: the manifest's own splits are the pins
    assert parent_pins(tmp_path, config, output=first) == (pinned_splits(splits), {"path": str(older)})
    write_split_manifest(first, splits, config, data_fingerprint="d")  # the first of its lineage
    assert parent_pins(tmp_path, config, output=first) == ({}, None)

    first.unlink()  # a deleted manifest starts a new lineage, with a warning
    assert parent_pins(tmp_path, config, output=tmp_path / "third.json") == ({}, None)
    assert "no longer exists" in caplog.text
    record = next((tmp_path / "latest").glob("*.json"))
    record.write_text("{not json")
    with pytest.raises(DataError, match="unreadable split lineage record") as info:
        latest_manifest(tmp_path, config)
    assert str(record) in str(info.value)
