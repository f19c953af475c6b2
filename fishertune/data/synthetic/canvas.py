"""Drawing surface of the scene generator: a pinhole camera and four aligned layers.

World coordinates are metres: x to the right, y up from the road, z forward from the camera, which
stands ``Camera.height_m`` above the road. Labels are Mapillary Vistas v1.2 ids (the finest label set
of the five data sets; every data set's labels derive from them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from fishertune.data.labels import MAPILLARY_V12_NAMES

FAR = 1000.0  # depth of the sky, metres
Colour = tuple[int, int, int]


def _id(name: str) -> int:
    return MAPILLARY_V12_NAMES.index(name)


# The Mapillary ids the generator draws.
SKY, ROAD, SIDEWALK, CURB, CURB_CUT = (_id("nature--sky"), _id("construction--flat--road"),
                                       _id("construction--flat--sidewalk"), _id("construction--barrier--curb"),
                                       _id("construction--flat--curb-cut"))
PEDESTRIAN_AREA, BIKE_LANE, PARKING = (_id("construction--flat--pedestrian-area"), _id("construction--flat--bike-lane"),
                                       _id("construction--flat--parking"))
CROSSWALK_PLAIN, MARKING, ZEBRA, RAIL_TRACK = (_id("construction--flat--crosswalk-plain"), _id("marking--general"),
                                               _id("marking--crosswalk-zebra"), _id("construction--flat--rail-track"))
BUILDING, WALL, FENCE, GUARD_RAIL = (_id("construction--structure--building"), _id("construction--barrier--wall"),
                                     _id("construction--barrier--fence"), _id("construction--barrier--guard-rail"))
VEGETATION, TERRAIN, PERSON = _id("nature--vegetation"), _id("nature--terrain"), _id("human--person")
BICYCLIST, MOTORCYCLIST = _id("human--rider--bicyclist"), _id("human--rider--motorcyclist")
POLE, UTILITY_POLE, STREET_LIGHT = (_id("object--support--pole"), _id("object--support--utility-pole"),
                                    _id("object--street-light"))
SIGN_FRAME, SIGN_FRONT, SIGN_BACK = (_id("object--support--traffic-sign-frame"), _id("object--traffic-sign--front"),
                                     _id("object--traffic-sign--back"))
TRAFFIC_LIGHT, BILLBOARD, BENCH, TRASH_CAN = (_id("object--traffic-light"), _id("object--billboard"),
                                              _id("object--bench"), _id("object--trash-can"))
CAR, TRUCK, BUS, ON_RAILS = (_id("object--vehicle--car"), _id("object--vehicle--truck"),
                             _id("object--vehicle--bus"), _id("object--vehicle--on-rails"))
MOTORCYCLE, BICYCLE = _id("object--vehicle--motorcycle"), _id("object--vehicle--bicycle")
EGO_VEHICLE, CAR_MOUNT, UNLABELED = _id("void--ego-vehicle"), _id("void--car-mount"), _id("void--unlabeled")


@dataclass
class Camera:
    """Pinhole camera: ``horizon`` row and ``center`` column of the vanishing point, ``focal`` in px."""

    width: int
    height: int
    horizon: float
    center: float
    focal: float
    height_m: float

    def point(self, x: float, y: float, z: float) -> tuple[float, float]:
        """Image position of the world point ``(x, y, z)``."""
        return self.center + self.focal * x / z, self.horizon + self.focal * (self.height_m - y) / z

    def points(self, xyz: list[tuple[float, float, float]]) -> list[tuple[float, float]]:
        return [self.point(*p) for p in xyz]

    def ground(self, x0: float, x1: float, z0: float, z1: float) -> list[tuple[float, float]]:
        """A ground rectangle ``[x0, x1] x [z0, z1]``."""
        return self.points([(x0, 0, z0), (x1, 0, z0), (x1, 0, z1), (x0, 0, z1)])

    def side(self, x: float, z0: float, z1: float, y0: float, y1: float) -> list[tuple[float, float]]:
        """A vertical plane at lateral ``x`` along the street (a facade, a wall, a vehicle's side)."""
        return self.points([(x, y0, z0), (x, y1, z0), (x, y1, z1), (x, y0, z1)])

    def sprite(self, x: float, z: float, uv: list[tuple[float, float]]) -> list[tuple[float, float]]:
        """Points ``(u, v)`` (metres right of ``x``, metres above the road) on the plane at depth ``z``."""
        return self.points([(x + u, v, z) for u, v in uv])

    def scale(self, z: float) -> float:
        """Pixels per metre at depth ``z``."""
        return self.focal / z


class Canvas:
    """Four aligned layers: Mapillary ids, RGB colour, depth (metres) and emitted light (RGB)."""

    def __init__(self, cam: Camera) -> None:
        size = (cam.width, cam.height)
        rows = np.arange(cam.height, dtype=np.float32)[:, None] + 0.5 - cam.horizon
        ground = np.where(rows > 0, cam.focal * cam.height_m / np.maximum(rows, 1e-3), FAR)
        self.ids = Image.new("L", size, SKY)
        self.rgb = Image.new("RGB", size, (135, 170, 210))
        depth = np.broadcast_to(np.minimum(ground, FAR), (cam.height, cam.width)).astype(np.float32)
        self.depth = Image.fromarray(depth, "F")
        self.light = Image.new("RGB", size, (0, 0, 0))
        self._ids, self._rgb = ImageDraw.Draw(self.ids), ImageDraw.Draw(self.rgb)
        self._depth, self._light = ImageDraw.Draw(self.depth), ImageDraw.Draw(self.light)

    def polygon(self, pts, colour: Colour, label: int | None = None, depth: float | None = None) -> None:
        """Fill a polygon with ``colour``; also with ``label`` and ``depth`` where given (else a detail)."""
        self._rgb.polygon(pts, fill=colour)
        if label is not None:
            self._ids.polygon(pts, fill=label)
        if depth is not None:
            self._depth.polygon(pts, fill=depth)

    def ellipse(self, box, colour: Colour, label: int | None = None, depth: float | None = None) -> None:
        """Fill the ellipse in the bounding ``box``, like :meth:`polygon`."""
        box = _box(box)
        self._rgb.ellipse(box, fill=colour)
        if label is not None:
            self._ids.ellipse(box, fill=label)
        if depth is not None:
            self._depth.ellipse(box, fill=depth)

    def line(self, pts, width: float, colour: Colour, label: int | None = None, depth: float | None = None) -> None:
        """A polyline ``width`` pixels wide (at least one), like :meth:`polygon`."""
        w = max(int(round(width)), 1)
        self._rgb.line(pts, fill=colour, width=w)
        if label is not None:
            self._ids.line(pts, fill=label, width=w)
        if depth is not None:
            self._depth.line(pts, fill=depth, width=w)

    def glow(self, box, colour: Colour) -> None:
        """A light source (lamp, lit window, vehicle light) in the emission layer."""
        self._light.ellipse(_box(box), fill=colour)

    def glow_polygon(self, pts, colour: Colour) -> None:
        """A polygonal light source (a lit window, a lamp)."""
        self._light.polygon(pts, fill=colour)


def _box(box):
    """``(x0, y0, x1, y1)`` with the corners ordered, as ImageDraw's ellipse needs."""
    x0, y0, x1, y1 = box
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def jitter(rng: np.random.Generator, colour: Colour, amount: float = 15) -> Colour:
    """``colour`` with Gaussian noise of standard deviation ``amount`` per channel."""
    r, g, b = np.clip(np.asarray(colour) + rng.normal(0, amount, 3), 0, 255).astype(int)
    return int(r), int(g), int(b)


def shade(colour: Colour, factor: float) -> Colour:
    """``colour`` darkened (``factor < 1``) or lightened."""
    r, g, b = np.clip(np.asarray(colour) * factor, 0, 255).astype(int)
    return int(r), int(g), int(b)
