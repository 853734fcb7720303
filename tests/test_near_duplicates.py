"""Near-duplicates: pHash, the content-addressed hash store, the exact Hamming search, bounded groups,
and the build_splits task putting jittered copies of one demo scene in one split as data grows."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stage1core import near_duplicates as nd
from stage1core.demo import DemoConfig, near_duplicate, render_demo_image
from stage1core.near_duplicates import (
    HashStore,
    group_near_duplicates,
    hamming_pairs,
    perceptual_hashes,
    phash_bytes,
    phash_image,
    popcount,
)
from stage1core.sources import Sample, SourceConfig
from stage1core.splits import SplitConfig, plan_splits

SCENES = DemoConfig(n_images=40, seed=11, n_large=0, png_fraction=0.0, exif_fraction=0.0, min_size=256, max_size=360)


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def distance(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def brute_force(values: np.ndarray, radius: int) -> np.ndarray:
    d = popcount((values[:, None] ^ values[None, :]).ravel()).reshape(len(values), len(values))
    i, j = np.nonzero(np.triu(d <= radius, 1))
    return np.stack([i, j], axis=1)


@pytest.fixture(scope="module")
def scenes() -> list[Image.Image]:
    return [render_demo_image(SCENES, i) for i in range(SCENES.n_images)]


# ----------------------------------------------------------------------------------------------- hashing


def test_jittered_copies_of_a_scene_group_together_and_scenes_stay_apart(scenes):
    config = SplitConfig()
    hashes, scene_of = {}, {}
    for k, scene in enumerate(scenes):
        for data in [jpeg(scene)] + [near_duplicate(scene, seed=100 * j + k) for j in range(1, 4)]:
            sid = hashlib.sha256(data).hexdigest()
            hashes[sid], scene_of[sid] = phash_bytes(data), k
    near = [distance(a, b) for a in hashes.values() for b in hashes.values() if a != b]
    assert np.median(near) > 3 * config.near_duplicate_radius  # unrelated scenes are far apart

    found = group_near_duplicates(hashes, radius=config.near_duplicate_radius,
                                  diameter=config.near_duplicate_diameter)
    samples = [Sample(sid, scene_of[sid] % 2, "s", "all", "/x") for sid in hashes]
    plan = plan_splits(samples, config, links=found.links)
    groups: dict[int, set[str]] = {}
    scenes_in: dict[str, set[int]] = {}
    for sid, k in scene_of.items():
        groups.setdefault(k, set()).add(plan.group_of[sid])
        scenes_in.setdefault(plan.group_of[sid], set()).add(k)
    assert all(len(ks) == 1 for ks in scenes_in.values())  # no group mixes two scenes
    whole = [k for k, g in groups.items() if len(g) == 1]
    # the benchmark's goal (bench/near_duplicates.py): >= 95% of bursts whole; here 39 of 40 (one copy of
    # scene 7 is 12 bits from the other three, beyond the radius)
    assert len(whole) >= 0.95 * len(scenes)
    assert plan.stats.largest_group == 4 and plan.stats.n_groups <= len(scenes) + 2
    split_of = {s.sample_id: name for name, rows in plan.splits.items() for s in rows}
    assert all(len({split_of[sid] for sid in scene_of if scene_of[sid] == k}) == 1 for k in whole)
    # without the links, the copies of most scenes scatter
    apart = plan_splits(samples, config).splits
    split_of = {s.sample_id: name for name, rows in apart.items() for s in rows}
    assert sum(len({split_of[sid] for sid in scene_of if scene_of[sid] == k}) > 1 for k in groups) > 10


def test_phash_ignores_brightness_and_exif_rotation_but_not_content(scenes):
    scene = scenes[0]
    base = phash_image(scene)
    darker = scene.point(lambda v: int(v * 0.7))
    assert distance(base, phash_image(darker)) <= 2
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned; an EXIF-aware decoder turns it back
    scene.transpose(Image.Transpose.ROTATE_90).save(buffer, "JPEG", quality=95, exif=exif)
    assert distance(base, phash_bytes(buffer.getvalue())) <= 4
    assert distance(base, phash_image(scene.transpose(Image.Transpose.FLIP_TOP_BOTTOM))) > 16


def test_flat_images_have_no_hash():
    assert phash_image(Image.new("RGB", (64, 48), (0, 0, 0))) is None
    assert phash_image(Image.new("RGB", (64, 48), (250, 250, 250))) is None
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    assert phash_image(noisy) is not None


def test_demo_near_duplicate_is_deterministic_and_a_distinct_file(scenes):
    a, b = near_duplicate(scenes[1], seed=3), near_duplicate(scenes[1], seed=3)
    assert a == b and a != near_duplicate(scenes[1], seed=4) and a != jpeg(scenes[1])
    assert Image.open(io.BytesIO(a)).size == scenes[1].size


# ----------------------------------------------------------------------------------------------- store


def write_images(folder: Path, images: list[bytes]) -> list[Sample]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, data in enumerate(images):
        path = folder / f"{i:03d}.img"
        path.write_bytes(data)
        out.append(Sample(hashlib.sha256(data).hexdigest(), i % 2, "s", "all", str(path)))
    return out


def counting(monkeypatch) -> list[bytes]:
    calls: list[bytes] = []
    real = nd.phash_bytes

    def counted(data: bytes):
        calls.append(data)
        return real(data)

    monkeypatch.setattr(nd, "phash_bytes", counted)
    return calls


def test_the_store_hashes_only_new_images(tmp_path, scenes, monkeypatch):
    calls = counting(monkeypatch)
    images = [jpeg(s) for s in scenes[:8]]
    old = write_images(tmp_path / "old", images[:6])
    first = perceptual_hashes(old, cache_dir=tmp_path / "store")
    assert (first.n_computed, first.n_cached, len(calls)) == (6, 0, 6)

    new = write_images(tmp_path / "new", images[6:])
    calls.clear()
    second = perceptual_hashes(old + new, cache_dir=tmp_path / "store", workers=2)
    assert (second.n_computed, second.n_cached, len(calls)) == (2, 6, 2)
    assert second.hashes == {s.sample_id: phash_bytes(Path(s.locator).read_bytes()) for s in old + new}

    calls.clear()
    assert perceptual_hashes(old + new, cache_dir=tmp_path / "store").n_computed == 0 and not calls


def test_the_store_keeps_digests_that_end_in_zero_bytes(tmp_path, scenes):
    [sample] = write_images(tmp_path, [jpeg(scenes[0])])
    odd = Sample("ab" * 30 + "0000", 1, "s", "all", sample.locator)  # a digest ending in two zero bytes
    perceptual_hashes([odd], cache_dir=tmp_path / "store")
    assert odd.sample_id in HashStore(tmp_path / "store").load()
    assert perceptual_hashes([odd], cache_dir=tmp_path / "store").n_computed == 0


def test_undecodable_images_are_reported_and_retried_flat_ones_stored(tmp_path, monkeypatch):
    calls = counting(monkeypatch)
    broken, black = write_images(tmp_path, [b"not an image at all", jpeg(Image.new("RGB", (80, 60)))])
    result = perceptual_hashes([broken, black], cache_dir=tmp_path / "store")
    assert list(result.failed) == [broken.sample_id] and "not an image" in result.failed[broken.sample_id]
    assert result.flat == [black.sample_id] and result.hashes == {}
    calls.clear()
    again = perceptual_hashes([broken, black], cache_dir=tmp_path / "store")
    assert len(calls) == 1 and again.flat == [black.sample_id] and list(again.failed) == [broken.sample_id]


def test_many_shards_are_compacted(tmp_path, scenes, monkeypatch):
    monkeypatch.setattr(nd, "_COMPACT_SHARDS", 3)
    samples = write_images(tmp_path, [jpeg(s) for s in scenes[:6]])
    for k in range(1, 7):
        perceptual_hashes(samples[:k], cache_dir=tmp_path / "store")
    store = HashStore(tmp_path / "store")
    assert len(store.shards()) <= 3
    assert set(store.load()) == {s.sample_id for s in samples}


# ----------------------------------------------------------------------------------------------- search


@pytest.mark.parametrize("radius", [0, 1, 3, 6, 10, 16, 24])
@pytest.mark.parametrize("n", [2, 300, 2500])
def test_search_finds_exactly_the_brute_force_pairs(radius, n):
    rng = np.random.default_rng(radius * 1000 + n)
    values = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    # plant neighbours at every distance up to radius + 2, and a few exact duplicates
    for i in range(0, n - 1, 2):
        bits = rng.choice(64, size=int(rng.integers(0, radius + 3)), replace=False)
        values[i + 1] = values[i] ^ np.uint64(sum(1 << int(b) for b in bits))
    values[-3:] = values[0]
    got = hamming_pairs(values, radius)
    want = brute_force(values, radius)
    np.testing.assert_array_equal(got, want)
    if n > 2:  # the boundary is exercised: pairs at exactly the radius are in, one bit more are out
        d = popcount(values[want[:, 0]] ^ values[want[:, 1]])
        assert (d == radius).any() and len(want) > n // 10


def test_search_on_clustered_hashes_and_bad_radius():
    rng = np.random.default_rng(7)
    centre = rng.integers(0, 2**64, dtype=np.uint64)
    # 400 hashes within a few bits of one centre: every block lookup hits a big run of equal keys
    values = np.array([centre ^ np.uint64(sum(1 << int(b) for b in rng.choice(64, size=3, replace=False)))
                       for _ in range(400)], dtype=np.uint64)
    np.testing.assert_array_equal(hamming_pairs(values, 5), brute_force(values, 5))
    with pytest.raises(ValueError, match="radius"):
        hamming_pairs(values, 64)


# ----------------------------------------------------------------------------------------------- groups


def ids(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


def test_the_diameter_bound_stops_chaining():
    # a chain: each hash 3 bits from the previous one, so the ends are 27 bits apart
    chain = [sum(1 << b for b in range(3 * k)) for k in range(10)]
    hashes = dict(zip(ids(10), chain, strict=True))
    single = group_near_duplicates(hashes, radius=4, diameter=63)
    assert single.largest_group == 10 and single.grouped_samples == 10 and not single.loose_pairs
    bounded = group_near_duplicates(hashes, radius=4, diameter=6)
    labels = plan_splits([Sample(sid, 0, "s", "all", "/x") for sid in hashes], SplitConfig(),
                         links=bounded.links).group_of
    groups: dict[str, list[int]] = {}
    for sid, value in hashes.items():
        groups.setdefault(labels[sid], []).append(value)
    assert max(len(g) for g in groups.values()) == bounded.largest_group <= 3
    for members in groups.values():  # every two members within the diameter
        assert all(distance(a, b) <= 6 for a in members for b in members)
    # every chain step that was left out is reported as loose, and only those
    left_out = {tuple(sorted(p)) for p in bounded.loose_pairs}
    steps = {tuple(sorted((a, b))) for a, b in zip(ids(10), ids(10)[1:], strict=False)}
    assert left_out == {s for s in steps if labels[s[0]] != labels[s[1]]} and left_out


def test_identical_hashes_are_chained_and_grouped():
    values = [0b1111] * 5 + [0b1111 ^ 0b110000, 2**63]
    hashes = dict(zip(ids(7), values, strict=True))
    found = group_near_duplicates(hashes, radius=2, diameter=2)
    assert found.n_identical == 5 and found.n_pairs == 1
    assert len(found.links) == 4 + 1 and found.largest_group == 6 and found.grouped_samples == 6
    with pytest.raises(ValueError, match="radius <= diameter"):
        group_near_duplicates(hashes, radius=4, diameter=2)


# ----------------------------------------------------------------------------------------------- the task


def scene_files(folder: Path, scenes: list[Image.Image], which: range, copies: range) -> list[tuple[str, int, int]]:
    """(relative path, scene, copy) for the originals (copy 0) and jittered copies of `which` scenes."""
    rows = []
    for k in which:
        for j in copies:
            data = jpeg(scenes[k]) if j == 0 else near_duplicate(scenes[k], seed=1000 * j + k)
            path = folder / f"scene{k:02d}_{j}.jpg"
            path.write_bytes(data)
            rows.append((path.name, k, j))
    return rows


def write_csv(folder: Path, rows: list[tuple[str, int, int]]) -> Path:
    label_file = folder / "labels.csv"
    label_file.write_text("image_path,label\n" + "".join(f"{name},{k % 2}\n" for name, k, _ in rows))
    return label_file


def splits_by_name(manifest_path: str) -> dict[str, str]:
    data = json.loads(Path(manifest_path).read_text())
    return {Path(r["locator"]).name: r["split"] for r in data["samples"]}


def test_build_splits_keeps_a_scene_in_one_split_as_data_grows(tmp_path, scenes, monkeypatch):
    from tasks.pipeline import build_splits

    monkeypatch.setenv("STAGE1_HOME", str(tmp_path / "home"))
    decoded = counting(monkeypatch)
    data = tmp_path / "data"
    data.mkdir()
    rows = scene_files(data, scenes, range(24), range(3))
    sources = [SourceConfig(str(write_csv(data, rows)), name="natix")]
    first = build_splits.fn(sources, SplitConfig())
    assert (first.n_groups, first.largest_group, first.bridges) == (24, 3, 0)
    manifest = json.loads(Path(first.path).read_text())
    assert len(decoded) == 72 and manifest["groups"]["near_duplicates"]["hashed"] == 72
    assert manifest["groups"]["pairs_across_splits"] == 0 and manifest["parent"] is None
    split_of = splits_by_name(first.path)
    for k in range(24):
        assert len({split_of[f"scene{k:02d}_{j}.jpg"] for j in range(3)}) == 1, k

    # without near-duplicate grouping, copies of one scene scatter over the splits
    scattered = build_splits.fn(sources, SplitConfig(near_duplicates=False))
    loose = splits_by_name(scattered.path)
    assert any(len({loose[f"scene{k:02d}_{j}.jpg"] for j in range(3)}) > 1 for k in range(24))

    # more copies of old scenes and new scenes: old images stay, new copies join their scene's split
    rows += scene_files(data, scenes, range(24), range(3, 5)) + scene_files(data, scenes, range(24, 30), range(2))
    sources = [SourceConfig(str(write_csv(data, rows)), name="natix")]
    decoded.clear()
    second = build_splits.fn(sources, SplitConfig())
    manifest = json.loads(Path(second.path).read_text())
    assert manifest["parent"] == {"path": first.path, "fingerprint": first.fingerprint}
    assert manifest["groups"]["pinned"] == 72 and len(decoded) == 48 + 12  # only the new images are hashed
    assert (second.n_groups, second.largest_group, second.bridges) == (30, 5, 0)
    grown = splits_by_name(second.path)
    assert all(grown[name] == split for name, split in split_of.items())
    for k in range(30):
        assert len({grown[name] for name, scene, _ in rows if scene == k}) == 1, k

    # the same data again: byte for byte the same manifest (bundles record its sha256), still naming the
    # first as its parent, and nothing decoded
    written = Path(second.path).read_bytes()
    decoded.clear()
    again = build_splits.fn(sources, SplitConfig())
    # (each run writes its own quarantine report, named by run: docs/reliability.md)
    assert dataclasses.replace(again, quarantine_report=second.quarantine_report) == second
    assert Path(again.path).read_bytes() == written and not decoded
