"""The canvas every demo painter draws on: a pinhole camera over a street, the depth-ordered queue of
objects, and the "film" (`develop`: exposure, softness, sensor noise).

World coordinates are in metres: x to the right, y up from the road, z forward from the camera.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .palette import RGB


@dataclass(frozen=True)
class Camera:
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


def quad(cam: Camera, x0: float, x1: float, y0: float, y1: float, z0: float, z1: float) -> list:
    """Projected corners of an axis-aligned rectangle: in a plane x=const (x0==x1), z=const or y=const."""
    if x0 == x1:
        return [cam.pt(x0, y0, z0), cam.pt(x0, y0, z1), cam.pt(x0, y1, z1), cam.pt(x0, y1, z0)]
    if z0 == z1:
        return [cam.pt(x0, y0, z0), cam.pt(x1, y0, z0), cam.pt(x1, y1, z0), cam.pt(x0, y1, z0)]
    return [cam.pt(x0, y0, z0), cam.pt(x1, y0, z0), cam.pt(x1, y0, z1), cam.pt(x0, y0, z1)]


def stripes(size: tuple[int, int], period: float, colours: tuple[RGB, RGB], slope: float) -> Image.Image:
    """A board of diagonal stripes (barriers, barricades)."""
    w, h = max(size[0], 1), max(size[1], 1)
    yy, xx = np.mgrid[0:h, 0:w]
    band = (((xx + yy * slope) / max(period, 1.0)) // 1).astype(np.int64) % 2
    palette = np.array(colours, dtype=np.uint8)
    return Image.fromarray(palette[band], "RGB")


def bind(fn: Callable[..., None], *args: Any) -> Callable[[], None]:
    return lambda: fn(*args)


def flat(point: tuple[float, float]) -> list[float]:
    return [point[0], point[1]]


class Canvas:
    """One scene being drawn: the image, the camera, and the scene-wide choices (street layout, lighting
    mood, the focus spot) that the painters built on it read."""

    def __init__(self, rng: np.random.Generator, width: int, height: int) -> None:
        self.rng = rng
        self.image = Image.new("RGB", (width, height))
        self.draw = ImageDraw.Draw(self.image, "RGBA")
        long_side = max(width, height)
        self.cam = Camera(
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
