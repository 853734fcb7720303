"""Roadwork evidence: groups of cones, barricades, barrier blocks, roadwork signs, workers in
high-visibility clothes, fenced sites with diggers; the first group stands at the scene's focus spot."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .canvas import bind, quad, stripes
from .palette import CONE_ORANGE, HIVIS, RED, RGB, WHITE, jitter, shade
from .street import StreetPainter


class RoadworkPainter(StreetPainter):
    """A street painter that can also put roadwork in the street: the painter of every demo scene."""

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

    def _rw_cone_line(self, spot: tuple[float, float] | None) -> None:
        rng = self.rng
        x, z = spot or self._visible_spot(on_road=True, far=35)
        dx = float(rng.uniform(-0.35, 0.35))
        colour = CONE_ORANGE[int(rng.integers(len(CONE_ORANGE)))]
        gap = float(rng.uniform(1.5, 4.0))
        for k in range(int(rng.integers(4, 12))):
            xk, zk = x + dx * k * gap, z + k * gap
            self.add(zk, bind(self.cone, xk, zk, colour))

    def _rw_cones(self, spot: tuple[float, float] | None) -> None:
        rng = self.rng
        x, z = spot or self._visible_spot(on_road=bool(rng.random() < 0.7))
        colour = CONE_ORANGE[int(rng.integers(len(CONE_ORANGE)))]
        for _ in range(int(rng.integers(2, 6))):
            xk, zk = x + float(rng.uniform(-1.2, 1.2)), z + float(rng.uniform(0, 2.5))
            self.add(zk, bind(self.cone, xk, zk, colour))

    def _rw_barricade(self, spot: tuple[float, float] | None) -> None:
        rng = self.rng
        x, z = spot or self._visible_spot(on_road=bool(rng.random() < 0.75), far=35)
        colours = (RED, WHITE) if rng.random() < 0.6 else (CONE_ORANGE[0], WHITE)
        for k in range(int(rng.integers(1, 3))):
            xk = x + k * float(rng.uniform(1.6, 2.2))
            self.add(z, bind(self.barricade, xk, z, float(rng.uniform(1.2, 2.0)), colours))

    def _rw_barriers(self, spot: tuple[float, float] | None) -> None:
        rng = self.rng
        x, z = spot or self._visible_spot(on_road=True, far=35)
        colours = (RED, WHITE) if rng.random() < 0.5 else (CONE_ORANGE[1], WHITE)
        along = rng.random() < 0.6
        for k in range(int(rng.integers(2, 8))):
            if along:
                self.add(z + 1.2 * k, bind(self.barrier_block, x, z + 1.2 * k, colours[k % 2], True))
            else:
                self.add(z, bind(self.barrier_block, x + 1.2 * k, z, colours[k % 2], False))

    def _rw_sign(self, spot: tuple[float, float] | None) -> None:
        rng = self.rng
        x, z = spot or self._visible_spot(on_road=bool(rng.random() < 0.4), far=35)
        on_stand = self.road_left < x < self.road_right or rng.random() < 0.5  # on the road: a stand
        self.add(
            z,
            bind(
                self.sign, x, z, "roadwork", float(rng.uniform(0.8, 1.2)), 1.0 if on_stand else 2.2, on_stand
            ),
        )

    def _rw_workers(self, spot: tuple[float, float] | None) -> None:
        rng = self.rng
        x, z = spot or self._visible_spot(on_road=bool(rng.random() < 0.6), far=35)
        for _ in range(int(rng.integers(1, 4))):
            xk, zk = x + float(rng.uniform(-1.5, 1.5)), z + float(rng.uniform(0, 3))
            self.add(zk, bind(self.person, xk, zk, HIVIS[int(rng.integers(len(HIVIS)))], True))

    def _rw_site(self, spot: tuple[float, float] | None) -> None:
        """A dug-up patch of road behind barricades, maybe with a digger and workers."""
        rng = self.rng
        x, z = spot or self._visible_spot(on_road=True, near=2.0, far=30)
        w, length = float(rng.uniform(2, 5)), float(rng.uniform(3, 8))
        dirt = jitter(rng, (118, 90, 62), 12)
        self.add(z + length + 50, bind(self.patch, x - w / 2, x + w / 2, z, z + length, dirt))
        colours = (RED, WHITE) if rng.random() < 0.6 else (CONE_ORANGE[0], WHITE)
        self.add(z - 0.3, bind(self.barricade, x, z - 0.3, min(w, 2.0), colours))
        if rng.random() < 0.5:
            self.add(z + length / 2, bind(self.digger, x + float(rng.uniform(-1, 1)), z + length / 2))
        for _ in range(int(rng.integers(0, 3))):
            zk = z + float(rng.uniform(0.5, length))
            self.add(
                zk,
                bind(
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
            self.add(zk, bind(self.fence_panel, x, zk, netting))

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
            fill=shade(colour, 0.82),
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
            board = stripes((bw, bh), period=0.16 * s, colours=colours, slope=slope)
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
            d.polygon(quad(cam, x, x, 0, h, z, z + 1.15), fill=colour)
            d.polygon(quad(cam, x, x, h - 0.08, h, z, z + 1.15), fill=shade(colour, 0.8))
            d.polygon(quad(cam, x, x + 0.45, h, h, z, z + 1.15), fill=shade(colour, 0.9))
        else:
            d.polygon(quad(cam, x - 0.57, x + 0.57, 0, h, z, z), fill=colour)
            d.polygon(quad(cam, x - 0.57, x + 0.57, 0.1, 0.18, z, z), fill=shade(colour, 0.8))

    def fence_panel(self, x: float, z: float, netting: bool) -> None:
        cam, d = self.cam, self.draw
        s = cam.scale(z)
        frame = (150, 152, 150)
        fill = (250, 110, 20, 170) if netting else (185, 185, 180, 110)
        d.polygon(quad(cam, x, x, 0.2, 2.0, z, z + 3.4), fill=fill)
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
            d.polygon(quad(cam, x, x, 0.35, 0.95, z + 0.1, z + 3.3), fill=(235, 235, 230))
            for k in range(6):
                zz = z + 0.1 + k * 0.55
                d.polygon(quad(cam, x, x, 0.35, 0.95, zz, zz + 0.275), fill=RED)
        for zz in (z, z + 3.4):
            d.line([cam.pt(x, 0.0, zz), cam.pt(x, 2.0, zz)], fill=frame, width=lw)
            d.polygon(quad(cam, x - 0.2, x + 0.2, 0, 0.15, zz, zz), fill=(175, 175, 170))

    def digger(self, x: float, z: float) -> None:
        cam, rng, d = self.cam, self.rng, self.draw
        s = cam.scale(z)
        bx, by = cam.pt(x, 0.0, z)
        yellow = jitter(rng, (235, 175, 10), 12)
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
        d.line([elbow, bucket], fill=shade(yellow, 0.9), width=max(1, int(0.25 * s)))
        d.polygon(
            [bucket, (bucket[0] + flip * 0.6 * s, bucket[1] + 0.2 * s), (bucket[0], bucket[1] + 0.6 * s)],
            fill=(60, 60, 60),
        )

    def patch(self, x0: float, x1: float, z0: float, z1: float, colour: RGB) -> None:
        cam, rng, d = self.cam, self.rng, self.draw
        d.polygon(quad(cam, x0, x1, 0, 0, z0, z1), fill=colour)
        for _ in range(12):
            xx, zz = float(rng.uniform(x0, x1)), float(rng.uniform(z0, z1))
            r = 0.15 * cam.scale(zz)
            px, py = cam.pt(xx, 0.0, zz)
            d.ellipse(
                [px - r, py - r * 0.4, px + r, py + r * 0.4],
                fill=shade(colour, float(rng.uniform(0.6, 1.2))),
            )


def render_scene(rng: np.random.Generator, *, width: int, height: int, roadwork: bool) -> Image.Image:
    """One RGB street scene of the given size; with `roadwork`, add one to several roadwork items."""
    if width < 16 or height < 16:
        raise ValueError(f"render_scene needs width and height of at least 16 pixels, got {width}x{height}")
    # Soft images (defocus, motion, cheap optics) are drawn smaller and upscaled, which also saves time.
    soft = float(rng.uniform(1.0, 1.7)) if rng.random() < 0.6 else 1.0
    painter = RoadworkPainter(rng, max(16, round(width / soft)), max(16, round(height / soft)))
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
