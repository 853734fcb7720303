"""Colours of the demo's street scenes: palettes (data tables) and the small colour arithmetic the
painters share."""

from __future__ import annotations

import numpy as np

RGB = tuple[int, int, int]


def clip8(value: float) -> int:
    return int(min(max(value, 0), 255))


def jitter(rng: np.random.Generator, colour: RGB, amount: int = 12) -> RGB:
    offsets = rng.integers(-amount, amount + 1, size=3).tolist()
    return tuple(clip8(c + o) for c, o in zip(colour, offsets, strict=True))  # type: ignore[return-value]


def grey(rng: np.random.Generator, level: int, amount: int, tint: RGB = (0, 0, 0)) -> RGB:
    """A grey with random brightness and a fixed slight tint (asphalt, paving)."""
    v = level + int(rng.integers(-amount, amount + 1))
    offsets = rng.integers(-3, 4, size=3).tolist()
    return tuple(clip8(v + t + o) for t, o in zip(tint, offsets, strict=True))  # type: ignore[return-value]


def mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def shade(colour: RGB, factor: float) -> RGB:
    return tuple(clip8(c * factor) for c in colour)  # type: ignore[return-value]


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
