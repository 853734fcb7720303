"""Procedural street scenes: the demo's embedded dataset, and a fixture for tests.

No data can be downloaded where the demo runs, so this module draws its own: a dash-cam view of a street
(road in perspective, lane marks, kerbs, sky, buildings, trees, cars, pedestrians, road signs) with
lighting, blur and sensor noise. Positives add roadwork evidence (cones, striped barriers, roadwork
signs, workers in high-visibility vests, fences, diggers); the shared background carries hard negatives
(orange cars, autumn trees, plain and warning signs, people in orange clothes, dusk skies) so a classifier
needs object-level features, not a colour histogram. Everything is deterministic by seed: image i uses
its own generator seeded from (seed, i), so files do not depend on generation order.

Hand-written because no maintained library renders labelled street scenes offline.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from stage1core.storage import atomic_write_bytes, atomic_write_json

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

RGB = tuple[int, int, int]


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


# ----------------------------------------------------------------------------------------------------
# Drawing. World coordinates in metres: x to the right, y up from the road, z forward from the camera.


@dataclass(frozen=True)
class _Camera:
    width: int
    height: int
    horizon: float  # pixel row of the horizon
    centre_x: float  # pixel column of the vanishing point
    focal: float  # pixels
    height_m: float  # camera height above the road

    def pt(self, x: float, y: float, z: float) -> tuple[float, float]:
        s = self.focal / z
        return (self.centre_x + x * s, self.horizon + (self.height_m - y) * s)

    def scale(self, z: float) -> float:
        """Pixels per metre at depth z."""
        return self.focal / z

    @property
    def z_bottom(self) -> float:
        """Depth of the road at the bottom image row."""
        return self.focal * self.height_m / max(self.height - self.horizon, 1.0)

    def in_view(self, x: float, z: float, margin: float = 0.04) -> bool:
        px, py = self.pt(x, 0.0, z)
        return margin * self.width <= px <= (1 - margin) * self.width and py <= self.height * 1.02

    def x_at(self, px: float, z: float) -> float:
        """World x that projects to pixel column px at depth z."""
        return (px - self.centre_x) * z / self.focal


def _clip8(value: float) -> int:
    return int(min(max(value, 0), 255))


def _jitter(rng: np.random.Generator, colour: RGB, amount: int = 12) -> RGB:
    offsets = rng.integers(-amount, amount + 1, size=3).tolist()
    return tuple(_clip8(c + o) for c, o in zip(colour, offsets, strict=True))  # type: ignore[return-value]


def _grey(rng: np.random.Generator, level: int, amount: int, tint: RGB = (0, 0, 0)) -> RGB:
    """A grey with random brightness and a fixed slight tint (asphalt, paving)."""
    v = level + int(rng.integers(-amount, amount + 1))
    offsets = rng.integers(-3, 4, size=3).tolist()
    return tuple(_clip8(v + t + o) for t, o in zip(tint, offsets, strict=True))  # type: ignore[return-value]


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _shade(colour: RGB, factor: float) -> RGB:
    return tuple(_clip8(c * factor) for c in colour)  # type: ignore[return-value]


def _quad(cam: _Camera, x0: float, x1: float, y0: float, y1: float, z0: float, z1: float) -> list:
    """Projected corners of an axis-aligned rectangle: in a plane x=const (x0==x1), z=const or y=const."""
    if x0 == x1:
        return [cam.pt(x0, y0, z0), cam.pt(x0, y0, z1), cam.pt(x0, y1, z1), cam.pt(x0, y1, z0)]
    if z0 == z1:
        return [cam.pt(x0, y0, z0), cam.pt(x1, y0, z0), cam.pt(x1, y1, z0), cam.pt(x0, y1, z0)]
    return [cam.pt(x0, y0, z0), cam.pt(x1, y0, z0), cam.pt(x1, y0, z1), cam.pt(x0, y0, z1)]


def _stripes(size: tuple[int, int], period: float, colours: tuple[RGB, RGB], slope: float) -> Image.Image:
    """A board of diagonal stripes (barriers, barricades)."""
    w, h = max(size[0], 1), max(size[1], 1)
    yy, xx = np.mgrid[0:h, 0:w]
    band = (((xx + yy * slope) / max(period, 1.0)) // 1).astype(np.int64) % 2
    palette = np.array(colours, dtype=np.uint8)
    return Image.fromarray(palette[band], "RGB")


SKIES: dict[str, tuple[RGB, RGB]] = {
    "day": ((62, 118, 196), (178, 206, 232)),
    "clear": ((40, 100, 190), (150, 190, 230)),
    "overcast": ((148, 152, 160), (205, 206, 210)),
    "dusk": ((58, 58, 110), (236, 146, 92)),
}
FACADES: list[RGB] = [
    (196, 186, 168),
    (170, 160, 150),
    (214, 206, 190),
    (150, 110, 90),
    (178, 96, 66),
    (200, 140, 90),
    (120, 120, 128),
    (230, 220, 200),
    (160, 170, 150),
    (210, 180, 130),
    (140, 80, 60),
    (188, 190, 196),
]
CAR_COLOURS: list[RGB] = [
    (235, 235, 235),
    (25, 25, 28),
    (165, 168, 172),
    (95, 98, 104),
    (30, 60, 140),
    (160, 20, 25),
    (30, 70, 45),
    (200, 185, 150),
    (60, 120, 190),
    (110, 20, 30),
]
HARD_CAR_COLOURS: list[RGB] = [(235, 110, 20), (245, 190, 0), (225, 80, 20), (250, 205, 30)]
CLOTHES: list[RGB] = [
    (30, 30, 35),
    (40, 50, 90),
    (200, 200, 200),
    (150, 30, 35),
    (80, 80, 85),
    (50, 90, 60),
    (120, 90, 60),
    (170, 150, 120),
    (70, 110, 170),
    (235, 235, 230),
]
HARD_CLOTHES: list[RGB] = [(235, 120, 30), (240, 200, 40), (220, 70, 40)]
SKIN: list[RGB] = [(236, 200, 170), (200, 150, 110), (150, 100, 70), (95, 65, 45), (225, 180, 140)]
GREEN_TREES: list[RGB] = [(52, 100, 45), (70, 120, 50), (40, 85, 40), (90, 130, 60)]
AUTUMN_TREES: list[RGB] = [(214, 110, 30), (226, 150, 30), (190, 70, 30), (205, 170, 40), (160, 90, 30)]
HIVIS: list[RGB] = [(255, 110, 0), (250, 130, 10), (215, 250, 20), (240, 230, 10)]
CONE_ORANGE: list[RGB] = [(250, 95, 10), (240, 80, 20), (255, 120, 20), (230, 60, 25)]
WHITE: RGB = (238, 238, 235)
RED: RGB = (205, 25, 30)


class _Painter:
    """Draws one scene: holds the canvas, camera and scene-wide choices (lighting mood)."""

    def __init__(self, rng: np.random.Generator, width: int, height: int) -> None:
        self.rng = rng
        self.image = Image.new("RGB", (width, height))
        self.draw = ImageDraw.Draw(self.image, "RGBA")
        long_side = max(width, height)
        self.cam = _Camera(
            width=width,
            height=height,
            horizon=height * float(rng.uniform(0.34, 0.56)),
            centre_x=width * float(rng.uniform(0.36, 0.64)),
            focal=long_side * float(rng.uniform(0.55, 0.9)),
            height_m=float(rng.uniform(1.3, 1.9)),
        )
        self.sky = str(rng.choice(["day", "clear", "overcast", "dusk"], p=[0.35, 0.2, 0.3, 0.15]))
        self.autumn = bool(rng.random() < 0.3)
        self.lanes_left = int(rng.integers(0, 3))
        self.lanes_right = int(rng.integers(0, 2))
        self.lane_w = float(rng.uniform(2.9, 3.6))
        self.road_left = -(self.lanes_left + 0.5) * self.lane_w + float(rng.uniform(-0.4, 0.4))
        self.road_right = (self.lanes_right + 0.5) * self.lane_w + float(rng.uniform(-0.4, 0.4))
        self.walk_w = float(rng.uniform(1.8, 4.0))
        self.objects: list[tuple[float, Callable[[], None]]] = []
        # A spot kept clear of nearer occluders in both classes: roadwork scenes put their main evidence
        # there, other scenes sometimes a look-alike. Same background distribution for both labels.
        self.focus = self._visible_spot(on_road=bool(rng.random() < 0.65), near_share=0.9, margin=0.12)

    # -- background -----------------------------------------------------------------------------------

    def sky_and_ground(self) -> None:
        top, bottom = (_jitter(self.rng, c, 10) for c in SKIES[self.sky])
        h = max(int(self.cam.horizon) + 2, 2)
        ramp = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None] ** 0.8
        column = (np.array(top) * (1 - ramp) + np.array(bottom) * ramp).astype(np.uint8)
        self.image.paste(Image.fromarray(column[:, None, :], "RGB").resize((self.cam.width, h)), (0, 0))
        d = self.draw
        if self.sky in ("day", "dusk", "clear"):
            for _ in range(int(self.rng.integers(0, 5))):
                cx = self.rng.uniform(0, self.cam.width)
                cy = self.rng.uniform(0, self.cam.horizon * 0.6)
                rx = self.rng.uniform(0.05, 0.2) * self.cam.width
                ry = rx * self.rng.uniform(0.15, 0.35)
                alpha = int(self.rng.integers(60, 150))
                for k in range(3):
                    ox = self.rng.uniform(-0.5, 0.5) * rx
                    d.ellipse(
                        [cx + ox - rx, cy - ry * (1 + 0.3 * k), cx + ox + rx, cy + ry], (250, 250, 250, alpha)
                    )
        ground = _jitter(self.rng, (120, 118, 112), 15)
        d.rectangle([0, self.cam.horizon, self.cam.width, self.cam.height], fill=ground)

    def skyline(self) -> None:
        """Far buildings and tree lines at the end of the street."""
        cam, rng, d = self.cam, self.rng, self.draw
        z = 140.0
        x = -90.0
        while x < 90.0:
            w = float(rng.uniform(6, 20))
            if rng.random() < 0.3:
                top = float(rng.uniform(4, 10))
                d.ellipse(
                    _flat(cam.pt(x, top, z)) + _flat(cam.pt(x + w, -0.5, z)),
                    fill=_jitter(rng, (70, 95, 65) if not self.autumn else (150, 110, 60), 15),
                )
            else:
                top = float(rng.uniform(8, 45))
                colour = _mix(
                    _jitter(rng, FACADES[int(rng.integers(len(FACADES)))], 10), SKIES[self.sky][1], 0.45
                )
                d.polygon(_quad(cam, x, x + w, 0, top, z, z), fill=colour)
            x += w

    def facades(self) -> None:
        cam, rng = self.cam, self.rng
        for side in (-1, 1):
            edge = self.road_left - self.walk_w if side < 0 else self.road_right + self.walk_w
            kind = rng.choice(["city", "open", "city"])
            if kind == "open":
                self._open_side(edge, side)
                continue
            x_face = edge + side * float(rng.uniform(0.0, 2.5))
            z = cam.z_bottom * 0.5
            while z < 130:
                length = float(rng.uniform(7, 24))
                self._building(x_face, z, z + length, side)
                z += length + (float(rng.uniform(2, 8)) if rng.random() < 0.15 else 0.0)

    def _open_side(self, edge: float, side: int) -> None:
        cam, rng, d = self.cam, self.rng, self.draw
        far_x = edge + side * 60.0
        grass = _jitter(rng, (95, 125, 70) if not self.autumn else (140, 125, 70), 15)
        d.polygon(
            [
                cam.pt(edge, 0, cam.z_bottom * 0.5),
                cam.pt(edge, 0, 300),
                cam.pt(far_x, 0, 300),
                cam.pt(far_x, 0, cam.z_bottom * 0.5),
            ],
            fill=grass,
        )
        hedge = _jitter(rng, (55, 90, 50), 12)
        x = edge + side * float(rng.uniform(3, 12))
        d.polygon(_quad(cam, x, x, 0, float(rng.uniform(1.5, 4.0)), cam.z_bottom * 0.5, 200), fill=hedge)

    def _building(self, x: float, z0: float, z1: float, side: int) -> None:
        cam, rng, d = self.cam, self.rng, self.draw
        h = float(rng.uniform(6, 26))
        colour = _jitter(rng, FACADES[int(rng.integers(len(FACADES)))], 12)
        d.polygon(_quad(cam, x, x, 0, h, z0, z1), fill=colour)
        d.polygon(_quad(cam, x, x, h - 0.4, h, z0, z1), fill=_shade(colour, 0.8))
        lit = self.sky == "dusk"
        glass = _jitter(rng, (60, 72, 85), 15)
        frame_w = float(rng.uniform(1.0, 1.6))
        step = frame_w + float(rng.uniform(0.8, 1.8))
        floor_h = float(rng.uniform(2.8, 3.4))
        floors = int((h - 1.0) // floor_h)
        zs = np.arange(z0 + 0.8, z1 - frame_w - 0.3, step)
        if len(zs) == 0 or cam.scale(z0) * frame_w < 1.5:
            return
        # shop front on the ground floor
        if rng.random() < 0.5:
            d.polygon(_quad(cam, x, x, 0.3, 2.6, z0 + 0.5, z1 - 0.5), fill=_jitter(rng, (50, 60, 70), 15))
            floors_from = 1
        else:
            floors_from = 0
        for f in range(floors_from, floors):
            y0 = f * floor_h + 0.9
            for wz in zs:
                if cam.scale(wz) * frame_w < 1.2:
                    break
                fill = _jitter(rng, (250, 210, 120), 15) if lit and rng.random() < 0.35 else glass
                d.polygon(_quad(cam, x, x, y0, y0 + 1.5, wz, wz + frame_w), fill=fill)

    def road(self) -> None:
        cam, rng, d = self.cam, self.rng, self.draw
        near, far = cam.z_bottom * 0.5, 400.0
        asphalt = _grey(rng, 92 if rng.random() < 0.7 else 62, 14, (0, 0, 3))
        walk = _grey(rng, 165, 18, (3, 1, -4))
        kerb = _shade(walk, 1.08)
        for a, b in (
            (self.road_left - self.walk_w, self.road_left),
            (self.road_right, self.road_right + self.walk_w),
        ):
            d.polygon(_quad(cam, a, b, 0.15, 0.15, near, far), fill=walk)
            # paving joints
            for zz in np.arange(math.ceil(near), 60.0, float(rng.uniform(1.5, 3.0))):
                if cam.scale(zz) * (b - a) < 6:
                    break
                d.line([cam.pt(a, 0.15, zz), cam.pt(b, 0.15, zz)], fill=_shade(walk, 0.85), width=1)
        d.polygon(_quad(cam, self.road_left, self.road_right, 0, 0, near, far), fill=asphalt)
        d.polygon(_quad(cam, self.road_left, self.road_left, 0, 0.15, near, far), fill=kerb)
        d.polygon(_quad(cam, self.road_right, self.road_right, 0, 0.15, near, far), fill=_shade(kerb, 0.8))
        # repair patches and wear in both classes, so a patch on the road is not a roadwork cue
        for _ in range(int(rng.integers(0, 4))):
            x0 = float(rng.uniform(self.road_left, self.road_right - 1))
            z0 = float(rng.uniform(near * 2, 50))
            d.polygon(
                _quad(cam, x0, x0 + float(rng.uniform(0.5, 3)), 0, 0, z0, z0 + float(rng.uniform(1, 8))),
                fill=_shade(asphalt, float(rng.uniform(0.75, 1.15))),
            )
        line = _jitter(rng, (232, 232, 225), 10) if rng.random() < 0.85 else (225, 190, 40)
        dash, gap = float(rng.uniform(2.5, 4.5)), float(rng.uniform(5, 9))
        offset = float(rng.uniform(0, dash + gap))
        for k in range(-self.lanes_left, self.lanes_right + 1):
            xl = k * self.lane_w - self.lane_w / 2
            if not self.road_left + 0.5 < xl < self.road_right - 0.5:
                continue
            z = near - offset
            while z < 160:
                if z + dash > near * 0.8:
                    d.polygon(_quad(cam, xl - 0.07, xl + 0.07, 0, 0, max(z, near * 0.8), z + dash), fill=line)
                z += dash + gap
        if rng.random() < 0.6:
            for xe in (self.road_left + 0.35, self.road_right - 0.35):
                d.polygon(_quad(cam, xe - 0.06, xe + 0.06, 0, 0, near, far), fill=line)
        if rng.random() < 0.25:  # zebra crossing
            zc = float(rng.uniform(near * 2.5, 30))
            for xs in np.arange(self.road_left + 0.5, self.road_right - 0.5, 1.0):
                d.polygon(_quad(cam, xs, xs + 0.5, 0, 0, zc, zc + 3), fill=line)

    # -- objects, drawn far to near -------------------------------------------------------------------

    def add(self, z: float, fn: Callable[[], None]) -> None:
        self.objects.append((z, fn))

    def hides_focus(self, x: float, z: float, half_width: float) -> bool:
        """Would an object this wide at (x, z) stand in front of the focus spot?"""
        fx, fz = self.focus
        if z >= fz + 1.0:
            return False
        gap = abs(self.cam.pt(x, 0, z)[0] - self.cam.pt(fx, 0, fz)[0])
        return gap < half_width * self.cam.scale(z) + 1.5 * self.cam.scale(fz)

    def flush(self) -> None:
        for _, fn in sorted(self.objects, key=lambda item: -item[0]):
            fn()
        self.objects.clear()

    def random_z(self, near: float = 1.3, far: float = 45.0) -> float:
        lo = self.cam.z_bottom * near
        return float(np.exp(self.rng.uniform(np.log(lo), np.log(max(far, lo * 1.5)))))

    def walk_x(self, side: int) -> float:
        if side < 0:
            return self.road_left - float(self.rng.uniform(0.4, self.walk_w - 0.3))
        return self.road_right + float(self.rng.uniform(0.4, self.walk_w - 0.3))

    def lane_x(self) -> float:
        k = int(self.rng.integers(-self.lanes_left, self.lanes_right + 1))
        return k * self.lane_w + float(self.rng.uniform(-0.4, 0.4))

    def background_objects(self) -> None:
        """Street furniture, traffic and people shared by both classes, hard negatives included."""
        rng = self.rng
        tree_colours = AUTUMN_TREES if self.autumn else GREEN_TREES
        for side in (-1, 1):
            if rng.random() < 0.6:
                spacing = float(rng.uniform(6, 14))
                x = (self.road_left - 0.7) if side < 0 else (self.road_right + 0.7)
                z = self.cam.z_bottom * float(rng.uniform(0.8, 2.5))
                while z < 90:
                    colour = tree_colours[int(rng.integers(len(tree_colours)))]
                    if self.autumn and rng.random() < 0.3:
                        colour = GREEN_TREES[int(rng.integers(len(GREEN_TREES)))]
                    if not self.hides_focus(x, z, 2.0):
                        self.add(z, _bind(self.tree, x, z, colour))
                    z += spacing * float(rng.uniform(0.8, 1.2))
        for _ in range(int(rng.integers(0, 6))):
            z = self.random_z(1.5, 70)
            if rng.random() < 0.7:
                x = self.lane_x()
            else:  # parked at the kerb
                x = self.road_left + 1.1 if rng.random() < 0.5 else self.road_right - 1.1
            hard = rng.random() < 0.08
            colour = (HARD_CAR_COLOURS if hard else CAR_COLOURS)[
                int(rng.integers(4 if hard else len(CAR_COLOURS)))
            ]
            kind = str(rng.choice(["car", "car", "car", "suv", "van", "truck"]))
            if hard and rng.random() < 0.25:
                kind = "truck"  # municipal trucks are orange too
            if not self.hides_focus(x, z, 1.3):
                self.add(z, _bind(self.vehicle, x, z, _jitter(rng, colour, 10), kind))
        for _ in range(int(rng.integers(0, 5))):
            side = int(rng.choice([-1, 1]))
            z = self.random_z(1.6, 40)
            x = self.walk_x(side)
            shirt = CLOTHES[int(rng.integers(len(CLOTHES)))]
            if rng.random() < 0.15:
                shirt = HARD_CLOTHES[int(rng.integers(len(HARD_CLOTHES)))]
            if not self.hides_focus(x, z, 0.4):
                self.add(z, _bind(self.person, x, z, shirt, False))
        for _ in range(int(rng.integers(0, 3))):
            side = int(rng.choice([-1, 1]))
            z = self.random_z(1.5, 40)
            x = (self.road_left - 0.3) if side < 0 else (self.road_right + 0.3)
            kind = str(
                rng.choice(
                    [
                        "speed",
                        "speed",
                        "blue_round",
                        "parking",
                        "stop",
                        "give_way",
                        "priority",
                        "warning",
                        "warning",
                    ]
                )
            )
            self.add(z, _bind(self.sign, x, z, kind, float(rng.uniform(0.55, 0.85)), 2.3, False))
        if rng.random() < 0.15:  # orange bin or yellow post box on the pavement
            side = int(rng.choice([-1, 1]))
            z = self.random_z(1.5, 30)
            self.add(
                z, _bind(self.bin, self.walk_x(side), z, _jitter(rng, HARD_CLOTHES[int(rng.integers(2))], 10))
            )

    def roadwork(self) -> None:
        """One to several groups of roadwork evidence, the first at the focus spot (sometimes small, far)."""
        rng = self.rng
        n_groups = int(rng.choice([1, 2, 2, 3, 3, 4]))
        for g in range(n_groups):
            kind = str(
                rng.choice(
                    ["cone_line", "cones", "barricade", "barriers", "sign", "workers", "site", "fence"],
                    p=[0.2, 0.15, 0.14, 0.1, 0.13, 0.1, 0.1, 0.08],
                )
            )
            getattr(self, f"_rw_{kind}")(self.focus if g == 0 else None)

    def decoy(self) -> None:
        """A look-alike at the focus spot of a scene without roadwork."""
        rng = self.rng
        x, z = self.focus
        kind = str(rng.choice(["person", "person", "sign", "sign", "bin", "car"]))
        if kind == "person":
            clothes = HARD_CLOTHES if rng.random() < 0.5 else CLOTHES
            self.add(z, _bind(self.person, x, z, clothes[int(rng.integers(len(clothes)))], False))
        elif kind == "sign":
            self.add(
                z,
                _bind(
                    self.sign,
                    x,
                    z,
                    str(rng.choice(["warning", "give_way", "speed", "priority"])),
                    float(rng.uniform(0.6, 0.9)),
                    2.2,
                    False,
                ),
            )
        elif kind == "bin":
            self.add(z, _bind(self.bin, x, z, _jitter(rng, HARD_CLOTHES[int(rng.integers(2))], 10)))
        else:
            colour = HARD_CAR_COLOURS[int(rng.integers(len(HARD_CAR_COLOURS)))]
            self.add(z, _bind(self.vehicle, x, z, _jitter(rng, colour, 10), "car"))

    def _visible_spot(
        self,
        *,
        on_road: bool,
        near: float = 1.4,
        far: float = 40.0,
        near_share: float = 0.7,
        margin: float = 0.06,
    ) -> tuple[float, float]:
        rng = self.rng
        if rng.random() < near_share:  # most evidence is close enough to see well; the rest small and far
            far = min(far, 8.0)
        for _ in range(20):
            z = self.random_z(near, far)
            if on_road:
                x = float(rng.uniform(self.road_left + 0.4, self.road_right - 0.4))
            else:
                x = self.walk_x(int(rng.choice([-1, 1])))
            if self.cam.in_view(x, z, margin=margin):
                return x, z
        z = self.random_z(near, far)  # fall back to the middle of the view
        return self.cam.x_at(self.cam.width * float(rng.uniform(0.3, 0.7)), z), z

    def _rw_cone_line(self, spot: tuple[float, float] | None) -> None:
        rng = self.rng
        x, z = spot or self._visible_spot(on_road=True, far=35)
        dx = float(rng.uniform(-0.35, 0.35))
        colour = CONE_ORANGE[int(rng.integers(len(CONE_ORANGE)))]
        gap = float(rng.uniform(1.5, 4.0))
        for k in range(int(rng.integers(4, 12))):
            xk, zk = x + dx * k * gap, z + k * gap
            self.add(zk, _bind(self.cone, xk, zk, colour))

    def _rw_cones(self, spot: tuple[float, float] | None) -> None:
        rng = self.rng
        x, z = spot or self._visible_spot(on_road=bool(rng.random() < 0.7))
        colour = CONE_ORANGE[int(rng.integers(len(CONE_ORANGE)))]
        for _ in range(int(rng.integers(2, 6))):
            xk, zk = x + float(rng.uniform(-1.2, 1.2)), z + float(rng.uniform(0, 2.5))
            self.add(zk, _bind(self.cone, xk, zk, colour))

    def _rw_barricade(self, spot: tuple[float, float] | None) -> None:
        rng = self.rng
        x, z = spot or self._visible_spot(on_road=bool(rng.random() < 0.75), far=35)
        colours = (RED, WHITE) if rng.random() < 0.6 else (CONE_ORANGE[0], WHITE)
        for k in range(int(rng.integers(1, 3))):
            xk = x + k * float(rng.uniform(1.6, 2.2))
            self.add(z, _bind(self.barricade, xk, z, float(rng.uniform(1.2, 2.0)), colours))

    def _rw_barriers(self, spot: tuple[float, float] | None) -> None:
        rng = self.rng
        x, z = spot or self._visible_spot(on_road=True, far=35)
        colours = (RED, WHITE) if rng.random() < 0.5 else (CONE_ORANGE[1], WHITE)
        along = rng.random() < 0.6
        for k in range(int(rng.integers(2, 8))):
            if along:
                self.add(z + 1.2 * k, _bind(self.barrier_block, x, z + 1.2 * k, colours[k % 2], True))
            else:
                self.add(z, _bind(self.barrier_block, x + 1.2 * k, z, colours[k % 2], False))

    def _rw_sign(self, spot: tuple[float, float] | None) -> None:
        rng = self.rng
        x, z = spot or self._visible_spot(on_road=bool(rng.random() < 0.4), far=35)
        on_stand = self.road_left < x < self.road_right or rng.random() < 0.5  # on the road: a stand
        self.add(
            z,
            _bind(
                self.sign, x, z, "roadwork", float(rng.uniform(0.8, 1.2)), 1.0 if on_stand else 2.2, on_stand
            ),
        )

    def _rw_workers(self, spot: tuple[float, float] | None) -> None:
        rng = self.rng
        x, z = spot or self._visible_spot(on_road=bool(rng.random() < 0.6), far=35)
        for _ in range(int(rng.integers(1, 4))):
            xk, zk = x + float(rng.uniform(-1.5, 1.5)), z + float(rng.uniform(0, 3))
            self.add(zk, _bind(self.person, xk, zk, HIVIS[int(rng.integers(len(HIVIS)))], True))

    def _rw_site(self, spot: tuple[float, float] | None) -> None:
        """A dug-up patch of road behind barricades, maybe with a digger and workers."""
        rng = self.rng
        x, z = spot or self._visible_spot(on_road=True, near=2.0, far=30)
        w, length = float(rng.uniform(2, 5)), float(rng.uniform(3, 8))
        dirt = _jitter(rng, (118, 90, 62), 12)
        self.add(z + length + 50, _bind(self.patch, x - w / 2, x + w / 2, z, z + length, dirt))
        colours = (RED, WHITE) if rng.random() < 0.6 else (CONE_ORANGE[0], WHITE)
        self.add(z - 0.3, _bind(self.barricade, x, z - 0.3, min(w, 2.0), colours))
        if rng.random() < 0.5:
            self.add(z + length / 2, _bind(self.digger, x + float(rng.uniform(-1, 1)), z + length / 2))
        for _ in range(int(rng.integers(0, 3))):
            zk = z + float(rng.uniform(0.5, length))
            self.add(
                zk,
                _bind(
                    self.person,
                    x + float(rng.uniform(-w / 2, w / 2)),
                    zk,
                    HIVIS[int(rng.integers(len(HIVIS)))],
                    True,
                ),
            )

    def _rw_fence(self, spot: tuple[float, float] | None) -> None:
        rng = self.rng
        x, z = spot or self._visible_spot(on_road=bool(rng.random() < 0.5), far=30)
        netting = rng.random() < 0.5
        for k in range(int(rng.integers(2, 6))):
            zk = z + 3.5 * k
            self.add(zk, _bind(self.fence_panel, x, zk, netting))

    # -- object painters ------------------------------------------------------------------------------

    def tree(self, x: float, z: float, colour: RGB) -> None:
        cam, rng, d = self.cam, self.rng, self.draw
        s = cam.scale(z)
        bx, by = cam.pt(x, 0.15, z)
        trunk_h = float(rng.uniform(1.8, 3.2))
        r = float(rng.uniform(1.3, 2.6))
        d.rectangle([bx - 0.13 * s, by - (trunk_h + r * 0.5) * s, bx + 0.13 * s, by], fill=(80, 60, 45))
        cy = by - (trunk_h + r) * s
        for k in range(6):
            ox, oy = rng.uniform(-0.6, 0.6) * r * s, rng.uniform(-0.5, 0.4) * r * s
            rr = r * s * float(rng.uniform(0.5, 0.8))
            c = _shade(_jitter(rng, colour, 14), 0.8 + 0.06 * k)
            d.ellipse([bx + ox - rr, cy + oy - rr, bx + ox + rr, cy + oy + rr], fill=c)

    def vehicle(self, x: float, z: float, colour: RGB, kind: str) -> None:
        cam, rng, d = self.cam, self.rng, self.draw
        s = cam.scale(z)
        cx, cy = cam.pt(x, 0, z)
        w = {"car": 1.8, "suv": 1.95, "van": 2.0, "truck": 2.5}[kind] * s
        h = {"car": 1.45, "suv": 1.75, "van": 2.3, "truck": 3.2}[kind] * s
        d.ellipse([cx - 0.6 * w, cy - 0.1 * s, cx + 0.6 * w, cy + 0.08 * s], fill=(0, 0, 0, 110))
        for side in (-1, 1):
            d.rectangle(
                [cx + side * 0.38 * w - 0.12 * s, cy - 0.5 * s, cx + side * 0.38 * w + 0.12 * s, cy],
                fill=(20, 20, 22),
            )
        dark = _shade(colour, 0.7)
        if kind in ("van", "truck"):
            d.rectangle([cx - w / 2, cy - h, cx + w / 2, cy - 0.3 * s], fill=colour, outline=dark)
            if kind == "truck":
                d.line([cx, cy - h, cx, cy - 0.35 * s], fill=dark, width=max(1, int(0.04 * s)))
            else:
                d.rectangle([cx - 0.4 * w, cy - h * 0.92, cx + 0.4 * w, cy - h * 0.62], fill=(45, 55, 65))
        else:
            body_top = 0.62 * h
            d.rounded_rectangle(
                [cx - w / 2, cy - body_top, cx + w / 2, cy - 0.3 * s], radius=0.1 * s, fill=colour
            )
            d.polygon(
                [
                    (cx - 0.46 * w, cy - body_top),
                    (cx + 0.46 * w, cy - body_top),
                    (cx + 0.36 * w, cy - h),
                    (cx - 0.36 * w, cy - h),
                ],
                fill=colour,
            )
            d.polygon(
                [
                    (cx - 0.4 * w, cy - body_top - 0.04 * h),
                    (cx + 0.4 * w, cy - body_top - 0.04 * h),
                    (cx + 0.33 * w, cy - 0.95 * h),
                    (cx - 0.33 * w, cy - 0.95 * h),
                ],
                fill=(40, 48, 58),
            )
        lamp = (230, 30, 30) if rng.random() < 0.85 else (250, 240, 200)
        for side in (-1, 1):
            lx = cx + side * 0.4 * w
            d.rectangle(
                [
                    lx - 0.1 * w,
                    cy - 0.52 * h if kind == "car" else cy - 0.9 * s,
                    lx + 0.1 * w,
                    cy - 0.45 * h if kind == "car" else cy - 0.75 * s,
                ],
                fill=lamp,
            )
        d.rectangle([cx - 0.26 * s, cy - 0.62 * s, cx + 0.26 * s, cy - 0.5 * s], fill=(240, 240, 240))
        d.rectangle([cx - w / 2, cy - 0.42 * s, cx + w / 2, cy - 0.3 * s], fill=_shade(dark, 0.6))

    def person(self, x: float, z: float, shirt: RGB, worker: bool) -> None:
        cam, rng, d = self.cam, self.rng, self.draw
        s = cam.scale(z)
        h = float(rng.uniform(1.6, 1.9)) * s
        bx, by = cam.pt(x, 0.15 if not self.road_left < x < self.road_right else 0.0, z)
        trousers = (
            CLOTHES[int(rng.integers(2))] if not worker else ((40, 40, 60) if rng.random() < 0.6 else shirt)
        )
        skin = SKIN[int(rng.integers(len(SKIN)))]
        leg_w = 0.075 * h
        stride = float(rng.uniform(-0.05, 0.05)) * h
        for side in (-1, 1):
            d.polygon(
                [
                    (bx + side * 0.02 * h, by - 0.48 * h),
                    (bx + side * (0.02 * h + leg_w), by - 0.48 * h),
                    (bx + side * (0.02 * h + leg_w) + side * stride, by),
                    (bx + side * 0.02 * h + side * stride, by),
                ],
                fill=trousers,
            )
        torso = [bx - 0.14 * h, by - 0.82 * h, bx + 0.14 * h, by - 0.46 * h]
        arm = _shade(shirt, 0.85) if not worker else _jitter(rng, (60, 60, 70), 10)
        d.rectangle([torso[0] - 0.06 * h, torso[1] + 0.02 * h, torso[0], by - 0.5 * h], fill=arm)
        d.rectangle([torso[2], torso[1] + 0.02 * h, torso[2] + 0.06 * h, by - 0.5 * h], fill=arm)
        d.rectangle(torso, fill=shirt)
        if worker:
            for y in (0.6, 0.7):
                d.rectangle([torso[0], by - (y + 0.025) * h, torso[2], by - y * h], fill=(215, 215, 205))
            if trousers == shirt:
                d.rectangle([bx - 0.1 * h, by - 0.18 * h, bx + 0.1 * h, by - 0.155 * h], fill=(215, 215, 205))
        d.rectangle([bx - 0.04 * h, by - 0.86 * h, bx + 0.04 * h, by - 0.8 * h], fill=skin)
        d.ellipse([bx - 0.065 * h, by - 0.99 * h, bx + 0.065 * h, by - 0.84 * h], fill=skin)
        if worker:
            hat = [(250, 250, 250), (250, 210, 0), (250, 120, 0)][int(rng.integers(3))]
            d.chord([bx - 0.08 * h, by - 1.02 * h, bx + 0.08 * h, by - 0.9 * h], 180, 360, fill=hat)
            d.rectangle([bx - 0.09 * h, by - 0.965 * h, bx + 0.09 * h, by - 0.955 * h], fill=hat)
        else:
            hair = [(30, 25, 20), (90, 60, 30), (160, 130, 80), (60, 60, 60)][int(rng.integers(4))]
            d.chord([bx - 0.066 * h, by - 0.995 * h, bx + 0.066 * h, by - 0.9 * h], 180, 360, fill=hair)

    def sign(self, x: float, z: float, kind: str, size: float, centre_y: float, stand: bool) -> None:
        cam, rng, d = self.cam, self.rng, self.draw
        s = cam.scale(z)
        bx, by = cam.pt(x, 0.0, z)
        a = size * s
        cx, cy = bx, by - centre_y * s
        if stand:
            for side in (-1, 1):
                d.line([(cx, cy), (cx + side * 0.35 * s, by)], fill=(60, 60, 60), width=max(1, int(0.04 * s)))
            d.rectangle([cx - 0.4 * s, by - 0.1 * s, cx + 0.4 * s, by], fill=(235, 200, 20))
        else:
            d.rectangle([cx - 0.03 * s, cy, cx + 0.03 * s, by], fill=(150, 152, 156))
        if kind in ("roadwork", "warning", "give_way"):
            up = -1 if kind == "give_way" else 1
            tri = [
                (cx, cy - up * 0.577 * a),
                (cx - a / 2, cy + up * 0.289 * a),
                (cx + a / 2, cy + up * 0.289 * a),
            ]
            inner = [(cx + (px - cx) * 0.72, cy + (py - cy) * 0.72) for px, py in tri]
            fill = (250, 205, 20) if kind == "roadwork" and rng.random() < 0.35 else (245, 245, 242)
            d.polygon(tri, fill=RED)
            d.polygon(inner, fill=fill)
            lw = max(1, int(round(0.055 * a)))
            if kind == "roadwork":
                self._worker_pictogram(cx, cy + 0.04 * a, a, lw)
            elif kind == "warning":
                d.rectangle([cx - 0.035 * a, cy - 0.15 * a, cx + 0.035 * a, cy + 0.05 * a], fill=(15, 15, 15))
                d.rectangle([cx - 0.035 * a, cy + 0.09 * a, cx + 0.035 * a, cy + 0.15 * a], fill=(15, 15, 15))
        elif kind in ("speed", "blue_round"):
            box = [cx - a / 2, cy - a / 2, cx + a / 2, cy + a / 2]
            if kind == "speed":
                d.ellipse(box, fill=RED)
                d.ellipse([cx - 0.38 * a, cy - 0.38 * a, cx + 0.38 * a, cy + 0.38 * a], fill=(245, 245, 242))
                if a >= 12:
                    font = _font(max(6, int(0.42 * a)))
                    d.text(
                        (cx, cy),
                        str(rng.choice(["30", "50", "60", "20", "70"])),
                        fill=(15, 15, 15),
                        font=font,
                        anchor="mm",
                    )
            else:
                d.ellipse(box, fill=(20, 70, 170))
                d.line(
                    [(cx, cy + 0.3 * a), (cx, cy - 0.25 * a)],
                    fill=(245, 245, 245),
                    width=max(1, int(0.1 * a)),
                )
                d.polygon(
                    [(cx - 0.15 * a, cy - 0.15 * a), (cx + 0.15 * a, cy - 0.15 * a), (cx, cy - 0.33 * a)],
                    fill=(245, 245, 245),
                )
        elif kind == "parking":
            d.rectangle([cx - a / 2, cy - a / 2, cx + a / 2, cy + a / 2], fill=(20, 70, 170))
            if a >= 12:
                d.text((cx, cy), "P", fill=(245, 245, 245), font=_font(max(6, int(0.7 * a))), anchor="mm")
        elif kind == "stop":
            pts = [
                (
                    cx + a / 2 * math.cos(math.pi / 8 + k * math.pi / 4),
                    cy + a / 2 * math.sin(math.pi / 8 + k * math.pi / 4),
                )
                for k in range(8)
            ]
            d.polygon(pts, fill=RED)
            if a >= 16:
                d.text((cx, cy), "STOP", fill=(245, 245, 245), font=_font(max(6, int(0.26 * a))), anchor="mm")
        elif kind == "priority":
            d.polygon(
                [(cx, cy - a / 2), (cx + a / 2, cy), (cx, cy + a / 2), (cx - a / 2, cy)], fill=(245, 245, 242)
            )
            d.polygon(
                [(cx, cy - a / 3), (cx + a / 3, cy), (cx, cy + a / 3), (cx - a / 3, cy)], fill=(245, 190, 0)
            )

    def _worker_pictogram(self, cx: float, cy: float, a: float, lw: int) -> None:
        """The man-digging figure of the European roadwork sign, drawn in the triangle's inner area."""
        d, k = self.draw, (15, 15, 15)
        d.polygon(
            [(cx + 0.02 * a, cy + 0.17 * a), (cx + 0.24 * a, cy + 0.17 * a), (cx + 0.16 * a, cy + 0.07 * a)],
            fill=k,
        )
        d.ellipse([cx - 0.12 * a, cy - 0.2 * a, cx - 0.04 * a, cy - 0.12 * a], fill=k)
        d.line([(cx - 0.1 * a, cy - 0.1 * a), (cx - 0.02 * a, cy + 0.04 * a)], fill=k, width=lw + 1)
        d.line([(cx - 0.02 * a, cy + 0.04 * a), (cx - 0.09 * a, cy + 0.17 * a)], fill=k, width=lw)
        d.line([(cx - 0.02 * a, cy + 0.04 * a), (cx + 0.03 * a, cy + 0.17 * a)], fill=k, width=lw)
        d.line([(cx - 0.08 * a, cy - 0.06 * a), (cx + 0.1 * a, cy + 0.12 * a)], fill=k, width=lw)

    def cone(self, x: float, z: float, colour: RGB) -> None:
        cam, rng, d = self.cam, self.rng, self.draw
        s = cam.scale(z)
        bx, by = cam.pt(x, 0.0, z)
        h = float(rng.uniform(0.6, 0.95)) * s
        base_hw, top_hw = 0.19 * s, 0.04 * s

        def hw(t: float) -> float:
            return base_hw + (top_hw - base_hw) * t

        d.ellipse([bx - 0.3 * s, by - 0.05 * s, bx + 0.3 * s, by + 0.04 * s], fill=(0, 0, 0, 90))
        d.rectangle([bx - 0.22 * s, by - 0.05 * s, bx + 0.22 * s, by], fill=(35, 35, 35))
        top = by - h
        d.polygon(
            [
                (bx - base_hw, by - 0.05 * s),
                (bx + base_hw, by - 0.05 * s),
                (bx + top_hw, top),
                (bx - top_hw, top),
            ],
            fill=colour,
        )
        d.polygon(
            [
                (bx + 0.35 * base_hw, by - 0.05 * s),
                (bx + base_hw, by - 0.05 * s),
                (bx + top_hw, top),
                (bx + 0.35 * top_hw, top),
            ],
            fill=_shade(colour, 0.82),
        )
        for t0, t1 in ((0.32, 0.47), (0.6, 0.7))[: int(rng.integers(1, 3))]:
            y0, y1 = by - 0.05 * s - t0 * (h - 0.05 * s), by - 0.05 * s - t1 * (h - 0.05 * s)
            d.polygon(
                [(bx - hw(t0), y0), (bx + hw(t0), y0), (bx + hw(t1), y1), (bx - hw(t1), y1)], fill=WHITE
            )

    def barricade(self, x: float, z: float, width: float, colours: tuple[RGB, RGB]) -> None:
        cam, rng, d = self.cam, self.rng, self.draw
        s = cam.scale(z)
        bx, by = cam.pt(x, 0.0, z)
        w = width * s
        leg = (200, 200, 200) if rng.random() < 0.5 else (60, 60, 60)
        lw = max(1, int(0.05 * s))
        for side in (-1, 1):
            d.line([(bx + side * 0.42 * w, by - 1.0 * s), (bx + side * 0.48 * w, by)], fill=leg, width=lw)
        boards = [(0.72, 0.98)] + ([(0.3, 0.5)] if rng.random() < 0.5 else [])
        for y0, y1 in boards:
            bw, bh = int(round(w)), int(round((y1 - y0) * s))
            if bw < 2 or bh < 1:
                continue
            slope = 1.0 if rng.random() < 0.5 else -1.0
            board = _stripes((bw, bh), period=0.16 * s, colours=colours, slope=slope)
            self.image.paste(board, (int(round(bx - w / 2)), int(round(by - y1 * s))))
        if rng.random() < 0.5:  # warning lamp
            d.ellipse(
                [bx - 0.42 * w - 0.08 * s, by - 1.15 * s, bx - 0.42 * w + 0.08 * s, by - 0.99 * s],
                fill=(255, 190, 30),
            )

    def barrier_block(self, x: float, z: float, colour: RGB, along: bool) -> None:
        cam, d = self.cam, self.draw
        h = 0.9
        if along:
            d.polygon(_quad(cam, x, x, 0, h, z, z + 1.15), fill=colour)
            d.polygon(_quad(cam, x, x, h - 0.08, h, z, z + 1.15), fill=_shade(colour, 0.8))
            d.polygon(_quad(cam, x, x + 0.45, h, h, z, z + 1.15), fill=_shade(colour, 0.9))
        else:
            d.polygon(_quad(cam, x - 0.57, x + 0.57, 0, h, z, z), fill=colour)
            d.polygon(_quad(cam, x - 0.57, x + 0.57, 0.1, 0.18, z, z), fill=_shade(colour, 0.8))

    def fence_panel(self, x: float, z: float, netting: bool) -> None:
        cam, d = self.cam, self.draw
        s = cam.scale(z)
        frame = (150, 152, 150)
        fill = (250, 110, 20, 170) if netting else (185, 185, 180, 110)
        d.polygon(_quad(cam, x, x, 0.2, 2.0, z, z + 3.4), fill=fill)
        lw = max(1, int(0.05 * s))
        for zz in np.arange(z, z + 3.41, 0.3 if netting else 0.2):
            if cam.scale(zz) * 0.2 >= 3:
                d.line(
                    [cam.pt(x, 0.2, zz), cam.pt(x, 2.0, zz)],
                    fill=frame if not netting else (200, 90, 10),
                    width=1,
                )
        for yy in (0.2, 2.0):
            d.line([cam.pt(x, yy, z), cam.pt(x, yy, z + 3.4)], fill=frame, width=lw)
        if not netting:  # site banner along the bottom of the panel
            d.polygon(_quad(cam, x, x, 0.35, 0.95, z + 0.1, z + 3.3), fill=(235, 235, 230))
            for k in range(6):
                zz = z + 0.1 + k * 0.55
                d.polygon(_quad(cam, x, x, 0.35, 0.95, zz, zz + 0.275), fill=RED)
        for zz in (z, z + 3.4):
            d.line([cam.pt(x, 0.0, zz), cam.pt(x, 2.0, zz)], fill=frame, width=lw)
            d.polygon(_quad(cam, x - 0.2, x + 0.2, 0, 0.15, zz, zz), fill=(175, 175, 170))

    def digger(self, x: float, z: float) -> None:
        cam, rng, d = self.cam, self.rng, self.draw
        s = cam.scale(z)
        bx, by = cam.pt(x, 0.0, z)
        yellow = _jitter(rng, (235, 175, 10), 12)
        flip = 1 if rng.random() < 0.5 else -1
        d.rounded_rectangle([bx - 1.8 * s, by - 0.9 * s, bx + 1.8 * s, by], radius=0.4 * s, fill=(40, 40, 40))
        d.rectangle([bx - 1.5 * s, by - 2.1 * s, bx + 1.4 * s, by - 0.9 * s], fill=yellow)
        cab_x = bx - flip * 0.9 * s
        d.rectangle([cab_x - 0.6 * s, by - 3.2 * s, cab_x + 0.6 * s, by - 2.1 * s], fill=yellow)
        d.rectangle([cab_x - 0.45 * s, by - 3.05 * s, cab_x + 0.45 * s, by - 2.3 * s], fill=(50, 60, 70))
        elbow = (bx + flip * 2.2 * s, by - 3.6 * s)
        bucket = (bx + flip * 3.4 * s, by - 0.6 * s)
        lw = max(1, int(0.35 * s))
        d.line([(bx + flip * 0.6 * s, by - 2.0 * s), elbow], fill=yellow, width=lw)
        d.line([elbow, bucket], fill=_shade(yellow, 0.9), width=max(1, int(0.25 * s)))
        d.polygon(
            [bucket, (bucket[0] + flip * 0.6 * s, bucket[1] + 0.2 * s), (bucket[0], bucket[1] + 0.6 * s)],
            fill=(60, 60, 60),
        )

    def patch(self, x0: float, x1: float, z0: float, z1: float, colour: RGB) -> None:
        cam, rng, d = self.cam, self.rng, self.draw
        d.polygon(_quad(cam, x0, x1, 0, 0, z0, z1), fill=colour)
        for _ in range(12):
            xx, zz = float(rng.uniform(x0, x1)), float(rng.uniform(z0, z1))
            r = 0.15 * cam.scale(zz)
            px, py = cam.pt(xx, 0.0, zz)
            d.ellipse(
                [px - r, py - r * 0.4, px + r, py + r * 0.4],
                fill=_shade(colour, float(rng.uniform(0.6, 1.2))),
            )

    def bin(self, x: float, z: float, colour: RGB) -> None:
        """A street litter bin on a post (orange or yellow, like many city bins)."""
        d, s = self.draw, self.cam.scale(z)
        bx, by = self.cam.pt(x, 0.15, z)
        d.rectangle([bx - 0.04 * s, by - 0.9 * s, bx + 0.04 * s, by], fill=(70, 72, 75))
        d.rounded_rectangle(
            [bx - 0.2 * s, by - 1.0 * s, bx + 0.2 * s, by - 0.45 * s], radius=0.08 * s, fill=colour
        )
        d.chord([bx - 0.2 * s, by - 1.08 * s, bx + 0.2 * s, by - 0.92 * s], 180, 360, fill=(50, 50, 52))
        d.rectangle([bx - 0.12 * s, by - 0.9 * s, bx + 0.12 * s, by - 0.86 * s], fill=(30, 30, 30))

    # -- the camera ---------------------------------------------------------------------------------------

    def develop(self, size: tuple[int, int]) -> Image.Image:
        """Exposure, colour cast and contrast, then upscaling to `size` (softness) and sensor noise.

        Lookup tables, one resize and int16 maths: this is the hot loop of dataset generation.
        """
        rng = self.rng
        tint = {
            "day": (1.0, 1.0, 1.02),
            "clear": (1.03, 1.0, 0.97),
            "overcast": (0.97, 0.99, 1.03),
            "dusk": (0.84, 0.72, 0.68),
        }[self.sky]
        exposure = float(rng.uniform(0.75, 1.15))
        contrast = float(rng.uniform(0.8, 1.15))
        v = np.arange(256, dtype=np.float32)
        lut = np.concatenate([np.clip(((v - 128.0) * contrast + 128.0) * t * exposure, 0, 255) for t in tint])
        image = self.image.point(lut.round().astype(np.uint8).tolist())
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        w, h = size
        tile = _noise_tile()
        sigma16 = int(float(rng.uniform(1.0, 7.0)) * 16)
        oy, ox = int(rng.integers(0, tile.shape[0])), int(rng.integers(0, tile.shape[1]))
        rows = np.arange(oy, oy + h) % tile.shape[0]
        cols = np.arange(ox, ox + w) % tile.shape[1]
        noise = (tile[rows[:, None], cols[None, :]] * sigma16) >> 8
        a = np.asarray(image, dtype=np.int16) + noise[:, :, None]
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


@functools.cache
def _noise_tile() -> np.ndarray:
    """Unit Gaussian sensor noise in 1/16 steps, shared by all images (each crops it at a random offset)."""
    tile = np.random.default_rng(0x5E750).standard_normal((1031, 1031)) * 16
    return tile.round().astype(np.int16)


def _bind(fn: Callable[..., None], *args: Any) -> Callable[[], None]:
    return lambda: fn(*args)


def _flat(point: tuple[float, float]) -> list[float]:
    return [point[0], point[1]]


_FONTS: dict[int, ImageFont.FreeTypeFont | ImageFont.ImageFont] = {}


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


def render_scene(rng: np.random.Generator, *, width: int, height: int, roadwork: bool) -> Image.Image:
    """One RGB street scene of the given size; with `roadwork`, add one to several roadwork items."""
    if width < 16 or height < 16:
        raise ValueError(f"render_scene needs width and height of at least 16 pixels, got {width}x{height}")
    # Soft images (defocus, motion, cheap optics) are drawn smaller and upscaled, which also saves time.
    soft = float(rng.uniform(1.0, 1.7)) if rng.random() < 0.6 else 1.0
    painter = _Painter(rng, max(16, round(width / soft)), max(16, round(height / soft)))
    painter.sky_and_ground()
    painter.skyline()
    painter.facades()
    painter.road()
    painter.background_objects()
    if roadwork:
        painter.roadwork()
    elif rng.random() < 0.3:
        painter.decoy()
    painter.flush()
    return painter.develop((width, height))


# ----------------------------------------------------------------------------------------------------
# The dataset on disk.


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
    lut = [_clip8(round(v * gain)) for v in range(256)] * 3
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
