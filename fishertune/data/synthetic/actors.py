"""The things a street holds, each drawn at a world position: trees, poles with traffic lights,
signs and lamps, small street objects, vehicles (boxes with windows and wheels), people, and
two-wheelers with or without a rider. Each has its class's colour family; random details come from
the generator at drawing time.
"""

from __future__ import annotations

import numpy as np

from fishertune.data.synthetic.canvas import (BICYCLE, BICYCLIST, BUS, CAR, MOTORCYCLE, MOTORCYCLIST, ON_RAILS, PERSON,
                                              POLE, SIGN_BACK, SIGN_FRAME, SIGN_FRONT, STREET_LIGHT, TRAFFIC_LIGHT,
                                              TRUCK, VEGETATION, Camera, Canvas, Colour, jitter, shade)

CAR_COLOURS = [(30, 50, 150), (160, 165, 175), (25, 25, 30), (150, 25, 25), (40, 90, 160), (200, 200, 205)]
CLOTHES = [(40, 45, 90), (120, 30, 40), (70, 60, 50), (30, 30, 35), (90, 40, 100)]
SIGN_COLOURS = [(200, 30, 30), (30, 70, 170), (230, 190, 20)]
POLE_GREY = (130, 132, 135)


class Actors:
    """Draws things on ``canvas`` through ``cam``, with details drawn from ``rng``."""

    def __init__(self, cam: Camera, canvas: Canvas, rng: np.random.Generator) -> None:
        self.cam, self.canvas, self.rng = cam, canvas, rng

    def tree(self, x: float, z: float, big: bool = False) -> None:
        """A trunk and a crown of overlapping blobs, all vegetation."""
        cam, cv, rng = self.cam, self.canvas, self.rng
        crown = jitter(rng, (60, 110, 40), 15)
        radius = rng.uniform(2.0, 3.5) if big else rng.uniform(1.2, 2.4)
        top = rng.uniform(3, 5) + radius
        cv.polygon(cam.sprite(x, z, [(-0.15, 0), (0.15, 0), (0.15, top - radius), (-0.15, top - radius)]),
                   (90, 65, 45), VEGETATION, z)
        for _ in range(4):
            cx, cy = x + rng.normal(0, radius * 0.4), top - radius + rng.normal(0, radius * 0.3)
            r = radius * rng.uniform(0.6, 1.0)
            cv.ellipse((*cam.point(cx - r, cy + r, z), *cam.point(cx + r, cy - r, z)), jitter(rng, crown, 10),
                       VEGETATION, z)

    def pole(self, x: float, z: float, height: float, label: int = POLE, colour: Colour = POLE_GREY,
             width: float = 0.18) -> None:
        """A vertical pole (or, with ``label``, a utility pole)."""
        self.canvas.polygon(self.cam.sprite(x, z, [(-width / 2, 0), (width / 2, 0), (width / 2, height),
                                                   (-width / 2, height)]), colour, label, z)

    def traffic_light(self, x: float, z: float, toward_road: float) -> None:
        """A pole with an arm reaching ``toward_road`` metres over the road, a light on each end."""
        cam, cv, rng = self.cam, self.canvas, self.rng
        height = rng.uniform(4.5, 5.5)
        housing = jitter(rng, (35, 35, 35), 5) if rng.random() < 0.7 else (200, 160, 30)
        lit = int(rng.integers(3))
        self.pole(x, z, height)
        cv.polygon(cam.sprite(x, z, [(0, height - 0.15), (toward_road, height - 0.15), (toward_road, height),
                                     (0, height)]), POLE_GREY, POLE, z)
        for u in (0.0, toward_road):
            cv.polygon(cam.sprite(x + u, z, [(-0.2, height - 1.0), (0.2, height - 1.0), (0.2, height - 0.05),
                                             (-0.2, height - 0.05)]), housing, TRAFFIC_LIGHT, z)
            for k, lamp in enumerate([(255, 40, 30), (255, 180, 0), (40, 230, 90)]):
                v = height - 0.25 - 0.28 * k
                box = (*cam.point(x + u - 0.1, v + 0.1, z), *cam.point(x + u + 0.1, v - 0.1, z))
                cv.ellipse(box, lamp if k == lit else shade(lamp, 0.25))
                if k == lit:
                    cv.glow(box, lamp)

    def sign(self, x: float, z: float, facing: bool) -> None:
        """A sign on a short pole and a frame: its front when ``facing`` the camera, else its grey back."""
        cam, cv, rng = self.cam, self.canvas, self.rng
        kind, colour = int(rng.integers(3)), SIGN_COLOURS[rng.integers(len(SIGN_COLOURS))]
        height = rng.uniform(2.2, 3.0)
        self.pole(x, z, height, width=0.08)
        cv.polygon(cam.sprite(x, z, [(-0.05, height - 0.1), (0.05, height - 0.1), (0.05, height + 0.1),
                                     (-0.05, height + 0.1)]), (90, 90, 95), SIGN_FRAME, z)
        c = height + 0.35
        label, fill = (SIGN_FRONT, colour) if facing else (SIGN_BACK, (150, 150, 155))
        if kind == 0:  # round, white inside
            cv.ellipse((*cam.point(x - 0.35, c + 0.35, z), *cam.point(x + 0.35, c - 0.35, z)), fill, label, z)
            if facing:
                cv.ellipse((*cam.point(x - 0.22, c + 0.22, z), *cam.point(x + 0.22, c - 0.22, z)), (235, 235, 235))
        elif kind == 1:  # triangular
            cv.polygon(cam.sprite(x, z, [(-0.4, c - 0.3), (0.4, c - 0.3), (0, c + 0.4)]), fill, label, z)
        else:  # square, with a white bar
            cv.polygon(cam.sprite(x, z, [(-0.3, c - 0.3), (0.3, c - 0.3), (0.3, c + 0.3), (-0.3, c + 0.3)]),
                       fill, label, z)
            if facing:
                cv.polygon(cam.sprite(x, z, [(-0.05, c - 0.2), (0.05, c - 0.2), (0.05, c + 0.2), (-0.05, c + 0.2)]),
                           (240, 240, 240))

    def street_light(self, x: float, z: float, toward_road: float) -> None:
        """A tall pole with an arm and a glowing lamp head (the head is Mapillary's street light)."""
        cam, cv = self.cam, self.canvas
        height = self.rng.uniform(6, 8)
        self.pole(x, z, height, width=0.15)
        cv.line([cam.point(x, height, z), cam.point(x + toward_road, height + 0.3, z)],
                max(cam.scale(z) * 0.1, 1), POLE_GREY, POLE, z)
        end = x + toward_road
        head = (*cam.point(end - 0.35, height + 0.45, z), *cam.point(end + 0.35, height + 0.15, z))
        cv.ellipse(head, (200, 195, 170), STREET_LIGHT, z)
        cv.glow(head, (255, 230, 170))

    def block(self, x: float, z: float, label: int, colour: Colour, size: tuple[float, float]) -> None:
        """A small flat object standing on the sidewalk (a bench, a bin)."""
        w, h = size
        self.canvas.polygon(self.cam.sprite(x, z, [(-w / 2, 0), (w / 2, 0), (w / 2, h), (-w / 2, h)]), colour, label, z)

    def box(self, x: float, z: float, w: float, h: float, length: float, colour: Colour, label: int,
            y0: float = 0.0) -> None:
        """A box with its rear face at depth ``z``; its visible side and top are drawn darker/lighter."""
        cam, cv = self.cam, self.canvas
        if x - w / 2 > 0 or x + w / 2 < 0:
            sx = x - w / 2 if x > 0 else x + w / 2
            cv.polygon(cam.side(sx, z, z + length, y0, y0 + h), shade(colour, 0.75), label, z + length / 2)
        if y0 + h < cam.height_m:
            cv.polygon(cam.points([(x - w / 2, y0 + h, z), (x + w / 2, y0 + h, z), (x + w / 2, y0 + h, z + length),
                                   (x - w / 2, y0 + h, z + length)]), shade(colour, 1.1), label, z)
        cv.polygon(cam.sprite(x, z, [(-w / 2, y0), (w / 2, y0), (w / 2, y0 + h), (-w / 2, y0 + h)]), colour, label, z)

    def side_windows(self, x: float, z0: float, z1: float, y0: float, y1: float, step: float, glass: Colour) -> None:
        """A row of windows every ``step`` metres on the side plane at lateral ``x`` (none if edge-on)."""
        if -0.1 < x < 0.1:
            return
        for z in np.arange(z0, z1 - step * 0.6, step):
            self.canvas.polygon(self.cam.side(x, z + 0.1, z + step - 0.1, y0, y1), glass)

    def wheels(self, x: float, z: float, w: float, length: float, radius: float) -> None:
        """Dark tyres under the rear corners and, where the side shows, on the side."""
        cam, cv = self.cam, self.canvas
        for u in (-w / 2 + 0.05, w / 2 - 0.35):
            cv.polygon(cam.sprite(x, z, [(u, 0), (u + 0.3, 0), (u + 0.3, radius), (u, radius)]), (20, 20, 20))
        if abs(x) > w / 2:
            sx = x - w / 2 if x > 0 else x + w / 2
            for zc in (z + 0.9, z + length - 0.9):
                cv.polygon(cam.side(sx, zc - radius, zc + radius, 0, 2 * radius), (25, 25, 25))

    def vehicle(self, kind: str, x: float, z: float) -> None:
        """A ``car``, ``truck``, ``bus`` or ``tram`` seen from behind, its rear at ``(x, z)``."""
        rng, cv, cam = self.rng, self.canvas, self.cam
        glass = jitter(rng, (40, 50, 60), 6)
        if kind == "car":
            colour, w = jitter(rng, CAR_COLOURS[rng.integers(len(CAR_COLOURS))], 12), 1.8
            self.box(x, z, w, 0.8, 4.3, colour, CAR, 0.0)
            self.box(x, z + 1.0, 1.55, 0.7, 2.3, colour, CAR, 0.8)  # the cabin stands on the body
            cv.polygon(cam.sprite(x, z + 1.0, [(-0.65, 0.85), (0.65, 0.85), (0.6, 1.35), (-0.6, 1.35)]), glass)
            self.side_windows(x - 0.78 if x > 0 else x + 0.78, z + 1.1, z + 3.2, 0.85, 1.35, 1.05, glass)
            for u in (-0.8, 0.55):
                pts = cam.sprite(x, z, [(u, 0.55), (u + 0.25, 0.55), (u + 0.25, 0.7), (u, 0.7)])
                cv.polygon(pts, (200, 20, 20))
                cv.glow_polygon(pts, (255, 40, 30))
            self.wheels(x, z, w, 4.3, 0.33)
        elif kind == "truck":
            cargo = jitter(rng, (225, 225, 220), 10)
            cab = jitter(rng, [(200, 100, 20), (30, 80, 160), (170, 30, 30)][rng.integers(3)], 10)
            self.box(x, z + 6.3, 2.4, 2.9, 2.2, cab, TRUCK, 0.4)
            self.box(x, z, 2.5, 3.4, 6.3, cargo, TRUCK, 0.6)
            for u in np.arange(-1.1, 1.2, 0.35):  # ribs of the cargo doors
                cv.line([cam.point(x + u, 0.7, z), cam.point(x + u, 3.9, z)], cam.scale(z) * 0.04, shade(cargo, 0.8))
            self.wheels(x, z, 2.5, 8.5, 0.5)
        elif kind == "bus":
            colour = jitter(rng, [(230, 190, 30), (190, 40, 35), (40, 110, 170)][rng.integers(3)], 10)
            self.box(x, z, 2.55, 3.1, 11.5, colour, BUS, 0.25)
            cv.polygon(cam.sprite(x, z, [(-1.1, 1.9), (1.1, 1.9), (1.1, 3.0), (-1.1, 3.0)]), glass)
            self.side_windows(x - 1.28 if x > 0 else x + 1.28, z + 0.5, z + 11, 1.4, 2.9, 1.7, glass)
            self.wheels(x, z, 2.55, 11.5, 0.5)
        else:  # a tram on its rails
            colour = jitter(rng, (220, 225, 225), 8)
            stripe = jitter(rng, [(200, 40, 40), (30, 140, 140)][rng.integers(2)], 10)
            self.box(x, z, 2.6, 3.4, 25.0, colour, ON_RAILS, 0.35)
            cv.polygon(cam.sprite(x, z, [(-1.15, 1.7), (1.15, 1.7), (1.1, 3.2), (-1.1, 3.2)]), glass)
            cv.polygon(cam.sprite(x, z, [(-1.3, 0.7), (1.3, 0.7), (1.3, 1.1), (-1.3, 1.1)]), stripe)
            sx = x - 1.3 if x > 0 else x + 1.3
            self.side_windows(sx, z + 0.5, z + 25, 1.6, 3.1, 2.2, glass)
            if abs(x) > 1.3:
                cv.polygon(cam.side(sx, z, z + 25, 0.7, 1.1), shade(stripe, 0.75))
            for u in (-0.7, 0.55):
                pts = cam.sprite(x, z, [(u, 1.3), (u + 0.15, 1.3), (u + 0.15, 1.45), (u, 1.45)])
                cv.glow_polygon(pts, (255, 240, 200))
            cv.line([cam.point(x, 3.75, z), cam.point(x + 0.8, 4.6, z)], cam.scale(z) * 0.05, (60, 60, 60), ON_RAILS, z)

    def person(self, x: float, z: float, rider: int | None = None, y0: float = 0.0, lean: float = 0.0) -> None:
        """A standing person at ``(x, z)``, or a rider (``rider`` label) seated at height ``y0``."""
        rng, cv, cam = self.rng, self.canvas, self.cam
        h = rng.uniform(1.55, 1.9)
        label = PERSON if rider is None else rider
        if rider is None:
            body = jitter(rng, CLOTHES[rng.integers(len(CLOTHES))], 12)
        else:  # riders wear a high-visibility jacket and a white helmet
            body = jitter(rng, (230, 140, 20), 15)
        skin = jitter(rng, (205, 160, 130), 25)
        legs = jitter(rng, (45, 45, 60), 10)
        hip = y0 + (0.48 * h if rider is None else 0.25 * h)
        if rider is None:
            spread = rng.uniform(0.02, 0.15)
            for s in (-1, 1):
                cv.polygon(cam.sprite(x, z, [(s * 0.04, hip), (s * 0.16, hip), (s * (0.1 + spread), 0),
                                             (s * (spread - 0.02), 0)]), legs, label, z)
        else:
            cv.polygon(cam.sprite(x, z, [(-0.1, hip), (0.2, hip), (0.35, y0), (0.2, y0)]), legs, label, z)
        shoulders = hip + 0.33 * h
        cv.polygon(cam.sprite(x, z, [(-0.18, hip), (0.18, hip), (0.22 + lean, shoulders), (-0.22 + lean, shoulders)]),
                   body, label, z)
        for s in (-1, 1):  # arms
            hand = shoulders - 0.55
            cv.polygon(cam.sprite(x, z, [(s * 0.2 + lean, shoulders), (s * 0.28 + lean, shoulders),
                                         (s * 0.3 + 2 * lean, hand), (s * 0.22 + 2 * lean, hand)]),
                       shade(body, 0.85), label, z)
        head = (*cam.point(x + lean - 0.11, shoulders + 0.27, z), *cam.point(x + lean + 0.11, shoulders + 0.02, z))
        cv.ellipse(head, skin, label, z)
        top = (*cam.point(x + lean - 0.13, shoulders + 0.3, z), *cam.point(x + lean + 0.13, shoulders + 0.15, z))
        helmet_or_hair = (240, 240, 235) if rider is not None else jitter(rng, (50, 35, 25), 15)
        cv.ellipse(top, helmet_or_hair, label, z)

    def two_wheeler(self, kind: str, x: float, z: float, ridden: bool) -> None:
        """A bicycle or motorcycle seen from the side, with its rider when ``ridden``."""
        rng, cv, cam = self.rng, self.canvas, self.cam
        label = BICYCLE if kind == "bicycle" else MOTORCYCLE
        r = 0.34 if kind == "bicycle" else 0.32
        base = 0.55 if kind == "bicycle" else 0.75
        colour = jitter(rng, (130, 20, 35), 20) if kind == "bicycle" else jitter(rng, (30, 30, 35), 10)
        for u in (-base, base):
            box = (*cam.point(x + u - r, 2 * r, z), *cam.point(x + u + r, 0, z))
            cv.ellipse(box, (25, 25, 25), label, z)
            inner = r - (0.05 if kind == "bicycle" else 0.1)
            hole = (*cam.point(x + u - inner, r + inner, z), *cam.point(x + u + inner, r - inner, z))
            if kind == "bicycle":  # see-through spokes: the hole keeps the bicycle's label, as in Cityscapes
                cv.ellipse(hole, (120, 120, 120), label, z)
            else:
                cv.ellipse(hole, (160, 160, 165))
        if kind == "bicycle":  # a diamond frame of 5 cm tubes, fork and handlebar
            tube = cam.scale(z) * 0.05
            frame = [(-base, r), (0, r), (0.35, r + 0.45), (-0.2, r + 0.45), (-base, r), (0, r), (-0.2, r + 0.45)]
            cv.line(cam.sprite(x, z, frame), tube, colour, label, z)
            cv.line(cam.sprite(x, z, [(0.35, r + 0.45), (base, r), (0.35, r + 0.45), (0.4, r + 0.7)]), tube, colour,
                    label, z)
        else:
            cv.polygon(cam.sprite(x, z, [(-base, r), (base * 0.6, r), (base, r + 0.5), (0.1, r + 0.55),
                                         (-0.5, r + 0.45)]), colour, label, z)
            cv.polygon(cam.sprite(x, z, [(-0.1, r + 0.2), (0.35, r + 0.2), (0.3, r + 0.45), (-0.05, r + 0.45)]),
                       (170, 170, 175), label, z)  # engine
        if ridden:
            self.person(x - 0.1, z, BICYCLIST if kind == "bicycle" else MOTORCYCLIST, y0=r + 0.45, lean=0.12)
