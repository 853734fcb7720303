"""The procedural demo dataset: layout on disk, determinism, odd files (large, PNG, EXIF), learnability."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from stage1core.demo import (
    CLASS_DIRS,
    DEFAULT_N_IMAGES,
    LARGE_SIZE,
    DemoConfig,
    demo_dataset_ready,
    generate_demo_dataset,
    render_demo_image,
    render_scene,
)
from stage1core.demo.dataset import _plan, _render_spec

SMALL = DemoConfig(n_images=40, seed=3, n_large=1, png_fraction=0.1, exif_fraction=0.1)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "data"
    manifest = generate_demo_dataset(out, SMALL)
    return out, manifest


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _labels(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_defaults() -> None:
    assert DEFAULT_N_IMAGES == DemoConfig().n_images == 1200
    assert CLASS_DIRS == {"no_roadwork": 0, "roadwork": 1}


def test_same_config_gives_identical_bytes(generated: tuple[Path, dict], tmp_path: Path) -> None:
    first, _ = generated
    again = generate_demo_dataset(tmp_path / "again", SMALL)
    a, b = _files(first), _files(tmp_path / "again")
    assert sorted(a) == sorted(b)
    assert len(a) == SMALL.n_images + 2  # images, labels.csv, demo.json
    assert [name for name in a if a[name] != b[name]] == []
    assert again == json.loads(a["demo.json"])


def test_labels_csv_format(generated: tuple[Path, dict]) -> None:
    root, _ = generated
    text = (root / "labels.csv").read_text()
    assert text.splitlines()[0] == "image_path,label"
    assert text.endswith("\n")
    rows = _labels(root)
    assert len(rows) == SMALL.n_images
    paths = [row["image_path"] for row in rows]
    assert len(set(paths)) == len(paths)
    for i, row in enumerate(rows):
        folder, name = row["image_path"].split("/")
        assert row["label"] in ("0", "1")
        assert CLASS_DIRS[folder] == int(row["label"]), row
        assert name == f"img_{i:05d}.{name.rsplit('.', 1)[1]}"  # names carry the index
        assert name.endswith((".jpg", ".png"))


def test_class_counts_match_labels_folders_and_manifest(generated: tuple[Path, dict]) -> None:
    root, manifest = generated
    rows = _labels(root)
    for class_dir, label in CLASS_DIRS.items():
        on_disk = sorted(p.name for p in (root / class_dir).iterdir())
        listed = sorted(r["image_path"].split("/")[1] for r in rows if int(r["label"]) == label)
        assert on_disk == listed
        assert manifest["counts"][class_dir] == len(listed)
    assert manifest["counts"]["roadwork"] == round(SMALL.n_images * SMALL.positive_fraction) == 20
    assert manifest["n_images"] == SMALL.n_images
    assert manifest["config"] == {
        "n_images": 40,
        "seed": 3,
        "positive_fraction": 0.5,
        "n_large": 1,
        "png_fraction": 0.1,
        "exif_fraction": 0.1,
        "min_size": 256,
        "max_size": 800,
    }
    assert manifest["labels_sha256"] == hashlib.sha256((root / "labels.csv").read_bytes()).hexdigest()
    assert json.loads((root / "demo.json").read_text()) == manifest


def test_demo_json_is_written_last(generated: tuple[Path, dict]) -> None:
    root, _ = generated
    others = [p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p.name != "demo.json"]
    assert (root / "demo.json").stat().st_mtime_ns >= max(others)


def test_sizes_formats_and_large_jpegs(generated: tuple[Path, dict]) -> None:
    root, manifest = generated
    large, png = [], []
    for row in _labels(root):
        with Image.open(root / row["image_path"]) as im:
            upright = ImageOps.exif_transpose(im)
            size = upright.size
            assert im.format == ("PNG" if row["image_path"].endswith(".png") else "JPEG")
            assert upright.mode == "RGB"
            if size == LARGE_SIZE:
                assert im.format == "JPEG"
                large.append(row["image_path"])
            else:
                assert all(SMALL.min_size <= side <= SMALL.max_size for side in size), (row, size)
            if im.format == "PNG":
                png.append(row["image_path"])
    assert len(large) == manifest["n_large"] == 1
    assert len(png) == manifest["n_png"] == 4


def test_exif_rotated_files_turn_upright(generated: tuple[Path, dict]) -> None:
    root, manifest = generated
    specs = {spec.relpath: spec for spec in _plan(SMALL)}
    rotated = []
    for relpath, spec in specs.items():
        with Image.open(root / relpath) as im:
            orientation = im.getexif().get(0x0112)
            if orientation is None:
                assert spec.orientation == 1
                continue
            assert orientation in (6, 8) and orientation == spec.orientation
            upright = ImageOps.exif_transpose(im)
            assert upright.size == (im.height, im.width)
            # turned back, the pixels are the scene as drawn (up to JPEG loss)
            drawn = np.asarray(_render_spec(SMALL, spec), dtype=np.float32)
            assert np.abs(np.asarray(upright, dtype=np.float32) - drawn).mean() < 6.0
            rotated.append(relpath)
    assert len(rotated) == manifest["n_exif"] == 4


def test_ready_marker(generated: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = generated
    assert demo_dataset_ready(root, SMALL)
    assert not demo_dataset_ready(
        root, DemoConfig(n_images=40, seed=4, n_large=1, png_fraction=0.1, exif_fraction=0.1)
    )
    assert not demo_dataset_ready(root)  # the default config differs
    assert not demo_dataset_ready(tmp_path / "missing", SMALL)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    assert demo_dataset_ready(copy, SMALL)
    with open(copy / "labels.csv", "a") as handle:
        handle.write("roadwork/extra.jpg,1\n")
    assert not demo_dataset_ready(copy, SMALL)


def test_regenerating_with_another_config_replaces_the_dataset(
    generated: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = generated
    target = tmp_path / "data"
    shutil.copytree(root, target)
    other = DemoConfig(n_images=6, seed=9, n_large=0, png_fraction=0.0, exif_fraction=0.0, max_size=300)
    manifest = generate_demo_dataset(target, other, progress=True)
    assert demo_dataset_ready(target, other) and not demo_dataset_ready(target, SMALL)
    images = sorted(p.relative_to(target).as_posix() for d in CLASS_DIRS for p in (target / d).iterdir())
    assert images == sorted(row["image_path"] for row in _labels(target))  # stale images are gone
    assert sum(manifest["counts"].values()) == 6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_images": 0}, "n_images"),
        ({"n_images": 2.5}, "n_images must be an integer"),
        ({"seed": -1}, "seed"),
        ({"positive_fraction": 1.5}, "positive_fraction"),
        ({"png_fraction": -0.1}, "png_fraction"),
        ({"exif_fraction": "0.1"}, "exif_fraction"),
        ({"n_large": -1}, "n_large"),
        ({"min_size": 900}, "min_size"),
        ({"min_size": 10, "max_size": 20}, "min_size"),
        ({"n_images": 10, "n_large": 4, "png_fraction": 0.7}, "more than n_images"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DemoConfig(**kwargs)


def test_render_scene_is_deterministic_and_sized() -> None:
    a = render_scene(np.random.default_rng(5), width=300, height=200, roadwork=True)
    b = render_scene(np.random.default_rng(5), width=300, height=200, roadwork=True)
    assert a.mode == "RGB" and a.size == (300, 200)
    assert a.tobytes() == b.tobytes()
    assert (
        render_scene(np.random.default_rng(6), width=300, height=200, roadwork=True).tobytes() != a.tobytes()
    )
    with pytest.raises(ValueError, match="at least 16"):
        render_scene(np.random.default_rng(0), width=8, height=200, roadwork=False)


def _hivis_fraction(image: Image.Image) -> float:
    """Share of strongly orange or fluorescent-yellow pixels (cones, vests, barriers; also autumn trees)."""
    a = np.asarray(image, dtype=np.int16)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    orange = (r > 170) & (g > 40) & (g < 175) & (b < 90) & (r - g > 60)
    yellow = (r > 170) & (g > 170) & (b < 90)
    return float((orange | yellow).mean())


def test_roadwork_is_learnable_but_not_by_colour_alone() -> None:
    pos = np.array(
        [
            _hivis_fraction(render_scene(np.random.default_rng([0, i]), width=320, height=240, roadwork=True))
            for i in range(30)
        ]
    )
    neg = np.array(
        [
            _hivis_fraction(
                render_scene(np.random.default_rng([0, i]), width=320, height=240, roadwork=False)
            )
            for i in range(30)
        ]
    )
    # roadwork adds orange and hi-vis objects ...
    assert pos.mean() > 1.2 * neg.mean()
    assert np.median(pos) > 2.0 * np.median(neg)
    # ... but hard negatives (orange cars, autumn trees, orange clothes) carry them too
    assert (neg > 0.005).sum() >= 5
    assert (neg > np.median(pos)).sum() >= 3


# Pixel hashes (sha256 of the RGB bytes, first 16 hex digits) of images the generator drew before it
# became a package; the drawing code moved without changing a pixel. A change here means datasets made
# by older code no longer match what this code draws: bump GENERATOR_VERSION (demo_dataset_ready then
# regenerates them) and pin the new hashes. Pillow's drawing and numpy's seeded generators are exact,
# so the hashes hold on any machine with the pinned versions.
PINNED_IMAGES = {0: "09553b78c63f2f40", 1: "6463240f3db4d316", 5: "cca82fd452aa0414", 36: "8fd4ffabcd0fe9dd"}
PINNED_SCENES = {(0, False): "cb2269291749e055", (0, True): "700f58157e63f37d", (1, False): "f6dfe9ba1a0320e8",
                 (1, True): "d2f4aa061e3ed6f7", (2, False): "160a957f68c913e3", (3, True): "30b3e33549f85f42"}


def _pixel_hash(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()[:16]


def test_generator_draws_the_pinned_pixels() -> None:
    plan = _plan(SMALL)
    # the pins cover a PNG positive, a JPEG negative, an EXIF-rotated JPEG and the large JPEG
    assert (plan[0].fmt, plan[0].label, plan[1].label, plan[5].orientation, plan[36].large) == ("png", 1, 0, 8, True)
    assert {i: _pixel_hash(render_demo_image(SMALL, i)) for i in PINNED_IMAGES} == PINNED_IMAGES
    drawn = {(i, roadwork): _pixel_hash(render_scene(np.random.default_rng([7, i]), width=320, height=240,
                                                     roadwork=roadwork)) for i, roadwork in PINNED_SCENES}
    assert drawn == PINNED_SCENES
