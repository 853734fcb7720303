"""The static street: sky and clouds, the skyline, facades and open sides, the road with its kerbs,
pavements and markings. Both classes share it."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .canvas import Canvas, flat, quad
from .palette import FACADES, SKIES, grey, jitter, mix, shade


class SceneryPainter(Canvas):
    """Draws the street itself; the painters built on it add what stands in it."""

    def sky_and_ground(self) -> None:
        top, bottom = (jitter(self.rng, c, 10) for c in SKIES[self.sky])
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
        ground = jitter(self.rng, (120, 118, 112), 15)
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
                    flat(cam.pt(x, top, z)) + flat(cam.pt(x + w, -0.5, z)),
                    fill=jitter(rng, (70, 95, 65) if not self.autumn else (150, 110, 60), 15),
                )
            else:
                top = float(rng.uniform(8, 45))
                colour = mix(
                    jitter(rng, FACADES[int(rng.integers(len(FACADES)))], 10), SKIES[self.sky][1], 0.45
                )
                d.polygon(quad(cam, x, x + w, 0, top, z, z), fill=colour)
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
        grass = jitter(rng, (95, 125, 70) if not self.autumn else (140, 125, 70), 15)
        d.polygon(
            [
                cam.pt(edge, 0, cam.z_bottom * 0.5),
                cam.pt(edge, 0, 300),
                cam.pt(far_x, 0, 300),
                cam.pt(far_x, 0, cam.z_bottom * 0.5),
            ],
            fill=grass,
        )
        hedge = jitter(rng, (55, 90, 50), 12)
        x = edge + side * float(rng.uniform(3, 12))
        d.polygon(quad(cam, x, x, 0, float(rng.uniform(1.5, 4.0)), cam.z_bottom * 0.5, 200), fill=hedge)

    def _building(self, x: float, z0: float, z1: float, side: int) -> None:
        cam, rng, d = self.cam, self.rng, self.draw
        h = float(rng.uniform(6, 26))
        colour = jitter(rng, FACADES[int(rng.integers(len(FACADES)))], 12)
        d.polygon(quad(cam, x, x, 0, h, z0, z1), fill=colour)
        d.polygon(quad(cam, x, x, h - 0.4, h, z0, z1), fill=shade(colour, 0.8))
        lit = self.sky == "dusk"
        glass = jitter(rng, (60, 72, 85), 15)
        frame_w = float(rng.uniform(1.0, 1.6))
        step = frame_w + float(rng.uniform(0.8, 1.8))
        floor_h = float(rng.uniform(2.8, 3.4))
        floors = int((h - 1.0) // floor_h)
        zs = np.arange(z0 + 0.8, z1 - frame_w - 0.3, step)
        if len(zs) == 0 or cam.scale(z0) * frame_w < 1.5:
            return
        # shop front on the ground floor
        if rng.random() < 0.5:
            d.polygon(quad(cam, x, x, 0.3, 2.6, z0 + 0.5, z1 - 0.5), fill=jitter(rng, (50, 60, 70), 15))
            floors_from = 1
        else:
            floors_from = 0
        for f in range(floors_from, floors):
            y0 = f * floor_h + 0.9
            for wz in zs:
                if cam.scale(wz) * frame_w < 1.2:
                    break
                fill = jitter(rng, (250, 210, 120), 15) if lit and rng.random() < 0.35 else glass
                d.polygon(quad(cam, x, x, y0, y0 + 1.5, wz, wz + frame_w), fill=fill)

    def road(self) -> None:
        cam, rng, d = self.cam, self.rng, self.draw
        near, far = cam.z_bottom * 0.5, 400.0
        asphalt = grey(rng, 92 if rng.random() < 0.7 else 62, 14, (0, 0, 3))
        walk = grey(rng, 165, 18, (3, 1, -4))
        kerb = shade(walk, 1.08)
        for a, b in (
            (self.road_left - self.walk_w, self.road_left),
            (self.road_right, self.road_right + self.walk_w),
        ):
            d.polygon(quad(cam, a, b, 0.15, 0.15, near, far), fill=walk)
            # paving joints
            for zz in np.arange(math.ceil(near), 60.0, float(rng.uniform(1.5, 3.0))):
                if cam.scale(zz) * (b - a) < 6:
                    break
                d.line([cam.pt(a, 0.15, zz), cam.pt(b, 0.15, zz)], fill=shade(walk, 0.85), width=1)
        d.polygon(quad(cam, self.road_left, self.road_right, 0, 0, near, far), fill=asphalt)
        d.polygon(quad(cam, self.road_left, self.road_left, 0, 0.15, near, far), fill=kerb)
        d.polygon(quad(cam, self.road_right, self.road_right, 0, 0.15, near, far), fill=shade(kerb, 0.8))
        # repair patches and wear in both classes, so a patch on the road is not a roadwork cue
        for _ in range(int(rng.integers(0, 4))):
            x0 = float(rng.uniform(self.road_left, self.road_right - 1))
            z0 = float(rng.uniform(near * 2, 50))
            d.polygon(
                quad(cam, x0, x0 + float(rng.uniform(0.5, 3)), 0, 0, z0, z0 + float(rng.uniform(1, 8))),
                fill=shade(asphalt, float(rng.uniform(0.75, 1.15))),
            )
        line = jitter(rng, (232, 232, 225), 10) if rng.random() < 0.85 else (225, 190, 40)
        dash, gap = float(rng.uniform(2.5, 4.5)), float(rng.uniform(5, 9))
        offset = float(rng.uniform(0, dash + gap))
        for k in range(-self.lanes_left, self.lanes_right + 1):
            xl = k * self.lane_w - self.lane_w / 2
            if not self.road_left + 0.5 < xl < self.road_right - 0.5:
                continue
            z = near - offset
            while z < 160:
                if z + dash > near * 0.8:
                    d.polygon(quad(cam, xl - 0.07, xl + 0.07, 0, 0, max(z, near * 0.8), z + dash), fill=line)
                z += dash + gap
        if rng.random() < 0.6:
            for xe in (self.road_left + 0.35, self.road_right - 0.35):
                d.polygon(quad(cam, xe - 0.06, xe + 0.06, 0, 0, near, far), fill=line)
        if rng.random() < 0.25:  # zebra crossing
            zc = float(rng.uniform(near * 2.5, 30))
            for xs in np.arange(self.road_left + 0.5, self.road_right - 0.5, 1.0):
                d.polygon(quad(cam, xs, xs + 0.5, 0, 0, zc, zc + 3), fill=line)
