"""What stands in every street, roadwork or not: trees, traffic, pedestrians, road signs, bins, and
the hard negatives among them (orange cars, autumn trees, warning signs, people in orange)."""

from __future__ import annotations

import math

from PIL import ImageFont

from .canvas import bind
from .palette import (
    AUTUMN_TREES,
    CAR_COLOURS,
    CLOTHES,
    GREEN_TREES,
    HARD_CAR_COLOURS,
    HARD_CLOTHES,
    RED,
    RGB,
    SKIN,
    jitter,
    shade,
)
from .scenery import SceneryPainter


class StreetPainter(SceneryPainter):
    """Places and draws the street's objects (into the canvas's far-to-near queue)."""

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
                        self.add(z, bind(self.tree, x, z, colour))
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
                self.add(z, bind(self.vehicle, x, z, jitter(rng, colour, 10), kind))
        for _ in range(int(rng.integers(0, 5))):
            side = int(rng.choice([-1, 1]))
            z = self.random_z(1.6, 40)
            x = self.walk_x(side)
            shirt = CLOTHES[int(rng.integers(len(CLOTHES)))]
            if rng.random() < 0.15:
                shirt = HARD_CLOTHES[int(rng.integers(len(HARD_CLOTHES)))]
            if not self.hides_focus(x, z, 0.4):
                self.add(z, bind(self.person, x, z, shirt, False))
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
            self.add(z, bind(self.sign, x, z, kind, float(rng.uniform(0.55, 0.85)), 2.3, False))
        if rng.random() < 0.15:  # orange bin or yellow post box on the pavement
            side = int(rng.choice([-1, 1]))
            z = self.random_z(1.5, 30)
            self.add(
                z, bind(self.bin, self.walk_x(side), z, jitter(rng, HARD_CLOTHES[int(rng.integers(2))], 10))
            )

    def decoy(self) -> None:
        """A look-alike at the focus spot of a scene without roadwork."""
        rng = self.rng
        x, z = self.focus
        kind = str(rng.choice(["person", "person", "sign", "sign", "bin", "car"]))
        if kind == "person":
            clothes = HARD_CLOTHES if rng.random() < 0.5 else CLOTHES
            self.add(z, bind(self.person, x, z, clothes[int(rng.integers(len(clothes)))], False))
        elif kind == "sign":
            self.add(
                z,
                bind(
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
            self.add(z, bind(self.bin, x, z, jitter(rng, HARD_CLOTHES[int(rng.integers(2))], 10)))
        else:
            colour = HARD_CAR_COLOURS[int(rng.integers(len(HARD_CAR_COLOURS)))]
            self.add(z, bind(self.vehicle, x, z, jitter(rng, colour, 10), "car"))

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
            c = shade(jitter(rng, colour, 14), 0.8 + 0.06 * k)
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
        dark = shade(colour, 0.7)
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
        d.rectangle([cx - w / 2, cy - 0.42 * s, cx + w / 2, cy - 0.3 * s], fill=shade(dark, 0.6))

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
        arm = shade(shirt, 0.85) if not worker else jitter(rng, (60, 60, 70), 10)
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


_FONTS: dict[int, ImageFont.FreeTypeFont | ImageFont.ImageFont] = {}


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]
