"""The demo dataset on disk: which image is what (the plan), drawing each one from its own seed,
encoding (JPEG, PNG, EXIF-rotated JPEG, large JPEGs), labels.csv and the demo.json marker."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from stage1core.storage import atomic_write_bytes, atomic_write_json

from .palette import clip8
from .roadwork import render_scene

log = logging.getLogger(__name__)

DEFAULT_N_IMAGES = 1200
CLASS_DIRS = {"no_roadwork": 0, "roadwork": 1}
LARGE_SIZE = (4032, 3024)  # NATIX originals are 12 MP phone/dash-cam frames
# Bump when the drawing code changes, so a dataset made by older code no longer counts as ready.
GENERATOR_VERSION = 1
_JPEG_QUALITY = 90
_PNG_COMPRESS_LEVEL = 3  # fast; the noise makes PNGs big whatever the level
_LARGE_RENDER = (1008, 756)  # large images are drawn at a quarter of the size, then upscaled
_IMAGE_NAME = re.compile(r"img_\d+\.(jpg|png)")
_EXIF_ORIENTATION = 0x0112
# Stored pixels are the upright scene turned so that an EXIF-aware viewer turns it back.
_STORE_TRANSPOSE = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


@dataclass(frozen=True)
class DemoConfig:
    n_images: int = DEFAULT_N_IMAGES  # total images, both classes
    seed: int = 0  # same seed and fields give byte-identical files
    positive_fraction: float = 0.5  # share of roadwork images (rounded to a whole count)
    n_large: int = 4  # 4032x3024 JPEGs, like NATIX originals (slow to decode: keep few)
    png_fraction: float = 0.08  # share saved as PNG instead of JPEG
    exif_fraction: float = 0.05  # share of JPEGs stored turned, with an EXIF Orientation tag (6 or 8)
    min_size: int = 256  # other images: width and height in [min_size, max_size], mixed aspect ratios
    max_size: int = 800

    def __post_init__(self) -> None:
        for name in ("n_images", "seed", "n_large", "min_size", "max_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"DemoConfig.{name} must be an integer, got {value!r}")
        for name in ("positive_fraction", "png_fraction", "exif_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"DemoConfig.{name} must be a number in [0, 1], got {value!r}")
        if self.n_images < 1:
            raise ValueError(f"DemoConfig.n_images must be at least 1, got {self.n_images}")
        if self.seed < 0:
            raise ValueError(f"DemoConfig.seed must be >= 0 (numpy seeds are unsigned), got {self.seed}")
        if self.n_large < 0:
            raise ValueError(f"DemoConfig.n_large must be >= 0, got {self.n_large}")
        if not 64 <= self.min_size <= self.max_size <= 4096:
            raise ValueError(
                f"DemoConfig needs 64 <= min_size <= max_size <= 4096, got min_size={self.min_size}, "
                f"max_size={self.max_size}"
            )
        special = self.n_large + self.n_png + self.n_exif
        if special > self.n_images:
            raise ValueError(
                f"DemoConfig asks for {self.n_large} large + {self.n_png} PNG + {self.n_exif} EXIF-rotated "
                f"images, more than n_images={self.n_images}; lower n_large, png_fraction or exif_fraction"
            )

    @property
    def n_positive(self) -> int:
        return round(self.n_images * self.positive_fraction)

    @property
    def n_png(self) -> int:
        return round(self.n_images * self.png_fraction)

    @property
    def n_exif(self) -> int:
        return round(self.n_images * self.exif_fraction)


@dataclass(frozen=True)
class _ImageSpec:
    """What the plan fixes for one image before its pixels are drawn."""

    index: int
    label: int
    fmt: str  # "jpg" or "png"
    large: bool
    orientation: int  # EXIF orientation: 1 (none), 6 or 8

    @property
    def relpath(self) -> str:
        class_dir = "roadwork" if self.label == 1 else "no_roadwork"
        return f"{class_dir}/img_{self.index:05d}.{self.fmt}"


def _plan(config: DemoConfig) -> list[_ImageSpec]:
    rng = np.random.default_rng([config.seed, 0])  # images use [seed, 1, i]: streams never collide
    n = config.n_images
    positive = np.zeros(n, dtype=bool)
    positive[rng.permutation(n)[: config.n_positive]] = True
    order = rng.permutation(n)
    large = set(order[: config.n_large].tolist())
    png = set(order[config.n_large : config.n_large + config.n_png].tolist())
    exif = set(order[config.n_large + config.n_png : config.n_large + config.n_png + config.n_exif].tolist())
    orientations = rng.choice([6, 8], size=n)
    return [
        _ImageSpec(
            index=i,
            label=int(positive[i]),
            fmt="png" if i in png else "jpg",
            large=i in large,
            orientation=int(orientations[i]) if i in exif else 1,
        )
        for i in range(n)
    ]


def _image_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1, index])


def _image_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """Width and height in range, landscape-heavy like dash-cam and phone frames."""
    aspect = float(rng.choice([16 / 9, 3 / 2, 4 / 3, 4 / 3, 1.0, 3 / 4, 2 / 3]))
    width = int(rng.integers(min_size, max_size + 1))
    height = int(np.clip(round(width / aspect), min_size, max_size))
    return width, height


def _render_spec(config: DemoConfig, spec: _ImageSpec) -> Image.Image:
    """The upright image for one plan entry (before any EXIF turn)."""
    rng = _image_rng(config.seed, spec.index)
    if spec.large:
        scene = render_scene(rng, width=_LARGE_RENDER[0], height=_LARGE_RENDER[1], roadwork=bool(spec.label))
        return scene.resize(LARGE_SIZE, Image.Resampling.BICUBIC)
    width, height = _image_size(rng, config.min_size, config.max_size)
    return render_scene(rng, width=width, height=height, roadwork=bool(spec.label))


def render_demo_image(config: DemoConfig, index: int) -> Image.Image:
    """Image `index` of the dataset `config` describes, upright, as generate_demo_dataset draws it."""
    if not 0 <= index < config.n_images:
        raise ValueError(f"index {index} is outside the dataset of {config.n_images} images")
    return _render_spec(config, _plan(config)[index])


def near_duplicate(image: Image.Image, *, seed: int, max_shift: float = 0.03, brightness: float = 0.12,
                   quality: tuple[int, int] = (60, 90)) -> bytes:
    """A near-identical frame of the same scene, as JPEG bytes: the view shifted by up to `max_shift` of
    each side (the frame is cropped and scaled back), brightness scaled by up to 1 +/- `brightness`,
    then re-encoded at a JPEG quality in `quality`. Deterministic by seed; the bytes differ from the
    original's, so it is a distinct sample that only a near-duplicate search can tie to it."""
    rng = np.random.default_rng([seed, 2])
    width, height = image.size
    dx, dy = (float(v) for v in rng.uniform(-max_shift, max_shift, size=2))
    left, top = max(0.0, dx) * width, max(0.0, dy) * height
    box = (left, top, left + (1 - abs(dx)) * width, top + (1 - abs(dy)) * height)
    moved = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR, box=box)
    gain = 1.0 + float(rng.uniform(-brightness, brightness))
    lut = [clip8(round(v * gain)) for v in range(256)] * 3
    buf = io.BytesIO()
    moved.point(lut).save(buf, "JPEG", quality=int(rng.integers(quality[0], quality[1] + 1)))
    return buf.getvalue()


def _encode(image: Image.Image, spec: _ImageSpec) -> bytes:
    buf = io.BytesIO()
    if spec.fmt == "png":
        image.save(buf, "PNG", compress_level=_PNG_COMPRESS_LEVEL)
    elif spec.orientation != 1:
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION] = spec.orientation
        image.transpose(_STORE_TRANSPOSE[spec.orientation]).save(
            buf, "JPEG", quality=_JPEG_QUALITY, exif=exif
        )
    else:
        image.save(buf, "JPEG", quality=_JPEG_QUALITY)
    return buf.getvalue()


def _remove_stale_images(out_dir: Path, keep: set[str]) -> None:
    """Drop images a previous, different generation left behind (only files named like ours)."""
    for class_dir in CLASS_DIRS:
        folder = out_dir / class_dir
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if _IMAGE_NAME.fullmatch(path.name) and f"{class_dir}/{path.name}" not in keep:
                path.unlink()


def generate_demo_dataset(
    out_dir: str | Path, config: DemoConfig = DemoConfig(), *, progress: bool = False
) -> dict:
    """Write the demo dataset under out_dir and return its manifest (also written as demo.json).

    Layout: roadwork/img_NNNNN.{jpg,png}, no_roadwork/img_NNNNN.{jpg,png}, labels.csv (`image_path,label`,
    paths relative to out_dir), then demo.json, written last: its presence marks a complete dataset.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo.json").unlink(missing_ok=True)  # not complete until rewritten at the end
    specs = _plan(config)
    _remove_stale_images(out_dir, {spec.relpath for spec in specs})
    iterator: Any = specs
    if progress:
        iterator = tqdm(specs, desc="demo images", unit="img")
    for spec in iterator:
        atomic_write_bytes(out_dir / spec.relpath, _encode(_render_spec(config, spec), spec))
    labels = "image_path,label\n" + "".join(f"{spec.relpath},{spec.label}\n" for spec in specs)
    labels_bytes = labels.encode("utf-8")
    atomic_write_bytes(out_dir / "labels.csv", labels_bytes)
    manifest = {
        "generator": f"stage1core.demo/{GENERATOR_VERSION}",
        "config": asdict(config),
        "n_images": len(specs),
        "counts": {name: sum(spec.label == label for spec in specs) for name, label in CLASS_DIRS.items()},
        "n_large": sum(spec.large for spec in specs),
        "n_png": sum(spec.fmt == "png" for spec in specs),
        "n_exif": sum(spec.orientation != 1 for spec in specs),
        "large_size": list(LARGE_SIZE),
        "labels_csv": "labels.csv",
        "labels_sha256": hashlib.sha256(labels_bytes).hexdigest(),
    }
    atomic_write_json(out_dir / "demo.json", manifest)
    log.info("demo dataset: %d images in %s", len(specs), out_dir)
    return manifest


def demo_dataset_ready(out_dir: str | Path, config: DemoConfig = DemoConfig()) -> bool:
    """True when out_dir holds a complete dataset made by this generator version with this config."""
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / "demo.json").read_text(encoding="utf-8"))
        labels = (out_dir / "labels.csv").read_bytes()
    except (OSError, ValueError):
        return False
    return (
        isinstance(manifest, dict)
        and manifest.get("generator") == f"stage1core.demo/{GENERATOR_VERSION}"
        and manifest.get("config") == asdict(config)
        and manifest.get("labels_sha256") == hashlib.sha256(labels).hexdigest()
    )
