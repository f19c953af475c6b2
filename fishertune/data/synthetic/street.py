"""A procedural street scene: layout and placement, drawn far to near into a :class:`Canvas`.

The street has a road with lane markings (and sometimes a bike lane, a parking strip, a crosswalk,
tram rails), curbs, sidewalks, optional terrain strips, facades with windows and a cross row of
buildings where it ends, walls, fences, guard rails, trees, poles with traffic lights, signs and
lamps, and vehicles, people and two-wheelers (:mod:`~fishertune.data.synthetic.actors`). Objects are
drawn far to near (painter's algorithm). :func:`texture` then gives each class its own texture, so
that a small model can learn the classes from few images; with the permutation of
:func:`shuffled_looks` it gives each class the colour and texture of another class instead, so that only
shape, position and context tell the classes apart.

``feature`` (0, 1, 2) puts a group of rarer classes into the scene (:data:`FEATURE_CLASSES`):
0 = tram on rails, wall, bicyclist; 1 = bus, fence, motorcyclist; 2 = truck, terrain, parked bicycle
and motorcycle. With :data:`ALWAYS_CLASSES`, three scenes of consecutive features hold all 19.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from fishertune.data.labels import CLASSES
from fishertune.data.synthetic.actors import Actors
from fishertune.data.synthetic.canvas import (BENCH, BIKE_LANE, BILLBOARD, BUILDING, CROSSWALK_PLAIN, CURB, CURB_CUT,
                                              FENCE, GUARD_RAIL, MARKING, PARKING, PEDESTRIAN_AREA, RAIL_TRACK, ROAD,
                                              SIDEWALK, TERRAIN, TRASH_CAN, UTILITY_POLE, WALL, ZEBRA, Camera, Canvas,
                                              jitter, shade)

ALWAYS_CLASSES = frozenset(CLASSES.index(c) for c in (
    "road", "sidewalk", "building", "pole", "traffic light", "traffic sign", "vegetation", "sky", "person", "car"))
FEATURE_CLASSES = tuple(frozenset(CLASSES.index(c) for c in group) for group in (
    ("train", "wall", "rider", "bicycle"), ("bus", "fence", "rider", "motorcycle"),
    ("truck", "terrain", "bicycle", "motorcycle")))
BUILDING_COLOURS = [(190, 170, 140), (150, 80, 60), (130, 130, 135), (210, 200, 175), (120, 90, 70), (110, 120, 140)]


class Street:
    """Samples one street scene from ``rng`` and draws it on a :class:`Canvas`."""

    def __init__(self, cam: Camera, rng: np.random.Generator, feature: int) -> None:
        self.cam, self.rng, self.feature = cam, rng, feature % 3
        self.canvas = Canvas(cam)
        self.actors = Actors(cam, self.canvas, rng)
        self.objects: list[tuple[float, int, Callable[..., None], tuple]] = []  # drawn far to near
        half = rng.uniform(3.5, 7.5)
        offset = rng.uniform(-0.2, 0.9) * half / 2  # the camera drives right of the road's centre
        self.road = (-half - offset, half - offset)
        lanes = 4 if half > 5.5 else 2
        self.lanes = [self.road[0] + (i + 0.5) * 2 * half / lanes for i in range(lanes)]
        self.walk = (rng.uniform(2.5, 5.5), rng.uniform(2.5, 5.5))  # sidewalk widths, left and right
        self.terrain = tuple(rng.uniform(2, 8) if (self.feature == 2 and side == 1) or rng.random() < 0.35 else 0.0
                             for side in (0, 1))
        self.tram = self.feature == 0 or rng.random() < 0.15
        self.end = rng.uniform(70, 180)  # where the street ends in a cross row of buildings

    def in_view(self, x: float, z: float, margin: float = 0.1) -> float:
        """The least depth from ``z`` on at which lateral position ``x`` is inside the image (by
        ``margin`` of its width), to keep the objects a scene must show in view."""
        cam = self.cam
        room = cam.width * (1 - margin) - cam.center if x > 0 else cam.center - cam.width * margin
        return max(z, abs(x) * cam.focal / max(room, 1.0))

    def edges(self, side: int) -> tuple[float, float, float]:
        """Lateral position of the curb, the sidewalk's outer edge and the building line of ``side``."""
        sign = -1 if side == 0 else 1
        curb = self.road[side]
        outer = curb + sign * self.walk[side]
        return curb, outer, outer + sign * self.terrain[side]

    def render(self) -> Canvas:
        """Lay out and draw the whole scene; returns the canvas."""
        self.draw_ground()
        self.draw_facades()
        self.add_street_furniture()
        self.add_traffic()
        self.add_people()
        for _, _, draw, args in sorted(self.objects, key=lambda item: (-item[0], item[1])):
            draw(*args)
        return self.canvas

    # -- ground -------------------------------------------------------------------------------
    def draw_ground(self) -> None:
        """Land, road, sidewalks, curbs, terrain strips, lane markings, crosswalk, bike lane or parking, rails."""
        cam, cv, rng = self.cam, self.canvas, self.rng
        z0, z1 = 0.5, self.end
        road_colour = jitter(rng, (80, 78, 82), 8)
        cv.polygon(cam.ground(-300, 300, z0, 400), jitter(rng, (95, 120, 70)), TERRAIN)  # land beyond the street
        cv.polygon(cam.ground(self.road[0], self.road[1], z0, z1), road_colour, ROAD)
        walk_label = PEDESTRIAN_AREA if rng.random() < 0.2 else SIDEWALK
        walk_colour = jitter(rng, (175, 160, 150), 10)
        for side in (0, 1):
            sign = -1 if side == 0 else 1
            curb, outer, line = self.edges(side)
            if self.terrain[side]:
                cv.polygon(cam.ground(outer, line, z0, z1), jitter(rng, (120, 150, 70), 12), TERRAIN)
            cv.polygon(cam.ground(curb, outer, z0, z1), walk_colour, walk_label if side == 1 else SIDEWALK)
            cv.polygon(cam.ground(curb, curb + sign * 0.3, z0, z1), (195, 195, 190), CURB)
            z = rng.uniform(8, 30)
            cv.polygon(cam.ground(curb, curb + sign * 0.3, z, z + 2), (165, 165, 160), CURB_CUT)
        if rng.random() < 0.4:  # bike lane along the right curb
            cv.polygon(cam.ground(self.road[1] - 1.5, self.road[1], z0, z1), jitter(rng, (150, 75, 65), 8), BIKE_LANE)
        elif rng.random() < 0.4:  # parking strip with bay lines
            cv.polygon(cam.ground(self.road[1] - 2.2, self.road[1], z0, z1), shade(road_colour, 1.15), PARKING)
            for z in np.arange(3, z1, 6.0):
                cv.polygon(cam.ground(self.road[1] - 2.2, self.road[1], z, z + 0.15), (220, 220, 215), MARKING)
        for left, right in zip(self.lanes, self.lanes[1:]):  # dashed lines between lanes
            x = (left + right) / 2
            for z in np.arange(rng.uniform(1, 6), z1, 9.0):
                cv.polygon(cam.ground(x - 0.08, x + 0.08, z, z + 3), (225, 225, 220), MARKING)
        for edge in self.road:  # solid edge lines
            inner = edge + (0.3 if edge == self.road[0] else -0.3)
            cv.polygon(cam.ground(min(edge, inner), max(edge, inner) - 0.15, z0, z1), (215, 215, 210), MARKING)
        if rng.random() < 0.5:
            z = rng.uniform(12, 35)
            if rng.random() < 0.6:
                for x in np.arange(self.road[0] + 0.3, self.road[1] - 0.3, 1.0):
                    cv.polygon(cam.ground(x, x + 0.5, z, z + 3), (230, 230, 225), ZEBRA)
            else:
                cv.polygon(cam.ground(self.road[0], self.road[1], z, z + 3), shade(road_colour, 1.5), CROSSWALK_PLAIN)
        if self.tram:
            centre = self.lanes[0]
            cv.polygon(cam.ground(centre - 1.0, centre + 1.0, z0, z1), shade(road_colour, 0.85), RAIL_TRACK)
            for x in (centre - 0.75, centre + 0.7):
                cv.polygon(cam.ground(x, x + 0.07, z0, z1), (170, 170, 175), RAIL_TRACK)

    # -- facades ------------------------------------------------------------------------------
    def draw_facades(self) -> None:
        """Facades along both sides (with gaps of trees), the cross row at the end, walls, fences, rails."""
        cam, rng = self.cam, self.rng
        x = -60.0
        while x < 60:  # the cross row of buildings that ends the street
            w, h = rng.uniform(8, 25), rng.uniform(5, 18)
            colour = jitter(rng, BUILDING_COLOURS[rng.integers(len(BUILDING_COLOURS))])
            self.canvas.polygon(cam.sprite(x, self.end, [(0, 0), (w, 0), (w, h), (0, h)]), colour, BUILDING, self.end)
            x += w
        for side in (0, 1):
            line = self.edges(side)[2]
            z = 0.5
            while z < self.end:
                length = rng.uniform(6, 22)
                if rng.random() < 0.15:  # a gap with trees
                    self.actors.tree(line + (-1 if side == 0 else 1) * 2, z + length / 2, big=True)
                else:
                    self.facade(line, z, min(z + length, self.end), rng.uniform(6, 18))
                z += length
            curb, outer, _ = self.edges(side)
            for want, label in ((self.feature == 0 and side == 1, WALL), (self.feature == 1 and side == 0, FENCE)):
                if want or rng.random() < 0.2:
                    z0 = self.in_view(outer, rng.uniform(3, 12))
                    self.barrier(outer, z0, z0 + rng.uniform(15, 40), label)
            if rng.random() < 0.1:
                z0 = rng.uniform(3, 15)
                self.barrier(curb + (-0.35 if side == 0 else 0.35), z0, z0 + 20, GUARD_RAIL)

    def facade(self, x: float, z0: float, z1: float, height: float) -> None:
        """One building front at lateral ``x`` from depth ``z0`` to ``z1``, with windows (some lit)."""
        cam, cv, rng = self.cam, self.canvas, self.rng
        colour = jitter(rng, BUILDING_COLOURS[rng.integers(len(BUILDING_COLOURS))])
        cv.polygon(cam.side(x, z0, z1, 0, height), colour, BUILDING)
        for z in np.arange(z0, z1, 3.0):
            cv.polygon(cam.side(x, z, min(z + 3.0, z1), 0, height), colour, depth=z + 1.5)
        if cam.scale(z0) * 1.2 < 1.5:
            return
        glass = jitter(rng, (45, 55, 70), 8)
        for floor in np.arange(0.9, height - 1.5, 3.2):
            for z in np.arange(z0 + 0.7, z1 - 1.4, 2.6):
                pts = cam.side(x, z, z + 1.3, floor, floor + 1.5)
                cv.polygon(pts, glass)
                if rng.random() < 0.3:
                    cv.glow_polygon(pts, (255, 210, 140))
        if rng.random() < 0.15:  # a billboard on the facade (ignored by the benchmark)
            z = rng.uniform(z0, z1)
            cv.polygon(cam.side(x + (-0.1 if x > 0 else 0.1), z, z + 4, 3, 5.5),
                       jitter(rng, (220, 210, 60), 40), BILLBOARD, z + 2)

    def barrier(self, x: float, z0: float, z1: float, label: int) -> None:
        """A wall, fence or guard rail along the street at lateral ``x``."""
        cam, cv, rng = self.cam, self.canvas, self.rng
        height = {WALL: rng.uniform(1.5, 3.0), FENCE: rng.uniform(1.2, 2.2), GUARD_RAIL: 0.8}[label]
        colour = {WALL: jitter(rng, (160, 150, 120)), FENCE: jitter(rng, (140, 110, 80)),
                  GUARD_RAIL: (175, 175, 180)}[label]
        cv.polygon(cam.side(x, z0, z1, 0, height), colour, label)
        for z in np.arange(z0, z1, 2.0):
            cv.polygon(cam.side(x, z, min(z + 2, z1), 0, height), colour, depth=z + 1)
        if label == FENCE:  # posts
            for z in np.arange(z0, z1, 2.0):
                cv.polygon(cam.side(x, z, z + 0.12, 0, height), shade(colour, 0.6))
        elif label == WALL:  # courses of bricks or blocks
            for y in np.arange(0.3, height, 0.3):
                cv.line([cam.point(x, y, z0), cam.point(x, y, z1)], 1, shade(colour, 0.75))

    # -- objects: trees, poles, signs, lights, traffic, people ----------------------------------
    def add(self, z: float, draw: Callable[..., None], *args) -> None:
        """Schedule ``draw(*args)`` for an object at depth ``z`` (drawn after everything farther)."""
        self.objects.append((z, len(self.objects), draw, args))

    def add_street_furniture(self) -> None:
        """Trees, street lights, utility poles, benches and bins, traffic lights and signs."""
        rng = self.rng
        for side in (0, 1):
            sign = -1 if side == 0 else 1
            curb, outer, line = self.edges(side)
            for z in np.arange(rng.uniform(4, 12), self.end * 0.6, rng.uniform(9, 16)):
                if rng.random() < 0.6:
                    x = outer - sign * 0.6 if not self.terrain[side] else (outer + line) / 2
                    self.add(z, self.actors.tree, x, z)
            for z in np.arange(rng.uniform(6, 20), self.end * 0.6, rng.uniform(20, 35)):
                self.add(z, self.actors.street_light, curb + sign * 0.5, z, -sign * 1.5)
            if rng.random() < 0.3:
                for z in np.arange(rng.uniform(5, 15), self.end * 0.5, 25):
                    self.add(z, self.actors.pole, curb + sign * 0.8, z, 9, UTILITY_POLE, (100, 80, 60), 0.3)
            if rng.random() < 0.3:
                z = rng.uniform(5, 20)
                label, colour, size = (BENCH, (110, 80, 50), (1.5, 0.5)) if rng.random() < 0.5 else \
                    (TRASH_CAN, (60, 90, 60), (0.5, 0.9))
                self.add(z, self.actors.block, (curb + outer) / 2, z, label, colour, size)
        right = self.road[1] + 0.5
        z = self.in_view(right, rng.uniform(12, 25))
        self.add(z, self.actors.traffic_light, right, z, -rng.uniform(2, 4))
        if rng.random() < 0.5:
            z = rng.uniform(12, 30)
            self.add(z, self.actors.traffic_light, self.road[0] - 0.5, z, rng.uniform(1, 3))
        z = self.in_view(right + 0.6, rng.uniform(6, 16))
        self.add(z, self.actors.sign, right + 0.2, z, True)
        for _ in range(int(rng.integers(0, 3))):  # more signs; on the left some show their backs
            side, z = int(rng.integers(2)), rng.uniform(8, 40)
            facing = bool(side) or rng.random() < 0.3
            self.add(z, self.actors.sign, self.road[side] + (0.5 if side else -0.5), z, facing)

    def add_traffic(self) -> None:
        """A tram on its rails, vehicles in the lanes, cars parked along the curbs."""
        rng = self.rng
        forced = {1: "bus", 2: "truck"}.get(self.feature)
        lanes = list(self.lanes)
        if self.tram:
            z = self.in_view(self.lanes[0], rng.uniform(14, 24))
            self.add(z, self.actors.vehicle, "tram", self.lanes[0], z)
            lanes = lanes[1:] or lanes
        for i, x in enumerate(lanes):
            z = self.in_view(x, rng.uniform(9, 16)) if i == len(lanes) - 1 and forced else rng.uniform(7, 25)
            while z < self.end * 0.8:
                kind = forced if forced and z < 17 and i == len(lanes) - 1 else \
                    str(rng.choice(["car", "car", "car", "car", "truck", "bus"]))
                length = {"car": 4.3, "truck": 8.5, "bus": 11.5}[kind]
                if rng.random() < 0.75:
                    self.add(z, self.actors.vehicle, kind, x + rng.normal(0, 0.2), z)
                z += length + rng.uniform(3, 25)
        for side in (0, 1):  # parked cars along the curb
            if rng.random() < 0.6:
                x = self.road[side] + (1.2 if side == 0 else -1.2)
                for z in np.arange(rng.uniform(4, 10), self.end * 0.5, rng.uniform(5.5, 8)):
                    if rng.random() < 0.6:
                        self.add(z, self.actors.vehicle, "car", x, z)

    def add_people(self) -> None:
        """Pedestrians on the sidewalks, riders beside the parked cars, parked two-wheelers."""
        rng = self.rng
        for side in (0, 1):
            curb, outer, _ = self.edges(side)
            for _ in range(int(rng.integers(1, 4))):
                x, z = rng.uniform(min(curb, outer) + 0.4, max(curb, outer) - 0.4), rng.uniform(4, 35)
                self.add(z, self.actors.person, x, z)
        x = rng.uniform(min(self.edges(1)[:2]) + 0.4, max(self.edges(1)[:2]) - 0.4)
        z = self.in_view(x, rng.uniform(5, 12))
        self.add(z, self.actors.person, x, z)
        rider_x = self.road[1] - 2.7  # beside the cars parked along the curb
        riders = {0: ["bicycle"], 1: ["motorcycle"]}.get(self.feature, [])
        if rng.random() < 0.3:
            riders.append(str(rng.choice(["bicycle", "motorcycle"])))
        for k, kind in enumerate(riders):
            z = self.in_view(rider_x + 0.9, rng.uniform(6, 12)) + 10 * k
            self.add(z, self.actors.two_wheeler, kind, rider_x, z, True)
        if self.feature == 2 or rng.random() < 0.2:  # parked by the right curb
            curb, outer, _ = self.edges(1)
            near = self.in_view(curb + 1.5, rng.uniform(5, 9))
            for kind, z in (("bicycle", near), ("motorcycle", near + rng.uniform(3, 6))):
                self.add(z, self.actors.two_wheeler, kind, curb + 0.8, z, False)


#: classes whose look :func:`shuffled_looks` never moves: the sky is painted by the domain's style afterwards
FIXED_LOOK_CLASSES = frozenset({CLASSES.index("sky")})


def shuffled_looks(train: np.ndarray, rng: np.random.Generator) -> dict[int, int]:
    """A random permutation of the classes present in ``train`` (train ids, sky and ignore left out):
    class -> the class whose look (mean colour and texture) it takes in :func:`texture`.

    The diagnostic miniature of ``data.synth_looks: shuffled``: across images a class's colour and
    texture say nothing about it, as in the real world a car's colour says little; what stays is its
    shape, its size at its depth, where it stands and what stands around it. The permutation includes
    fixed points (a class keeps its own look with probability 1/n for n classes present)."""
    present = [int(c) for c in np.unique(train) if c < len(CLASSES) and int(c) not in FIXED_LOOK_CLASSES]
    return dict(zip(present, (int(d) for d in rng.permutation(present))))


def texture(canvas: Canvas, train: np.ndarray, rng: np.random.Generator,
            looks: dict[int, int] | None = None) -> np.ndarray:
    """The canvas colour with per-class texture (asphalt grain, paving, leaves, ...), uint8.

    ``looks`` (from :func:`shuffled_looks`) gives class ``c`` the look of class ``looks[c]``: its pixels
    are shifted by the difference of the two classes' mean colours in this image (details and shading
    kept) and take that class's texture. The random draws are the same with and without ``looks``, so
    the scene and its labels do not change."""
    rgb = np.asarray(canvas.rgb, dtype=np.float32)
    if looks:
        means = {c: rgb[train == c].mean(axis=0) for c in set(looks) | set(looks.values())}
        shifted = rgb.copy()
        for c, d in looks.items():
            if c != d:
                mask = train == c
                shifted[mask] += means[d] - means[c]
        rgb = np.clip(shifted, 0, 255)
    h, w = train.shape
    grain = rng.standard_normal((h, w)).astype(np.float32)
    small = rng.standard_normal((max(h // 6, 2), max(w // 6, 2))).astype(np.float32)
    blotch = np.asarray(Image.fromarray(small, "F").resize((w, h), Image.BICUBIC))
    yy, xx = np.mgrid[0:h, 0:w]
    patterns = {
        "grain": grain,
        "blotch": blotch,
        "tiles": ((yy % 5 == 0) | (xx % 7 == 0)).astype(np.float32) * -1.5 + grain * 0.5,
        "leaves": blotch * 0.8 + grain * 0.8,
        "lattice": (((xx + yy) % 4 == 0) | ((xx - yy) % 4 == 0)).astype(np.float32) * -2.0,
        "smooth": blotch * 0.3,
    }
    # train id -> (pattern, strength as a fraction of brightness)
    recipe = {0: ("grain", 0.06), 1: ("tiles", 0.08), 2: ("grain", 0.04), 3: ("grain", 0.06), 4: ("lattice", 0.12),
              5: ("grain", 0.03), 8: ("leaves", 0.18), 9: ("leaves", 0.12), 10: ("smooth", 0.05), 11: ("grain", 0.04),
              12: ("grain", 0.04), 13: ("smooth", 0.06), 14: ("grain", 0.03), 15: ("smooth", 0.04),
              16: ("smooth", 0.03)}
    factor = np.ones((h, w), dtype=np.float32)
    for cls in sorted(set(recipe) | set(looks or {})):
        donor = (looks or {}).get(cls, cls)
        if donor not in recipe:
            continue
        name, strength = recipe[donor]
        mask = train == cls
        if mask.any():
            factor[mask] += strength * patterns[name][mask]
    return np.clip(rgb * factor[..., None] + 0.5, 0, 255).astype(np.uint8)
