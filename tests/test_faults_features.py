"""Feature extraction under faults: kill -9 at random points and the resume, two extractions into one
store, NaN/inf features, undecodable images and degenerate splits in a pipeline run, and features kept
across a tracking failure. docs/reliability.md maps each fault to its test.

The crash and concurrency tests fork child processes from this one (timm is already imported, so a child
starts in milliseconds) and kill them with SIGKILL: no Python cleanup, no finally blocks run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from stage1core.backbone import resolve_backbone
from stage1core.features import FeatureConfig, FeatureStore, extract_features
from stage1core.sources import (
    DataError,
    SourceConfig,
    load_sources,
)
from tests.common import HANG_TIMEOUT_S
from tests.faults import (
    BATCH,
    CRASH_CFG,
    FORK,
    SHARD,
    child_extract,
    closed_port,
    encode,
    photo,
    png_claiming,
    run_child,
    write,
)


def _progress(path: Path) -> int:
    lines = path.read_text().split() if path.exists() else []
    return int(lines[-1]) if lines else 0


def _store_state(root: Path) -> tuple[FeatureStore | None, int]:
    stores = [p for p in root.iterdir() if p.is_dir()] if root.exists() else []
    if not stores:
        return None, 0
    store = FeatureStore(stores[0])
    return store, len(store.index)


def test_kill9_during_extraction_loses_at_most_the_shard_in_flight(crash_samples, tiny_eva_module, reference,
                                                                    tmp_path):
    rng = random.Random(7)
    n = len(crash_samples)
    root = tmp_path / "store"
    kills = 0
    for attempt in range(4):
        _, stored = _store_state(root)
        remaining = n - stored
        if remaining <= BATCH:
            break
        progress = tmp_path / f"progress-{attempt}"
        target = rng.randint(1, remaining - 1)  # images newly embedded before the kill is sent
        proc = FORK.Process(target=child_extract, args=(crash_samples, tiny_eva_module, str(root), str(progress),
                                                         None, remaining))
        proc.start()
        deadline = time.monotonic() + HANG_TIMEOUT_S
        while _progress(progress) < target and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))  # sometimes mid-batch, sometimes mid-write
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(60)  # returns as soon as the killed child is reaped
        assert proc.exitcode == -signal.SIGKILL, proc.exitcode  # the child cannot finish on its own
        kills += 1
        store, now_stored = _store_state(root)
        assert store is not None and store.verify() == []  # no corrupt shard under a final name
        embedded = stored + _progress(progress)
        assert now_stored >= stored and now_stored % SHARD == 0  # only complete shards count
        assert embedded - now_stored <= SHARD, (embedded, now_stored)  # lost work: at most the shard in flight
        store.load(sorted(store.index))  # every indexed feature is readable and finite
    assert kills >= 3  # 48 images in shards of 8: a kill stores at most all but the last shard
    _, stored = _store_state(root)
    info = run_child(crash_samples, tiny_eva_module, root, tmp_path, "resume")
    assert info["n_computed"] == n - stored  # the rerun computes only what no complete shard holds
    assert info["fingerprint"] == reference["info"]["fingerprint"]
    resumed = FeatureStore(info["store_dir"]).load(reference["ids"])
    assert np.array_equal(resumed, reference["features"])  # bit-identical to the uninterrupted run
    assert resumed.tobytes() == reference["features"].tobytes()


def test_two_concurrent_extractions_into_one_store_agree_and_do_not_corrupt_it(crash_samples, tiny_eva_module,
                                                                               reference, tmp_path):
    root = tmp_path / "shared-store"
    procs, results = [], []
    for i in range(2):
        results.append(tmp_path / f"run{i}.json")
        procs.append(FORK.Process(target=child_extract,
                                  args=(crash_samples, tiny_eva_module, str(root), None, str(results[-1]))))
    for p in procs:
        p.start()
    for p in procs:
        p.join(HANG_TIMEOUT_S)
    assert [p.exitcode for p in procs] == [0, 0]
    infos = [json.loads(r.read_text()) for r in results]
    assert infos[0]["fingerprint"] == infos[1]["fingerprint"] == reference["info"]["fingerprint"]
    assert sorted(i["n_computed"] for i in infos) == [0, len(crash_samples)]  # the lock: nothing embedded twice
    store = FeatureStore(infos[0]["store_dir"])
    assert store.verify() == []
    listed = [sid for j in (Path(infos[0]["store_dir"]) / "shards").glob("*.json")
              for sid in json.loads(j.read_text())["sample_ids"]]
    assert sorted(listed) == reference["ids"]  # every sample in exactly one shard
    assert np.array_equal(store.load(reference["ids"]), reference["features"])


def test_nan_or_inf_features_are_refused(tmp_path, crash_samples, tiny_eva_module, reference, monkeypatch):
    import torch

    import stage1core.features as features

    # 1. the store refuses to write them
    store = FeatureStore.create(tmp_path / "s", {"dim": 3})
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="NaN/inf"):
            store.write_shard(["a", "b"], np.array([[0, 1, 2], [bad, 0, 0]], np.float32))
    assert store.index == {}
    # 2. a backbone that produces them stops the extraction
    monkeypatch.setattr(features, "embed", lambda model, batch, pooling: torch.full((len(batch), 64), np.nan))
    with pytest.raises(ValueError, match="NaN/inf"):
        extract_features(crash_samples[:4], tiny_eva_module, CRASH_CFG, store_root=tmp_path / "nan", progress=False)
    # 3. a damaged shard is refused on load (fp16 overflows to inf beyond 65504)
    copy = tmp_path / "copy"
    shutil.copytree(reference["info"]["store_dir"], copy)
    npy = sorted((copy / "shards").glob("*.npy"))[0]
    arr = np.load(npy).astype(np.float32)
    arr[0, 0] = np.inf
    np.save(npy, arr.astype(np.float16))
    with pytest.raises(ValueError, match=rf"NaN/inf features in shard\(s\) \['{npy.stem}'\]"):
        FeatureStore(copy).load(reference["ids"])


# ----------------------------------------------------------------------------------------------- pipeline


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("STAGE1_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _csv_source(tmp_path: Path, tiny_demo: Path) -> tuple[Path, dict[str, int]]:
    """A label file over the demo images plus broken ones; returns it and the CSV row of each broken file."""
    samples = load_sources([SourceConfig(path=str(tiny_demo), kind="folder")]).samples
    bad = tmp_path / "bad"
    broken = {
        "truncated.jpg": encode(photo(64, 64, seed=5), "JPEG")[:1500],
        "webpage.jpg": b"<html>not an image</html>",
        "bomb.png": png_claiming(20000, 20000),
    }
    for name, data in broken.items():
        write(bad / name, data)
    write(bad / "zero.jpg", b"")
    lines = ["image_path,label"] + [f"{s.locator},{s.label}" for s in samples]
    rows = {}
    for name in (*broken, "zero.jpg", "missing.jpg"):
        lines.append(f"{bad / name},1")
        rows[name] = len(lines)
    path = tmp_path / "labels.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, rows


def test_undecodable_images_are_quarantined_and_the_run_fails_only_above_the_limit(home, tmp_path, tiny_demo,
                                                                                  tiny_eva_module):
    from stage1core.splits import SplitConfig
    from tasks.pipeline import build_splits, check_quarantine, extract_features, split_arrays

    labels, rows = _csv_source(tmp_path, tiny_demo)
    sources = [SourceConfig(str(labels), name="natix")]
    splits = SplitConfig(train=0.45, val=0.15, calib=0.25, test=0.15)
    feats_cfg = FeatureConfig(batch_size=32, num_workers=0)

    # 125 rows, 2 unusable at scan (empty, missing) + 3 undecodable = 4% > a 3% limit: fail, naming the report
    strict = build_splits.fn(sources, splits, max_quarantined_fraction=0.03)
    assert strict.quarantined == 2
    first = extract_features.fn(strict, resolve_backbone(tiny_eva_module), feats_cfg)
    with pytest.raises(DataError, match=r"4\.0% of the images could not be used .*limit 3\.0%.*quarantine-") as err:
        check_quarantine.fn(strict, first)
    assert err.value.report == strict.quarantine_report

    # the next run with a looser limit continues, and reuses every feature already computed
    split = build_splits.fn(sources, splits, max_quarantined_fraction=0.05)
    info = extract_features.fn(split, resolve_backbone(tiny_eva_module), feats_cfg)
    assert info.n_computed == 0 and len(info.failed) == 3
    summary = check_quarantine.fn(split, info)
    assert summary == {"path": split.quarantine_report, "scan": 2, "decode": 3, "quarantined": 5, "rows": 125}
    # one report per run, named by the run, covering scan and decode
    assert split.quarantine_report != strict.quarantine_report
    report = json.loads(Path(summary["path"]).read_text())
    assert report["counts"] == {"scan": 2, "decode": 3, "conflict": 0, "quarantined": 5, "rows": 125}
    entries = {Path(e["locator"]).name: e for e in report["entries"]}
    assert set(entries) == set(rows)
    for name, row in rows.items():
        assert entries[name]["row"] == row and entries[name]["source"] == "natix" and entries[name]["reason"]
    assert {e["stage"] for e in entries.values()} == {"scan", "decode"}
    assert entries["missing.jpg"]["reason"] == "missing file"
    assert "too large" in entries["bomb.png"]["reason"] and "not an image" in entries["webpage.jpg"]["reason"]
    assert "truncated" in entries["truncated.jpg"]["reason"]
    # quarantined images are in no split's arrays; every other image is
    arrays = split_arrays(split, info, ("train", "val", "calib", "test"))
    assert sum(len(ids) for ids, _, _ in arrays.values()) == split.n_samples - 3


@pytest.mark.parametrize(("emptied", "label", "match"), [
    ("test", None, "split 'test' is empty"),
    ("calib", 1, "split 'calib' has no roadwork images"),
    ("val", 0, "split 'val' has no no_roadwork images"),
])
def test_an_empty_or_one_class_split_fails_before_embedding(home, tmp_path, tiny_demo, tiny_eva_module, emptied,
                                                           label, match):
    from stage1core.splits import SplitConfig, make_splits, split_counts, write_split_manifest
    from tasks.pipeline import SplitRef, extract_features

    scan = load_sources([SourceConfig(path=str(tiny_demo), kind="folder")])
    config = SplitConfig(train=0.45, val=0.15, calib=0.25, test=0.15)
    parts = make_splits(scan.samples, config)
    parts[emptied] = [] if label is None else [s for s in parts[emptied] if s.label != label]
    path = tmp_path / "split.json"
    fp = write_split_manifest(path, parts, config, data_fingerprint=scan.fingerprint())
    ref = SplitRef(path=str(path), fingerprint=fp, data_fingerprint=scan.fingerprint(), counts=split_counts(parts),
                   n_samples=len(scan.samples), duplicates=0, quarantined=0)
    with pytest.raises(DataError, match=match):
        extract_features.fn(ref, resolve_backbone(tiny_eva_module), FeatureConfig(num_workers=0))
    assert not (home / "features").exists() or not any((home / "features").rglob("*.npy"))


# ----------------------------------------------------------------------------------------------- tracking failure


def test_features_computed_before_a_tracking_failure_are_reused(home, tmp_path, tiny_demo, tiny_eva_module,
                                                               monkeypatch):
    """MLflow goes away mid-run (after the features): the next run embeds nothing again."""
    from stage1core.splits import SplitConfig
    from tasks.pipeline import build_splits, extract_features
    from tasks.tracking import ServerUnreachable, start_mlflow_run

    sources = [SourceConfig(path=str(tiny_demo), kind="folder", name="tiny")]
    split = build_splits.fn(sources, SplitConfig(train=0.45, val=0.15, calib=0.25, test=0.15))
    first = extract_features.fn(split, resolve_backbone(tiny_eva_module), FeatureConfig(batch_size=32, num_workers=0))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(ServerUnreachable):
        start_mlflow_run.fn("stage1", "run", {})
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    again = extract_features.fn(split, resolve_backbone(tiny_eva_module), FeatureConfig(batch_size=32, num_workers=0))
    assert first.n_computed == split.n_samples and again.n_computed == 0
    assert again.fingerprint == first.fingerprint
