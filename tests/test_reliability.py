"""Reliability and security: bad inputs, crashes and resume, concurrent writers, bundle integrity and
safety, unreachable servers, fuzzing. docs/reliability.md maps every fault tried here to its test.

Crash and concurrency tests fork child processes from this one (timm is already imported, so a child
starts in milliseconds) and kill them with SIGKILL: no Python cleanup, no finally blocks run.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stage1core.bundle import BundleError, export_bundle, load_bundle, read_manifest
from stage1core.features import FeatureConfig, FeatureStore, extract_features
from stage1core.fingerprint import fingerprint, sha256_file
from stage1core.images import ImageDecodeError, decode_image
from stage1core.sources import (
    DataError,
    SourceConfig,
    load_sources,
    parse_csv_labels,
    parse_json_labels,
)
from tests.common import HANG_TIMEOUT_S, edited_json, encode, png_claiming, tiny_run_parameters

ROOT = Path(__file__).resolve().parents[1]
SHARD = 8  # images per shard in the crash tests: the most a kill may cost
BATCH = 4  # divides SHARD, so a resumed run batches exactly like an uninterrupted one
CRASH_CFG = FeatureConfig(batch_size=BATCH, num_workers=0, shard_size=SHARD, device="cpu")
FORK = multiprocessing.get_context("fork")


# ----------------------------------------------------------------------------------------------- helpers


def photo(width: int = 48, height: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def exif_rotated(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo(48, 32), "JPEG", exif=exif.tobytes(), quality=95)


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- bad images

GOOD_INPUTS = {
    # name: (bytes, expected size after decoding)
    "png_rgba_alpha": (lambda: encode(Image.new("RGBA", (9, 7), (255, 0, 0, 0)), "PNG"), (9, 7)),
    "palette": (lambda: encode(photo(20, 10).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), (20, 10)),
    "png_16bit": (lambda: encode(Image.fromarray(np.full((6, 5), 65535, np.uint16)), "PNG"), (5, 6)),
    "grayscale": (lambda: encode(photo().convert("L"), "JPEG"), (48, 32)),
    "cmyk_jpeg": (lambda: encode(photo().convert("CMYK"), "JPEG"), (48, 32)),
    "exif_rotated": (lambda: exif_rotated(6), (32, 48)),  # orientation 6: stored landscape, shown portrait
    "one_pixel": (lambda: encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), (1, 1)),
}

BAD_INPUTS = {
    # name: (bytes, what the error says)
    "zero_bytes": (lambda: b"", "empty"),
    "truncated_jpeg": (lambda: (lambda b: b[: len(b) // 2])(encode(photo(64, 64), "JPEG")), "truncated"),
    "not_an_image_named_jpg": (lambda: b"<html>a web page saved as .jpg</html>", "not an image"),
    "bomb_20000x20000": (lambda: png_claiming(20000, 20000), "too large"),
}


@pytest.mark.parametrize("name", sorted(GOOD_INPUTS))
def test_odd_but_valid_images_decode_to_8bit_rgb(name, tmp_path):
    make, size = GOOD_INPUTS[name]
    path = tmp_path / f"{name}.jpg"  # the suffix lies for some; decoding follows the bytes
    path.write_bytes(make())
    image = decode_image(path)
    assert image.mode == "RGB" and image.size == size
    if name == "png_rgba_alpha":
        assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent pixels composited on white
    if name == "png_16bit":
        assert image.getpixel((0, 0)) == (255, 255, 255)  # scaled from 65535, not clipped garbage


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_images_raise_image_decode_error(name, tmp_path):
    make, match = BAD_INPUTS[name]
    path = tmp_path / f"{name}.jpg"
    path.write_bytes(make())
    started = time.process_time()
    with pytest.raises(ImageDecodeError, match=match):
        decode_image(path)
    # the bomb guard reads the header only; decoding 400 MP would cost CPU seconds. CPU time of this
    # process, not wall time: other processes on a loaded machine do not count against it
    assert time.process_time() - started < 2.0


# ----------------------------------------------------------------------------------------------- label files


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_duplicate_images_with_conflicting_labels_name_both_files(tmp_path):
    data = encode(photo(seed=1), "PNG")
    a = write(tmp_path / "natix" / "roadwork" / "a.png", data)
    b = write(tmp_path / "natix" / "no_roadwork" / "b.png", data)
    with pytest.raises(DataError) as err:
        load_sources([SourceConfig(str(tmp_path / "natix"))])
    assert str(a) in str(err.value) and str(b) in str(err.value) and "label 1" in str(err.value)


def test_missing_files_in_a_label_file_are_quarantined_with_their_row(tmp_path):
    write(tmp_path / "img" / "ok.png", encode(photo(seed=2), "PNG"))
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("image_path,label\nimg/ok.png,1\nimg/gone.png,0\n")
    scan = load_sources([SourceConfig(str(csv_file))])
    assert len(scan.samples) == 1
    assert scan.quarantined == [{"locator": str(tmp_path / "img" / "gone.png"), "source": "labels.csv", "row": 3,
                                 "reason": "missing file"}]
    assert scan.quarantined_fraction == pytest.approx(0.5)


@pytest.mark.parametrize("label", ["2", "-1", "yes", "1.0", "", "true"])
def test_csv_labels_other_than_0_1_are_refused_naming_file_and_row(tmp_path, label):
    with pytest.raises(DataError, match=r"labels\.csv, row 3: label"):
        parse_csv_labels(f"image_path,label\na.jpg,1\nb.jpg,{label}\n", origin=str(tmp_path / "labels.csv"))


@pytest.mark.parametrize("label", [2, -1, 1.0, True, None, "yes", [1]])
def test_json_labels_other_than_0_1_are_refused_naming_the_entry(label):
    text = json.dumps([{"filename": "a.jpg", "label": 0}, {"filename": "b.jpg", "label": label}])
    with pytest.raises(DataError, match=r"labels\.json, entry 1: label"):
        parse_json_labels(text, origin="labels.json")


@pytest.mark.parametrize(("text", "match"), [
    ("image_path,label\na.jpg,1,extra\n", "row 2: 3 fields"),
    ('image_path,label\n"a.jpg,1\n', "row 2|fields|readable"),
    ("", "no rows"),
    ("image_path,label\n", "no data rows"),
    ("foo,bar\na.jpg,1\n", "row 1"),
])
def test_malformed_csv_is_a_data_error(text, match):
    with pytest.raises(DataError, match=match):
        parse_csv_labels(text, origin="labels.csv")


@pytest.mark.parametrize(("text", "match"), [
    ("[{\"filename\": \"a.jpg\", \"label\": 1}", "not valid JSON"),
    ("[{\"file\": \"a.jpg\", \"label\": 1}]", "entry 0: needs a `filename`"),
    ("[\"a.jpg\"]", "entry 0: expected an object"),
    ("42", "expected a list"),
    ("[]", "no entries"),
])
def test_malformed_json_is_a_data_error(text, match):
    with pytest.raises(DataError, match=match):
        parse_json_labels(text, origin="labels.json")


def test_parquet_shard_missing_a_column_is_a_data_error_naming_the_shard(tmp_path):
    shard = tmp_path / "shards" / "train-00000.parquet"
    shard.parent.mkdir()
    pq.write_table(pa.table({"image": pa.array([b"x"], pa.binary())}), shard)
    with pytest.raises(DataError, match=r"train-00000\.parquet: missing column\(s\) \['label'\]"):
        load_sources([SourceConfig(str(tmp_path / "shards"))])


# ----------------------------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
entries = st.lists(st.fixed_dictionaries(
    {"filename": st.text(max_size=12) | st.integers(), "label": st.sampled_from([0, 1, "0", "1", "roadwork", 2, None])}
), max_size=5)


@settings(max_examples=150, deadline=None)
@given(doc=json_values | entries)
def test_json_label_parser_only_ever_raises_data_error(doc):
    try:
        rows = parse_json_labels(json.dumps(doc), origin="labels.json")
    except DataError:
        return
    assert rows and all(r.label in (0, 1) and r.path == r.path.strip() and r.path for r in rows)


@pytest.mark.parametrize("parse", [parse_json_labels, parse_csv_labels], ids=["json", "csv"])
@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_label_parsers_on_arbitrary_text(parse, text):
    try:
        parse(text, origin="labels")
    except DataError:
        pass


path_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=15).filter(
    lambda p: p.strip() == p and p.strip())


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.tuples(path_text, st.sampled_from([0, 1])), min_size=1, max_size=8))
def test_csv_written_by_csv_module_parses_back_exactly(rows):
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image_path", "label"])
    writer.writerows(rows)
    parsed = parse_csv_labels(buf.getvalue(), origin="labels.csv")
    assert [(r.path, r.label) for r in parsed] == rows


# ----------------------------------------------------------------------------------------------- features


@pytest.fixture(scope="module")
def crash_samples(tiny_demo):
    """48 small demo images (the 12 MP one left out to keep kills quick), sorted by sample id."""
    samples = load_sources([SourceConfig(path=str(tiny_demo), kind="folder")]).samples
    return [s for s in samples if os.path.getsize(s.locator) < 500_000][:48]


def _child_extract(samples, backbone, root, progress: str | None, result: str | None,
                   wait_after: int | None = None) -> None:
    """Runs in a forked child: extract features, logging embedded counts to `progress` as it goes. With
    `wait_after`, the child waits to be killed once it has embedded that many images (before their shard
    is written), so it can never finish first: every kill lands, however load shifts the race between
    this child and the test polling its progress."""
    import torch

    import stage1core.features as features

    # every extraction compared bit for bit below runs with one intra-op thread: BLAS picks kernels by
    # thread count (and shape), so equal thread counts and equal batches (BATCH divides SHARD) are what
    # make the features of different processes bit-identical, on any CPU and under any load
    torch.set_num_threads(1)
    done = [0]
    real_embed = features.embed

    def logged_embed(model, batch, pooling):
        out = real_embed(model, batch, pooling)
        done[0] += len(batch)
        if progress:
            with open(progress, "a") as fh:
                fh.write(f"{done[0]}\n")
        time.sleep(0.01)  # widen the window between batches so kills land everywhere
        if wait_after is not None and done[0] >= wait_after:
            time.sleep(HANG_TIMEOUT_S)
        return out

    features.embed = logged_embed
    info = extract_features(samples, backbone, CRASH_CFG, store_root=root, progress=False, log_fn=lambda m: None)
    if result:
        Path(result).write_text(json.dumps(info.to_json()))


def _progress(path: Path) -> int:
    lines = path.read_text().split() if path.exists() else []
    return int(lines[-1]) if lines else 0


def _run_child(samples, backbone, root, tmp, tag) -> dict:
    result = tmp / f"{tag}.json"
    proc = FORK.Process(target=_child_extract, args=(samples, backbone, str(root), None, str(result)))
    proc.start()
    proc.join(HANG_TIMEOUT_S)
    assert proc.exitcode == 0, f"{tag} exited with {proc.exitcode}"
    return json.loads(result.read_text())


def _store_state(root: Path) -> tuple[FeatureStore | None, int]:
    stores = [p for p in root.iterdir() if p.is_dir()] if root.exists() else []
    if not stores:
        return None, 0
    store = FeatureStore(stores[0])
    return store, len(store.index)


@pytest.fixture(scope="module")
def reference(crash_samples, tiny_eva_module, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    # warm up here, so forked children inherit timm's lazy imports instead of paying seconds each
    extract_features(crash_samples[:1], tiny_eva_module, CRASH_CFG, store_root=root / "warm", progress=False)
    info = _run_child(crash_samples, tiny_eva_module, root, root, "ref")
    ids = sorted(s.sample_id for s in crash_samples)
    return {"info": info, "features": FeatureStore(info["store_dir"]).load(ids), "ids": ids}


@pytest.fixture(scope="module")
def tiny_eva_module():
    from stage1core.backbone import BackboneConfig
    from tests.common import TINY_EVA

    return BackboneConfig(name="vit_small_patch16_dinov3", weights="random", pooling="cls+avg",
                          model_kwargs=dict(TINY_EVA), input_size=32, seed=0)


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
        proc = FORK.Process(target=_child_extract, args=(crash_samples, tiny_eva_module, str(root), str(progress),
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
    info = _run_child(crash_samples, tiny_eva_module, root, tmp_path, "resume")
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
        procs.append(FORK.Process(target=_child_extract,
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
    first = extract_features.fn(strict, tiny_eva_module, feats_cfg)
    with pytest.raises(DataError, match=r"4\.0% of the images could not be used .*limit 3\.0%.*quarantine-") as err:
        check_quarantine.fn(strict, first)
    assert err.value.report == strict.quarantine_report

    # the next run with a looser limit continues, and reuses every feature already computed
    split = build_splits.fn(sources, splits, max_quarantined_fraction=0.05)
    info = extract_features.fn(split, tiny_eva_module, feats_cfg)
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
        extract_features.fn(ref, tiny_eva_module, FeatureConfig(num_workers=0))
    assert not (home / "features").exists() or not any((home / "features").rglob("*.npy"))


# ----------------------------------------------------------------------------------------------- bundles


@pytest.fixture(scope="module")
def bundle_parts(reference, crash_samples, tiny_eva_module, tmp_path_factory):
    from stage1core.backbone import resolve_backbone
    from stage1core.guarantees import GuaranteeConfig, fnr_threshold
    from stage1core.train import TrainConfig, fit_head, predict_positive, save_head

    root = tmp_path_factory.mktemp("bundle")
    store = FeatureStore(reference["info"]["store_dir"])
    by_id = {s.sample_id: s for s in crash_samples}
    x = store.load(reference["ids"])
    y = np.array([by_id[i].label for i in reference["ids"]])
    trained = fit_head(x, y, x, y, config=TrainConfig(epochs=2))
    save_head(root / "head", trained)
    p = predict_positive(trained.model, x)
    thr = fnr_threshold(p[y == 1], GuaranteeConfig(alpha=0.3, delta=0.3))
    kwargs = dict(
        name="rel", backbone=resolve_backbone(tiny_eva_module),
        preprocessing={**store.meta["preprocessing"], "precision": store.meta["precision"]}, head_dir=root / "head",
        policy_files={"thresholds.json": {"policy": "threshold", **thr.to_json()},
                      "policy.json": {"policy": "threshold", "gate_min_confidence": None}},
        metrics={"mcc": 0.1}, model_card="# card\n", inputs={"data_fingerprint": "d" * 64},
        files={"plots/reliability.png": encode(Image.new("RGB", (4, 4)), "PNG")},
        json_files={"test_predictions.json": {"p": p.tolist()}},
    )
    bundle = export_bundle(root / "bundles", **kwargs)
    return {"bundle": Path(bundle.path), "kwargs": kwargs, "root": root, "image": crash_samples[0].locator}


def _copy_bundle(parts, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(parts["bundle"], dst)
    return dst


def _resign(dst: Path, **changes) -> None:
    """Rewrite the manifest after a change, with matching hashes and fingerprint: only deeper checks can tell."""
    with edited_json(dst / "manifest.json") as manifest:
        manifest.update(changes)
        manifest["files"] = {rel: sha256_file(dst / rel) for rel in manifest["files"]}
        manifest["fingerprint"] = fingerprint("bundle", manifest["format_version"], manifest["name"],
                                              manifest["policy"], manifest["backbone_fingerprint"], manifest["files"],
                                              manifest["inputs"])


def test_the_untouched_bundle_loads(bundle_parts):
    predictor = load_bundle(bundle_parts["bundle"], device="cpu")
    assert 0.0 <= predictor(bundle_parts["image"]) <= 1.0


BUNDLE_FILES = ["head.safetensors", "head.json", "backbone.json", "preprocessing.json", "thresholds.json",
                "policy.json", "metrics.json", "model_card.md", "test_predictions.json", "plots/reliability.png"]


@pytest.mark.parametrize("rel", BUNDLE_FILES)
def test_a_flipped_byte_in_any_bundle_file_is_refused(bundle_parts, tmp_path, rel):
    dst = _copy_bundle(bundle_parts, tmp_path)
    data = bytearray((dst / rel).read_bytes())
    data[len(data) // 2] ^= 0x01
    (dst / rel).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{rel.split('/')[-1]}: sha256 .* does not match the manifest"):
        load_bundle(dst, device="cpu")


@pytest.mark.parametrize(("rel", "edit", "match"), [
    ("thresholds.json", lambda d: {**d, "alpha": 3.0}, "thresholds.json"),
    ("preprocessing.json", lambda d: {k: v for k, v in d.items() if k != "input_size"}, "preprocessing.json"),
    ("backbone.json", lambda d: {**d, "pooling": 7}, "backbone.json"),
    ("policy.json", lambda d: {**d, "policy": "magic"}, "policy.json"),
    ("thresholds.json", lambda d: "not json {", "thresholds.json: not valid JSON"),
    ("head.json", lambda d: {**d, "in_dim": 3}, "cannot build the head"),
])
def test_schema_or_content_violations_with_matching_hashes_are_refused(bundle_parts, tmp_path, rel, edit, match):
    dst = _copy_bundle(bundle_parts, tmp_path)
    new = edit(json.loads((dst / rel).read_text()))
    (dst / rel).write_text(new if isinstance(new, str) else json.dumps(new))
    _resign(dst)
    with pytest.raises(BundleError, match=match):
        load_bundle(dst, device="cpu")


def test_other_format_version_is_refused_by_name(bundle_parts, tmp_path):
    dst = _copy_bundle(bundle_parts, tmp_path)
    _resign(dst, format_version=2)
    with pytest.raises(BundleError, match="bundle format version 2; .* reads version 1"):
        load_bundle(dst, device="cpu")


def test_backbone_fingerprint_mismatch_is_refused(bundle_parts, tmp_path):
    dst = _copy_bundle(bundle_parts, tmp_path)
    with edited_json(dst / "backbone.json") as backbone:
        backbone["pooling"] = "avg"  # schema-valid, a different backbone: different features
    _resign(dst)
    with pytest.raises(BundleError, match="backbone fingerprint .* does not match the manifest"):
        load_bundle(dst, device="cpu")


def test_edited_manifest_fields_are_refused(bundle_parts, tmp_path):
    dst = _copy_bundle(bundle_parts, tmp_path)
    with edited_json(dst / "manifest.json") as manifest:
        manifest["inputs"]["data_fingerprint"] = "e" * 64
    with pytest.raises(BundleError, match="fingerprint does not match the manifest's contents"):
        load_bundle(dst, device="cpu")
    _resign(dst, policy="gate")  # a consistent manifest that disagrees with policy.json
    with pytest.raises(BundleError, match="policy.json: policy 'threshold' does not match"):
        load_bundle(dst, device="cpu")


def test_a_manifest_that_omits_a_file_the_predictor_reads_is_refused(bundle_parts, tmp_path):
    dst = _copy_bundle(bundle_parts, tmp_path)
    with edited_json(dst / "manifest.json") as manifest:
        del manifest["files"]["metrics.json"]  # the file stays, unverified: it must not be read
    with pytest.raises(BundleError, match="does not list \\['metrics.json'\\]"):
        load_bundle(dst, device="cpu")


@pytest.mark.parametrize("escape", ["../outside.json", "/etc/passwd", "plots/../../x", "symlink"])
def test_manifest_paths_cannot_escape_the_bundle(bundle_parts, tmp_path, escape):
    dst = _copy_bundle(bundle_parts, tmp_path)
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    with edited_json(dst / "manifest.json") as manifest:
        if escape == "symlink":
            (dst / "link.json").symlink_to(outside)
            escape = "link.json"
        manifest["files"][escape] = sha256_file(outside)
    with pytest.raises(BundleError, match="schema|outside the bundle"):
        load_bundle(dst, device="cpu")


def _child_export(out_root: str, kwargs: dict) -> None:
    """Forked child: export a bundle with every file write slowed down, so a kill can land anywhere."""
    real = Path.write_bytes

    def slow(self, data):
        time.sleep(0.02)
        real(self, data[: len(data) // 2])  # a write that a kill can cut in half
        time.sleep(0.02)
        return real(self, data)

    Path.write_bytes = slow
    export_bundle(out_root, **kwargs)


def test_a_killed_export_never_leaves_a_directory_that_loads(bundle_parts, tmp_path):
    rng = random.Random(11)
    out = tmp_path / "bundles"
    killed = 0
    for attempt in range(5):
        kwargs = {**bundle_parts["kwargs"], "name": f"killed{attempt}"}
        proc = FORK.Process(target=_child_export, args=(str(out), kwargs))
        proc.start()
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(60)  # returns as soon as the killed child is reaped
        killed += proc.exitcode == -signal.SIGKILL
        for directory in [p for p in out.iterdir() if p.is_dir()] if out.exists() else []:
            try:
                manifest = read_manifest(directory)
            except BundleError:
                # a broken directory never sits under a final name; unfinished ones keep their temp name
                assert directory.name.startswith(".") and directory.name.endswith(".tmp"), directory.name
                continue
            # only a complete export verifies: every file is there with the bytes the manifest names
            assert not directory.name.startswith(".") and set(manifest["files"]) >= set(BUNDLE_FILES)
    assert killed >= 3
    info = export_bundle(out, **{**bundle_parts["kwargs"], "name": "killed0"})  # the rerun completes
    assert load_bundle(info.path, device="cpu").threshold >= 0


def test_nothing_on_the_load_path_unpickles():
    """Static: no pickle-family import, no torch.load without weights_only=True, no np.load(allow_pickle=True)."""
    offenders = []
    for path in sorted((ROOT / "stage1core").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib")
                       for n in names):
                    offenders.append(f"{path.name}:{node.lineno} imports pickle")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                kw = {k.arg: k.value for k in node.keywords}
                owner = ast.unparse(node.func.value)
                if node.func.attr == "load" and owner == "torch":
                    value = kw.get("weights_only")
                    if not (isinstance(value, ast.Constant) and value.value is True):
                        offenders.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
                if node.func.attr == "load" and owner in ("np", "numpy"):
                    value = kw.get("allow_pickle")
                    if isinstance(value, ast.Constant) and value.value is True:
                        offenders.append(f"{path.name}:{node.lineno} np.load(allow_pickle=True)")
    assert offenders == []


def test_a_bundle_loads_and_predicts_with_pickle_blocked(bundle_parts, monkeypatch):
    import _pickle
    import pickle

    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling on the bundle load path")

    for module in (pickle, _pickle):
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    predictor = load_bundle(bundle_parts["bundle"], device="cpu")
    assert 0.0 <= predictor(Path(bundle_parts["image"]).read_bytes()) <= 1.0


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=json_values)
def test_random_manifests_only_ever_raise_bundle_error(doc, tmp_path):
    bundle = tmp_path / "fuzz"
    bundle.mkdir(exist_ok=True)
    (bundle / "a.json").write_text("{}")
    (bundle / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError):
        read_manifest(bundle)


MANIFEST_KEYS = ["format", "format_version", "name", "fingerprint", "files", "backbone_fingerprint", "policy",
                 "inputs", "code_version", "created_at", "backbone_random_init"]
file_names = st.sampled_from(BUNDLE_FILES + ["../x", "/abs", "a" * 300, ".", "plots", "nope.json", ""])
mutations = st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(MANIFEST_KEYS), json_values),
    st.tuples(st.just("del"), st.sampled_from(MANIFEST_KEYS), st.none()),
    st.tuples(st.just("file"), file_names, st.sampled_from(["0" * 64, "f" * 64, 5, None])),
    st.tuples(st.just("drop"), file_names, st.none()),
), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=mutations, resign=st.booleans())
def test_mutated_manifests_only_ever_raise_bundle_error(bundle_parts, tmp_path, edits, resign):
    dst = tmp_path / "m"
    if not dst.exists():
        shutil.copytree(bundle_parts["bundle"], dst)
    original = (bundle_parts["bundle"] / "manifest.json").read_text()
    manifest = json.loads(original)
    for op, key, value in edits:
        if op == "set":
            manifest[key] = value
        elif op == "del":
            manifest.pop(key, None)
        elif op == "file" and isinstance(manifest.get("files"), dict):
            manifest["files"][key] = value
        elif op == "drop" and isinstance(manifest.get("files"), dict):
            manifest["files"].pop(key, None)
    if resign:
        try:  # a consistent fingerprint over whatever the fields now say, to reach the deeper checks
            manifest["fingerprint"] = fingerprint("bundle", manifest["format_version"], manifest["name"],
                                                  manifest["policy"], manifest["backbone_fingerprint"],
                                                  manifest["files"], manifest["inputs"])
        except (KeyError, TypeError, ValueError):
            pass
    (dst / "manifest.json").write_text(json.dumps(manifest))
    try:
        load_bundle(dst, device="cpu")
    except BundleError:
        return
    finally:
        (dst / "manifest.json").write_text(original)
    assert manifest["files"] == json.loads(original)["files"]  # loads only when nothing that matters changed


# ----------------------------------------------------------------------------------------------- servers


def test_unreachable_mlflow_server_fails_fast_naming_the_setting(monkeypatch):
    from tasks.tracking import ServerUnreachable, start_mlflow_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    started = time.perf_counter()
    with pytest.raises(ServerUnreachable, match="MLFLOW_TRACKING_URI=http://127.0.0.1"):
        start_mlflow_run.fn("stage1", "run", {})
    # one refused connection takes milliseconds, MLflow's retries with backoff take minutes; the bound
    # sits between them with headroom for a loaded machine
    assert time.perf_counter() - started < 30.0


@pytest.mark.parametrize("setting", ["MLFLOW_TRACKING_URI", "PREFECT_API_URL"])
def test_cli_fails_fast_naming_the_unreachable_setting(setting, tmp_path, tiny_demo):
    env = {**os.environ, "STAGE1_HOME": str(tmp_path / "home"), setting: f"http://127.0.0.1:{closed_port()}/api"}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "deployments.cli", "train", "--source", str(tiny_demo)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    assert out.returncode == 2, out.stderr
    assert f"stage1: error: {setting}=http://127.0.0.1" in out.stderr and "unreachable" in out.stderr
    assert "Traceback" not in out.stderr
    # interpreter start plus one refused connection (0.3 s alone, seconds on a loaded machine), not the
    # clients' retries with backoff (a minute or more)
    assert elapsed < 30.0
    assert not (tmp_path / "home" / "features").exists()  # failed before any work


def test_features_computed_before_a_tracking_failure_are_reused(home, tmp_path, tiny_demo, tiny_eva_module,
                                                               monkeypatch):
    """MLflow goes away mid-run (after the features): the next run embeds nothing again."""
    from stage1core.splits import SplitConfig
    from tasks.pipeline import build_splits, extract_features
    from tasks.tracking import ServerUnreachable, start_mlflow_run

    sources = [SourceConfig(path=str(tiny_demo), kind="folder", name="tiny")]
    split = build_splits.fn(sources, SplitConfig(train=0.45, val=0.15, calib=0.25, test=0.15))
    first = extract_features.fn(split, tiny_eva_module, FeatureConfig(batch_size=32, num_workers=0))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(ServerUnreachable):
        start_mlflow_run.fn("stage1", "run", {})
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    again = extract_features.fn(split, tiny_eva_module, FeatureConfig(batch_size=32, num_workers=0))
    assert first.n_computed == split.n_samples and again.n_computed == 0
    assert again.fingerprint == first.fingerprint


# ----------------------------------------------------------------------------- deployment faults (issue 14)
# The `stage1` command as a deployment runs it: a subprocess in its own session (so that every process
# it starts can be found by session id in /proc), with its own $STAGE1_HOME, under bounded timeouts.

STAGE1 = Path(sys.executable).with_name("stage1")
TINY_EVA = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32}


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """The test session's environment without its Prefect/MLflow/stage1 settings, plus a home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "STAGE1_"))}
    env.update({"STAGE1_HOME": str(home), "PREFECT_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    env.update(extra)
    return env


def stage1_cmd() -> list[str]:
    if not STAGE1.exists():
        pytest.skip("the stage1 console script is not installed in this interpreter (make venv)")
    return [str(STAGE1)]


def start_stage1(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    out = open(log, "wb")
    return subprocess.Popen([*stage1_cmd(), *args], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def params_file(folder: Path, data: Path, model_name: str) -> Path:
    """`stage1 train --params` JSON for the tiny run on `data`, registering as `model_name`."""
    path = folder / "params.json"
    path.write_text(json.dumps(tiny_run_parameters(data, experiment="faults", model_name=model_name)))
    return path


def run_stage1(args: list[str], env: dict[str, str], cwd: Path, *, timeout: float = 900,
               stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*stage1_cmd(), *args], env=env, cwd=cwd, capture_output=True, timeout=timeout,
                          input=stdin if stdin is not None else b"", start_new_session=True)


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command) of every live (non-zombie) process in session `sid`, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            found.append((int(entry.name), cmd.strip()))
    return found


def wait_for(check, *, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def query(db: Path, sql: str, *args) -> list[tuple]:
    import sqlite3

    if not db.exists():
        return []
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []


def mlflow_db(home: Path) -> Path:
    return home / "mlflow" / "mlflow.db"


def prefect_db(home: Path) -> Path:
    return home / "prefect" / "prefect.db"


def text(proc: subprocess.CompletedProcess) -> tuple[str, str]:
    return proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


@pytest.fixture(scope="module")
def tiny_with_a_broken_image(tiny_demo, tmp_path_factory) -> Path:
    """The tiny demo data plus one undecodable image (1 of 121 rows: under the 1% quarantine limit)."""
    data = tmp_path_factory.mktemp("tiny-broken") / "data"
    shutil.copytree(tiny_demo, data)
    write(data / "roadwork" / "zz-broken.jpg", encode(photo(64, 64, seed=9), "JPEG")[:700])
    return data


@pytest.fixture(scope="module")
def fresh_home_runs(tiny_with_a_broken_image, tmp_path_factory):
    """Rows 2, 9, 11 and 13 in two commands: `stage1 train` on a home that does not exist yet, with
    MLFLOW_TRACKING_URI set, from a working directory holding a poisoned `inspect.py`; then the same
    command again (everything cached)."""
    tmp = tmp_path_factory.mktemp("fresh-home")
    home = tmp / "not" / "there" / "yet"
    cwd = tmp / "cwd"
    cwd.mkdir()
    marker = tmp / "shadowed"
    (cwd / "inspect.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\nraise ImportError('shadow')\n")
    params = params_file(tmp, tiny_with_a_broken_image, "stage1-faults")
    env = cli_env(home, MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'tracking.db'}")
    first = run_stage1(["train", "--params", str(params)], env, cwd)
    second = run_stage1(["train", "--params", str(params)], env, cwd)
    return {"home": home, "tmp": tmp, "marker": marker, "first": first, "second": second}


@pytest.mark.slow
def test_a_new_home_is_created_first_whatever_else_is_set(fresh_home_runs):
    out, err = text(fresh_home_runs["first"])
    assert fresh_home_runs["first"].returncode == 0, out[-3000:] + err[-5000:]
    for sub in ("prefect", "mlflow", "reports", "runs", "locks"):
        assert (fresh_home_runs["home"] / sub).is_dir()
    assert "Traceback" not in out + err and "Failed to create the Prefect home" not in out + err
    assert "model version: stage1-faults v1 (alias @challenger)" in out


@pytest.mark.slow
def test_no_child_process_imports_from_the_working_directory(fresh_home_runs):
    assert fresh_home_runs["first"].returncode == 0
    assert not fresh_home_runs["marker"].exists(), "a process imported inspect.py from the working directory"


@pytest.mark.slow
def test_the_run_reports_its_quarantine_in_the_summary_prefect_and_mlflow(fresh_home_runs):
    from mlflow.tracking import MlflowClient

    out, err = text(fresh_home_runs["first"])
    assert fresh_home_runs["first"].returncode == 0, err[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("quarantine:"))
    assert "quarantine: 1 of 121 images left out (0 unreadable, 1 undecodable), listed in " in line
    report = Path(line.rsplit(" listed in ", 1)[1])
    assert report.parent == fresh_home_runs["home"] / "reports"
    doc = json.loads(report.read_text())
    assert doc["counts"]["decode"] == 1 and doc["entries"][0]["locator"].endswith("zz-broken.jpg")
    run_id = next(x for x in out.splitlines() if x.startswith("MLflow run:")).split()[2]
    client = MlflowClient(tracking_uri=f"sqlite:///{fresh_home_runs['tmp'] / 'tracking.db'}")
    run = client.get_run(run_id)
    assert run.data.metrics["quarantine/decode"] == 1 and run.data.tags["quarantine.report"] == str(report)
    assert any(a.path.endswith(report.name) for a in client.list_artifacts(run_id, "quarantine"))
    summaries = query(prefect_db(fresh_home_runs["home"]), "select data from artifact where key = 'run-summary'")
    assert any(str(report) in row[0] for row in summaries)
    # the second run writes its own report, under its own name
    line2 = next(x for x in text(fresh_home_runs["second"])[0].splitlines() if x.startswith("quarantine:"))
    assert line2.rsplit(" listed in ", 1)[1] != str(report)


@pytest.mark.slow
def test_a_fully_cached_rerun_says_nothing_was_embedded(fresh_home_runs):
    out, err = text(fresh_home_runs["second"])
    assert fresh_home_runs["second"].returncode == 0, err[-3000:]
    assert "features: 0 embedded now, 120 from cache" in out
    assert "features: 120 embedded now, 0 from cache" in text(fresh_home_runs["first"])[0]
    assert "model version: stage1-faults v1 (alias @challenger)" in out  # no duplicate version


class HungServer:
    """A loopback server that accepts connections and never answers (a hung MLflow or Prefect)."""

    def __init__(self):
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def hung_server():
    server = HungServer()
    yield server
    server.close()


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["MLFLOW_TRACKING_URI", "PREFECT_API_URL"])
def test_a_server_that_accepts_and_never_answers_is_named_within_a_minute(setting, hung_server, tmp_path, tiny_demo):
    url = f"http://127.0.0.1:{hung_server.port}" + ("/api" if setting == "PREFECT_API_URL" else "")
    started = time.monotonic()
    proc = run_stage1(["train", "--source", str(tiny_demo)], cli_env(tmp_path / "home", **{setting: url}), tmp_path,
                      timeout=120)
    elapsed = time.monotonic() - started
    out, err = text(proc)
    what = "MLflow server" if setting == "MLFLOW_TRACKING_URI" else "Prefect server"
    assert proc.returncode == 2, out + err
    assert f"stage1: error: {what} at {url} does not answer (waited 10 s" in err
    assert "Traceback" not in out + err
    assert elapsed < 60
    assert not (tmp_path / "home" / "features").exists()


@pytest.fixture
def keep_mlflow_tracking_uri():
    """tasks.tracking.client() sets MLflow's process-wide tracking URI; put back the session's."""
    import mlflow

    saved = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(saved)


@pytest.mark.slow
def test_closing_a_run_on_a_server_that_stopped_answering_is_bounded(hung_server, monkeypatch,
                                                                    keep_mlflow_tracking_uri):
    """The flow's failure path ends its MLflow run with a short deadline: a hung server cannot hold the exit."""
    from tasks import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{hung_server.port}")
    monkeypatch.setattr(tracking, "_initialised", {f"http://127.0.0.1:{hung_server.port}"})
    started = time.monotonic()
    tracking.close_run("0" * 32, KeyboardInterrupt())  # logs a warning, never raises
    assert time.monotonic() - started < 20


def test_mlflow_and_prefect_calls_have_product_deadlines():
    from stage1core.home import configure_environment

    saved = dict(os.environ)
    try:
        for key in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "PREFECT_API_REQUEST_TIMEOUT",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "PYTHONSAFEPATH"):
            os.environ.pop(key, None)
        configure_environment()
        timeout = int(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"])
        retries = int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
        backoff = int(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
        # worst case of one MLflow call: every attempt times out, plus the backoff between them
        assert (retries + 1) * timeout + sum(backoff * 2**i for i in range(retries)) < 60
        assert int(os.environ["PREFECT_API_REQUEST_TIMEOUT"]) <= 60
        assert int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) >= 120
        assert os.environ["PYTHONSAFEPATH"] == "1"
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _in_flight(home: Path) -> list[dict]:
    out = []
    for path in (home / "runs").glob("*.json"):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
    return out


@pytest.mark.slow
def test_sigterm_stops_a_run_within_seconds_and_marks_it_ended(tmp_path, tiny_demo):
    home = tmp_path / "home"
    params = params_file(tmp_path, tiny_demo, "stage1-sigterm")
    proc = start_stage1(["train", "--params", str(params)], cli_env(home), tmp_path, tmp_path / "log")
    try:
        entry = wait_for(lambda: _in_flight(home), timeout=600, what="the MLflow run to start", every=0.2)[0]
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = proc.wait(timeout=60)
        stopped_in = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "log").read_text(errors="replace")
    assert code == 128 + signal.SIGTERM, log[-4000:]
    assert "stage1: stopped by SIGTERM" in log and "Traceback" not in log
    assert stopped_in < 30
    wait_for(lambda: not session_processes(proc.pid), timeout=120, what="the local Prefect server to exit")
    status = query(mlflow_db(home), "select status from runs where run_uuid = ?", entry["mlflow_run_id"])
    assert status == [("KILLED",)]
    states = query(prefect_db(home), "select state_type from flow_run where name is not null")
    assert states and all(s == "CANCELLED" for (s,) in states), states
    assert not _in_flight(home)


@pytest.mark.slow
def test_kill9_right_after_the_version_is_created_leaves_no_orphan_and_the_rerun_completes_it(tmp_path, tiny_demo):
    home = tmp_path / "home"
    params = params_file(tmp_path, tiny_demo, "stage1-kill9")
    env = cli_env(home)
    proc = start_stage1(["train", "--params", str(params)], env, tmp_path, tmp_path / "log")
    try:
        wait_for(lambda: query(mlflow_db(home), "select version from model_versions where name = 'stage1-kill9'"),
                 timeout=900, what="the model version to be created", every=0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        # the local Prefect server (and anything else it started) dies with it
        wait_for(lambda: not session_processes(proc.pid), timeout=120,
                 what=f"no orphan (left: {session_processes(proc.pid)})")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (killed,) = _in_flight(home)
    assert query(mlflow_db(home), "select status from runs where run_uuid = ?", killed["mlflow_run_id"]) == [
        ("RUNNING",)]

    again = run_stage1(["train", "--params", str(params)], env, tmp_path)
    out, err = text(again)
    assert again.returncode == 0, out[-3000:] + err[-3000:]
    assert "model version: stage1-kill9 v1 (alias @challenger)" in out
    versions = query(mlflow_db(home), "select version from model_versions where name = 'stage1-kill9'")
    assert versions == [(1,)]
    tags = dict(query(mlflow_db(home), "select key, value from model_version_tags where name = 'stage1-kill9'"))
    assert {"bundle_fingerprint", "data_fingerprint", "test_mcc", "quality"} <= set(tags)
    assert query(mlflow_db(home), "select alias, version from registered_model_aliases where name = 'stage1-kill9'"
                 ) == [("challenger", 1)]
    # the killed run's MLflow run and flow run are closed, with a note
    assert query(mlflow_db(home), "select status from runs where run_uuid = ?", killed["mlflow_run_id"]) == [
        ("KILLED",)]
    note = query(mlflow_db(home), "select value from tags where run_uuid = ? and key = 'stage1.closed'",
                 killed["mlflow_run_id"])
    assert note and f"process {killed['pid']}" in note[0][0]
    assert query(prefect_db(home), "select state_type from flow_run where id = ?", killed["flow_run_id"]) == [
        ("CRASHED",)]
    assert not _in_flight(home)


@pytest.fixture
def registry_home(tmp_path, monkeypatch, keep_mlflow_tracking_uri):
    from tasks import tracking

    monkeypatch.setenv("STAGE1_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'registry.db'}")
    monkeypatch.setattr(tracking, "_initialised", set())
    return tmp_path


@pytest.mark.parametrize("left", ["untagged_version", "version_without_alias"])
def test_a_half_registered_bundle_is_completed_not_registered_again(registry_home, bundle_parts, left):
    """What a kill between "Created version" and the tags or the alias leaves (an untagged version is what
    the old registration left; the current one creates a version with its tags in one call)."""
    from stage1core.bundle import BundleInfo
    from tasks.tracking import client, ensure_experiment, register_bundle

    manifest = read_manifest(bundle_parts["bundle"])
    bundle = BundleInfo(path=str(bundle_parts["bundle"]), fingerprint=manifest["fingerprint"], name="rel")
    mc = client()
    killed = mc.create_run(ensure_experiment("registry"), tags={"bundle_fingerprint": bundle.fingerprint})
    mc.create_registered_model("half")
    if left == "untagged_version":
        mc.create_model_version("half", source=str(bundle_parts["bundle"]), run_id=killed.info.run_id)
    else:
        mc.create_model_version("half", source=str(bundle_parts["bundle"]), run_id=killed.info.run_id,
                                tags={"bundle_fingerprint": bundle.fingerprint})
    rerun = mc.create_run(ensure_experiment("registry"))
    out = register_bundle.fn(rerun.info.run_id, bundle, model_name="half", alias="challenger",
                             tags={"data_fingerprint": "d" * 64}, description="the card")
    assert out["version"] == "1"
    versions = mc.search_model_versions("name = 'half'")
    assert [str(v.version) for v in versions] == ["1"]
    version = versions[0]
    assert version.tags["bundle_fingerprint"] == bundle.fingerprint and version.tags["data_fingerprint"] == "d" * 64
    assert version.description == "the card"
    assert str(mc.get_model_version_by_alias("half", "challenger").version) == "1"
    # a second registration of the same bundle is a no-op
    register_bundle.fn(rerun.info.run_id, bundle, model_name="half", alias="challenger", tags={}, description="x")
    assert len(mc.search_model_versions("name = 'half'")) == 1


def _first_mlflow_use(uri: str, home: str, ready, go, out) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["STAGE1_HOME"] = home
    try:
        from tasks.tracking import client, ensure_experiment

        ready.put(os.getpid())
        go.wait(300)
        client()
        ensure_experiment("race")
        out.put("ok")
    except BaseException as exc:  # noqa: BLE001
        out.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.slow
def test_concurrent_first_runs_set_up_the_mlflow_database_once(tmp_path):
    """Four processes open a fresh SQLite tracking store at the same instant (MLflow's migrations raced:
    alembic "Online migration expected to match one row", "duplicate column name")."""
    spawn = multiprocessing.get_context("spawn")
    ready, go, out = spawn.Queue(), spawn.Event(), spawn.Queue()
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    procs = [spawn.Process(target=_first_mlflow_use, args=(uri, str(tmp_path / "home"), ready, go, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    for _ in procs:  # all imported: then they open the store at the same instant
        ready.get(timeout=HANG_TIMEOUT_S)
    go.set()
    results = [out.get(timeout=HANG_TIMEOUT_S) for _ in procs]
    for p in procs:
        p.join(60)
    assert results == ["ok"] * 4, results


def _read_only(path: Path):
    """Make `path` read-only for the stage1 process: a read-only bind mount when root (root ignores
    permissions), else mode 0555."""
    if os.geteuid() == 0:
        if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode != 0 or \
                subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a read-only mount here")
        return lambda: subprocess.run(["umount", "-l", str(path)], capture_output=True)
    path.chmod(0o555)
    return lambda: path.chmod(0o755)


@pytest.mark.parametrize("filled", [False, True])
def test_a_read_only_home_is_one_clear_error_and_help_still_works(tmp_path, tiny_demo, filled):
    home = tmp_path / "home"
    home.mkdir()
    if filled:
        for sub in ("prefect", "mlflow"):
            (home / sub).mkdir()
        (home / "prefect" / "prefect.db").write_bytes(b"")
    undo = _read_only(home)
    try:
        env = cli_env(home)
        help_ = run_stage1(["--help"], env, tmp_path, timeout=HANG_TIMEOUT_S)
        assert help_.returncode == 0 and b"usage: stage1" in help_.stdout, help_.stderr[-2000:]
        started = time.monotonic()
        proc = run_stage1(["train", "--source", str(tiny_demo)], env, tmp_path, timeout=HANG_TIMEOUT_S)
        out, err = text(proc)
        assert proc.returncode == 2, out + err
        assert f"stage1: error: {home}" in err and "is read-only" in err and "STAGE1_HOME" in err
        assert "Traceback" not in out + err and err.count("\n") == 1
        assert time.monotonic() - started < 60
    finally:
        undo()


def _tmpfs(path: Path, size: str):
    """Mount a small tmpfs at `path` (root only; skipped elsewhere). Returns the unmount function."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root and mount")
    return lambda: subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_home_is_one_clear_error_before_any_server_starts(tmp_path, tiny_demo):
    home = tmp_path / "home"
    undo = _tmpfs(home, "2m")
    try:
        with open(home / "filler", "wb") as fh:
            with pytest.raises(OSError):
                while True:
                    fh.write(b"\0" * 65536)
        proc = run_stage1(["train", "--source", str(tiny_demo)], cli_env(home), tmp_path, timeout=HANG_TIMEOUT_S)
        out, err = text(proc)
        assert proc.returncode == 2, out + err
        assert "stage1: error:" in err and str(home) in err and ("no space left" in err or "MB free" in err)
        assert "Traceback" not in out + err and err.count("\n") == 1
        assert not (home / "prefect" / "prefect.db").exists()
    finally:
        undo()


@pytest.mark.slow
def test_a_disk_that_fills_during_a_run_fails_it_cleanly_and_the_rerun_completes(tmp_path, tiny_demo):
    home = tmp_path / "home"
    params = params_file(tmp_path, tiny_demo, "stage1-full")
    env = cli_env(home)
    undo = _tmpfs(home / "evaluations", "16k")  # metrics, plots and predictions land here: ENOSPC mid-run
    try:
        proc = run_stage1(["train", "--params", str(params)], env, tmp_path)
        out, err = text(proc)
    finally:
        undo()
    assert proc.returncode == 2, out[-3000:] + err[-3000:]
    assert f"stage1: error: no space left on the device of {home}" in err
    assert "Traceback" not in out + err
    assert query(prefect_db(home), "select state_type from flow_run") == [("FAILED",)]
    assert query(mlflow_db(home), "select status from runs") == [("FAILED",)]
    again = run_stage1(["train", "--params", str(params)], env, tmp_path)
    out, err = text(again)
    assert again.returncode == 0, out[-3000:] + err[-3000:]
    assert "features: 0 embedded now" in out  # nothing computed before the fault was lost


@pytest.mark.slow
def test_a_prefect_server_that_cannot_start_in_time_is_one_clear_line(tmp_path, tiny_demo):
    """Row 8 (a loaded machine): the start-up timeout is lowered to 1 s so that the server cannot make it."""
    proc = start_stage1(["train", "--source", str(tiny_demo)],
                        cli_env(tmp_path / "home", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1"), tmp_path,
                        tmp_path / "log")
    code = proc.wait(timeout=HANG_TIMEOUT_S)
    log = (tmp_path / "log").read_text(errors="replace")
    assert code == 2, log
    assert "stage1: error: the local Prefect server did not answer within 1 s" in log
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in log and "Traceback" not in log
    wait_for(lambda: not session_processes(proc.pid), timeout=120, what="the server to be stopped")


@pytest.mark.slow
def test_conflicting_labels_are_all_reported_before_the_run_stops(tmp_path, tiny_demo):
    images = sorted((tiny_demo / "roadwork").glob("*.jpg"))[:3]
    rows = ["image_path,label"] + [f"{p},1" for p in sorted(tiny_demo.rglob("*.jpg"))]
    rows += [f"{images[0]},0", f"{images[1]},0", f"{tmp_path / 'gone.jpg'},1"]  # two conflicts, one missing file
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    home = tmp_path / "home"
    proc = run_stage1(["train", "--source", str(labels)], cli_env(home), tmp_path)
    out, err = text(proc)
    assert proc.returncode == 2, out[-3000:] + err[-3000:]
    assert "Traceback" not in out + err
    (line,) = [x for x in err.splitlines() if x.startswith("stage1:")]
    assert "stage1: error: 2 label conflict(s), every one listed in " in line and str(images[0]) in line
    (report,) = (home / "reports").glob("quarantine-*.json")
    assert str(report) in line
    entries = json.loads(report.read_text())["entries"]
    conflicts = [e for e in entries if e["stage"] == "conflict"]
    assert {e["locator"] for e in conflicts} == {str(images[0]), str(images[1])}
    assert all(e["row"] and "label 0 here, label 1 at" in e["reason"] for e in conflicts)
    assert [e["reason"] for e in entries if e["stage"] == "scan"] == ["missing file"]
    assert query(prefect_db(home), "select state_type from flow_run") == [("FAILED",)]


@pytest.fixture(scope="module")
def predict_inputs(bundle_parts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    good = Path(bundle_parts["image"])
    folder = tmp / "folder"
    for i in range(3):
        write(folder / "sub" / f"img{i}.jpg", good.read_bytes())
    (tmp / "empty-folder").mkdir()
    return {"good": good, "empty": write(tmp / "empty.jpg", b""),
            "bomb": write(tmp / "bomb.png", png_claiming(20000, 20000)), "folder": folder,
            "empty_folder": tmp / "empty-folder", "tmp": tmp}


@pytest.mark.slow
def test_predict_reports_each_bad_input_and_predicts_the_others(bundle_parts, predict_inputs):
    i = predict_inputs
    args = ["predict", str(bundle_parts["bundle"]), str(i["good"]), str(i["empty"]), str(i["folder"]), str(i["bomb"]),
            str(i["empty_folder"]), str(i["good"])]
    proc = run_stage1(args, cli_env(i["tmp"] / "home"), i["tmp"], timeout=HANG_TIMEOUT_S)
    out, err = text(proc)
    assert proc.returncode == 1, out + err
    assert "Traceback" not in out + err
    lines = [json.loads(x) for x in out.splitlines()]
    by_image = {}
    for line in lines:
        by_image.setdefault(line["image"], []).append(line)
    assert len(by_image[str(i["good"])]) == 2 and all("p_roadwork" in r for r in by_image[str(i["good"])])
    assert [r["image"] for r in lines if "p_roadwork" in r].count(str(i["good"])) == 2
    assert sorted(k for k in by_image if "folder/sub" in k) == [str(i["folder"] / "sub" / f"img{n}.jpg")
                                                                 for n in range(3)]
    assert "empty input (0 bytes)" in by_image[str(i["empty"])][0]["error"]
    assert "too large" in by_image[str(i["bomb"])][0]["error"]
    assert "no images" in by_image[str(i["empty_folder"])][0]["error"]
    for bad in ("empty", "bomb", "empty_folder"):
        assert f"stage1: {i[bad]}: " in err
    assert "stage1: 3 of 8 inputs could not be predicted" in err
    # one line per input, in the order given (a directory in place of its images)
    expected = [str(i["good"]), str(i["empty"])] + [str(i["folder"] / "sub" / f"img{n}.jpg") for n in range(3)] + [
        str(i["bomb"]), str(i["empty_folder"]), str(i["good"])]
    assert [r["image"] for r in lines] == expected


@pytest.mark.slow
def test_predict_reads_a_list_or_an_image_from_stdin(bundle_parts, predict_inputs):
    i = predict_inputs
    env = cli_env(i["tmp"] / "home")
    listed = run_stage1(["predict", str(bundle_parts["bundle"]), "-"], env, i["tmp"], timeout=HANG_TIMEOUT_S,
                        stdin=f"{i['good']}\n{i['empty']}\n".encode())
    out, err = text(listed)
    assert listed.returncode == 1 and "Traceback" not in out + err
    assert [json.loads(x)["image"] for x in out.splitlines()] == [str(i["good"]), str(i["empty"])]
    image = run_stage1(["predict", str(bundle_parts["bundle"]), "-"], env, i["tmp"], timeout=HANG_TIMEOUT_S,
                       stdin=i["good"].read_bytes())
    out, err = text(image)
    assert image.returncode == 0, err
    (result,) = [json.loads(x) for x in out.splitlines()]
    assert result["image"] == "-" and 0.0 <= result["p_roadwork"] <= 1.0


def test_predict_on_a_directory_does_not_raise_is_a_directory(bundle_parts):
    """The Predictor itself names the path and says why, for a directory as for a bad file."""
    predictor = load_bundle(bundle_parts["bundle"], device="cpu")
    with pytest.raises(ImageDecodeError, match=rf"^{bundle_parts['root']}: cannot read the file"):
        predictor.predict([bundle_parts["root"]])
    results = predictor.predict([bundle_parts["root"], bundle_parts["image"]], errors="report")
    assert "cannot read the file" in results[0]["error"] and "p_roadwork" in results[1]


def _forge_threshold(bundle: Path, threshold: float) -> None:
    """Edit the decision threshold and re-hash everything, fingerprint included: a consistent forgery."""
    with edited_json(bundle / "thresholds.json") as doc:
        doc["threshold"] = threshold
    _resign(bundle)


def test_a_rehashed_forgery_fails_against_the_registered_fingerprint(bundle_parts, tmp_path):
    registered = read_manifest(bundle_parts["bundle"])["fingerprint"]
    forged = _copy_bundle(bundle_parts, tmp_path)
    _forge_threshold(forged, 0.0)
    load_bundle(forged, device="cpu")  # integrity alone cannot tell: every hash matches
    with pytest.raises(BundleError, match="is not the registered .*changed after registration"):
        load_bundle(forged, device="cpu", expected_fingerprint=registered)
    load_bundle(bundle_parts["bundle"], device="cpu", expected_fingerprint=registered)


def test_a_signed_bundle_loads_and_a_forged_or_unsigned_one_does_not(bundle_parts, tmp_path, monkeypatch):
    from stage1core.signing import generate_keypair, sign_manifest

    key, pub = generate_keypair(tmp_path / "keys")
    other_key, _ = generate_keypair(tmp_path / "other", name="other")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    signed = _copy_bundle(bundle_parts, tmp_path)
    sign_manifest(signed, key)
    monkeypatch.setenv("STAGE1_BUNDLE_PUBLIC_KEY", str(pub))
    load_bundle(signed, device="cpu")  # the signature is not a listed file, and verifies
    with pytest.raises(BundleError, match="not signed"):
        load_bundle(bundle_parts["bundle"], device="cpu")
    _forge_threshold(signed, 0.0)
    with pytest.raises(BundleError, match="does not verify"):
        load_bundle(signed, device="cpu")
    sign_manifest(signed, other_key)  # re-signed, but not with the team's key
    with pytest.raises(BundleError, match="does not verify"):
        load_bundle(signed, device="cpu")


def test_export_signs_with_the_team_key(bundle_parts, tmp_path, monkeypatch):
    from stage1core.signing import generate_keypair, verify_manifest

    key, pub = generate_keypair(tmp_path / "keys")
    info = export_bundle(tmp_path / "bundles", **bundle_parts["kwargs"], signing_key=key)
    verify_manifest(info.path, pub)
    assert read_manifest(info.path)["fingerprint"] == read_manifest(bundle_parts["bundle"])["fingerprint"]
