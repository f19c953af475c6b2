"""The pretraining world: street scenes under styles far beyond the benchmark's five domains.

The tiny foundation models learn from the same procedural street generator as the benchmark's
miniature (:mod:`fishertune.data.synthetic`), so that what they learn transfers to it the way a real
foundation model's web-scale pretraining transfers to street scenes. But the world is deliberately
broader than the benchmark, so that no benchmark domain is the pretraining domain:

* **cameras** from a wider range than any benchmark domain: horizon 20-75% of the height, focal
  length 0.5-1.6 x the long side, mounted 0.8-4 m above the road, yaw and roll up to 15 degrees;
* **sizes and aspect ratios** drawn per scene (wide, square and portrait frames);
* **palettes**: a random colour-mixing matrix, hue rotation, channel gains, saturation 0.1-1.9 and
  gamma 0.5-1.8 (pink roads and green skies happen), on top of a random sky gradient;
* **lighting**: daylight to night (scaled down, lights glowing), a directional gradient across the
  frame, vignetting;
* **weather**: clear, fog of random colour and visibility, rain streaks, snow cover and flakes;
* **sensor**: Gaussian noise, blur and JPEG compression of random strength;
* optionally (``WorldConfig.shuffled_looks``, off for the shipped models) a share of scenes whose classes
  take one another's colour and texture, as the benchmark's diagnostic ``data.synth_looks: shuffled``.

The benchmark's own looks (``fishertune.data.synthetic.styles``: GTAV, Cityscapes, BDD100K,
Mapillary, ACDC's conditions) are never applied as such; the world reuses their building blocks
(sky gradients, glow, streaks, flakes) with random parameters.

Seeds: scene ``i`` of world seed ``s`` draws from ``numpy.random.default_rng([WORLD_TAG, s, i])``.
The benchmark's images draw from ``[seed, crc32(data set), crc32(split), crc32(group),
crc32(purpose), index]`` (:func:`fishertune.data.synth.item_rng`), a seed sequence of another
length and another leading word, so no pretraining scene is a benchmark image.

What a scene gives a recipe (:class:`Scene`): the image, a map of *segments* (connected regions of
one Mapillary-level id, numbered arbitrarily: class-agnostic masks, as SAM's data engine gives) and a
*caption* generated from the scene's contents (the fine Mapillary names of what is visible, counted)
and its style. No recipe sees the benchmark's 19-class labels: the Mapillary ids stay inside this
module and only become segment numbers and words.

The pool (:class:`WorldPool`): generating a scene costs ~25 ms of CPU, as much as a training step of
a tiny model on a whole batch, so the recipes draw from a pool of ``size`` scenes generated once
(``$FISHERTUNE_CACHE/pretrain-world/``, deterministic for its seed) and re-crop and re-augment them
each time. This is the simplification against "scenes drawn on the fly": a fixed pool of a few
thousand scenes, each seen many times under different crops.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field

from fishertune.data.labels import MAPILLARY_V12_NAMES
from fishertune.data.synthetic import canvas, street
from fishertune.data.synthetic.styles import Layers, flakes, glow, noise, sky, streaks, vignette
from fishertune.progress import bar

#: bump when the world draws other scenes for the same seed (the pool's cache key and every recipe hash)
VERSION = 1
#: the first word of every pretraining scene's seed sequence (never a benchmark seed's shape)
WORLD_TAG = zlib.crc32(b"fishertune pretraining world")
LOOKS_TAG = zlib.crc32(b"shuffled looks")  # the fourth word of a scene's looks generator
#: frame sizes (width, height) drawn per scene: wide, square and portrait
SIZES = ((160, 96), (144, 112), (128, 128), (176, 88), (112, 144), (192, 108))


class WorldConfig(BaseModel):
    """The pool of scenes a recipe draws from."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    seed: int = Field(0, description="world seed (scenes are disjoint from the benchmark's for any seed)")
    size: int = Field(6000, gt=0, description="scenes in the pool")
    shuffled_looks: float = Field(0.0, ge=0, le=1, description="share of scenes whose classes take one another's "
                                  "colour and texture (fishertune.data.synthetic.street.shuffled_looks), so that "
                                  "colour and texture say less about what a thing is")

    def identity(self) -> dict:
        """The settings that decide the scenes; a field added later is left out at its default, so that the
        recipe hashes of the weights made before it are unchanged."""
        out = self.model_dump(mode="json")
        if not self.shuffled_looks:
            out.pop("shuffled_looks")
        return out


@dataclass
class Scene:
    """One pretraining scene: ``image`` H x W x 3 uint8, ``segments`` H x W int32 (0 = none, 1..n =
    connected regions of one id) and ``caption``."""

    image: np.ndarray
    segments: np.ndarray
    caption: str


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([WORLD_TAG, seed, index])


# -- cameras and scenes --------------------------------------------------------------------------------


def draw_layers(rng: np.random.Generator, looks_rng: np.random.Generator | None = None) -> tuple[Layers, str]:
    """A scene from a random camera and frame, before any style, and the word for its viewpoint; with
    ``looks_rng``, its classes' looks shuffled (:func:`street.shuffled_looks` draws from it, so the scene
    stays the one of ``rng``)."""
    w, h = SIZES[rng.integers(len(SIZES))]
    roll = rng.uniform(-15, 15) if rng.random() < 0.5 else 0.0
    rad = math.radians(abs(roll))
    cw = int(math.ceil(w * math.cos(rad) + h * math.sin(rad))) + 2 if roll else w
    ch = int(math.ceil(w * math.sin(rad) + h * math.cos(rad))) + 2 if roll else h
    cam = canvas.Camera(cw, ch, horizon=rng.uniform(0.2, 0.75) * h + (ch - h) / 2,
                        center=cw / 2 + rng.normal(0, 0.15) * w, focal=rng.uniform(0.5, 1.6) * max(w, h),
                        height_m=rng.uniform(0.8, 4.0))
    drawn = street.Street(cam, rng, feature=int(rng.integers(3))).render()
    ids = np.asarray(drawn.ids)
    from fishertune.data.synth import MAPILLARY_TO_TRAIN  # the generator's own texture keys

    looks = street.shuffled_looks(MAPILLARY_TO_TRAIN[ids], looks_rng) if looks_rng is not None else None
    layers = [Image.fromarray(street.texture(drawn, MAPILLARY_TO_TRAIN[ids], rng, looks)), drawn.ids, drawn.depth,
              drawn.light]
    if roll:
        box = ((cw - w) // 2, (ch - h) // 2, (cw - w) // 2 + w, (ch - h) // 2 + h)
        resample = (Image.BILINEAR, Image.NEAREST, Image.NEAREST, Image.BILINEAR)
        layers = [layer.rotate(roll, resample=r).crop(box) for layer, r in zip(layers, resample)]
    rgb, ids, depth, light = (np.array(layer, dtype=np.uint8 if k == 1 else np.float32)
                              for k, layer in enumerate(layers))
    view = "high" if cam.height_m > 2.6 else ("low" if cam.height_m < 1.2 else "eye-level")
    return Layers(rgb=rgb, train=MAPILLARY_TO_TRAIN[ids], depth=depth, light=light, ids=ids), view


# -- random styles -------------------------------------------------------------------------------------

LIGHTING = ("bright", "sunny", "overcast", "dusk", "night")
WEATHER = ("clear", "foggy", "rainy", "snowy")


def random_style(layers: Layers, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, str]]:
    """The styled image (uint8) and the words describing its style."""
    words = {}
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    sky(layers, tuple(top), tuple(bottom), rng, clouds=rng.uniform(0, 0.7))
    rgb = layers.rgb.astype(np.float32)
    # palette: mix channels, rotate hue, scale each channel
    mix = np.eye(3, dtype=np.float32) + rng.normal(0, 0.25, (3, 3)).astype(np.float32)
    if rng.random() < 0.3:
        mix = mix[rng.permutation(3)]
    rgb = rgb @ mix.T
    rgb = rgb * rng.uniform(0.6, 1.4, 3).astype(np.float32)
    grey = rgb.mean(axis=2, keepdims=True)
    saturation = rng.uniform(0.1, 1.9)
    rgb = grey + (rgb - grey) * saturation
    words["palette"] = "grey" if saturation < 0.4 else ("vivid" if saturation > 1.4 else "plain")
    rgb = np.clip(rgb, 0, 255)
    rgb = 255.0 * (rgb / 255.0) ** rng.uniform(0.5, 1.8)
    lighting = LIGHTING[rng.integers(len(LIGHTING))]
    words["lighting"] = lighting
    if lighting == "bright":
        rgb = rgb * 1.15 + 15
    elif lighting == "overcast":
        rgb = 110 + (rgb - 110) * 0.75
    elif lighting == "dusk":
        rgb = rgb * 0.6 * rng.uniform(0.8, 1.2, 3).astype(np.float32) + glow(layers, 2.0, 0.8) * 0.5
    elif lighting == "night":
        rgb = rgb * rng.uniform(0.08, 0.25) + glow(layers, max(rgb.shape[1] * 0.02, 1.5), 2.0)
    h, w = rgb.shape[:2]
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((xx / w - 0.5) * math.cos(angle) + (yy / h - 0.5) * math.sin(angle))[..., None]
    rgb = rgb * (1 + rng.uniform(0, 0.6) * ramp)
    weather = WEATHER[rng.choice(4, p=(0.55, 0.15, 0.15, 0.15))]
    words["weather"] = weather
    if weather == "foggy":
        air = rng.uniform(60, 230, 3).astype(np.float32)
        t = np.exp(-layers.depth / rng.uniform(10, 60))[..., None]
        rgb = rgb * t + air * (1 - t)
    elif weather == "rainy":
        rgb = streaks(rgb, rng, int(h * w / rng.uniform(60, 200)), tuple(rng.uniform(150, 230, 3)), 0.45)
    elif weather == "snowy":
        cover = np.isin(layers.train, (0, 1, 8, 9))[..., None]
        amount = rng.uniform(0.2, 0.8)
        rgb = rgb * (1 - cover * amount) + cover * amount * 235.0
        rgb = flakes(rgb, rng, int(h * w / rng.uniform(60, 200)))
    if rng.random() < 0.4:
        rgb = vignette(rgb, rng.uniform(0.1, 0.7))
    rgb = noise(rgb, rng.uniform(0, 10), rng)
    image = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8))
    if rng.random() < 0.4:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    if rng.random() < 0.4:
        import io

        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=int(rng.integers(15, 95)))
        image = Image.open(buffer).convert("RGB")
    return np.asarray(image, dtype=np.uint8), words


# -- segments and captions -----------------------------------------------------------------------------

#: Mapillary ids that are not things to name or segment (void labels)
_VOID = {canvas.EGO_VEHICLE, canvas.CAR_MOUNT, canvas.UNLABELED}
#: countable things: Mapillary id -> word
COUNTABLE = {canvas.CAR: "car", canvas.TRUCK: "truck", canvas.BUS: "bus", canvas.ON_RAILS: "tram",
             canvas.PERSON: "person", canvas.BICYCLIST: "cyclist", canvas.MOTORCYCLIST: "motorcyclist",
             canvas.BICYCLE: "bicycle", canvas.MOTORCYCLE: "motorcycle", canvas.TRAFFIC_LIGHT: "traffic light",
             canvas.SIGN_FRONT: "sign", canvas.STREET_LIGHT: "street lamp", canvas.BENCH: "bench",
             canvas.TRASH_CAN: "bin", canvas.BILLBOARD: "billboard", canvas.UTILITY_POLE: "utility pole"}
#: stuff worth a word when it covers a share of the frame
STUFF = {canvas.WALL: "wall", canvas.FENCE: "fence", canvas.TERRAIN: "grass", canvas.VEGETATION: "trees",
         canvas.RAIL_TRACK: "rails", canvas.ZEBRA: "crosswalk", canvas.GUARD_RAIL: "guard rail",
         canvas.BIKE_LANE: "bike lane"}
NUMBERS = ("no", "one", "two", "three", "four", "many")


def plural(word: str) -> str:
    return word + ("es" if word.endswith("s") else "s")


def vocabulary() -> list[str]:
    """Every word a caption can hold (the text tower's vocabulary), in a fixed order."""
    words = ["street", "seen", "from", "with", "and", "a", *LIGHTING, *WEATHER, "grey", "vivid", "plain", "high",
             "low", "eye-level", *NUMBERS]
    for word in [*COUNTABLE.values(), *STUFF.values()]:
        words += word.split() + plural(word).split()
    return list(dict.fromkeys(words))


def segments_of(ids: np.ndarray, min_pixels: int = 8) -> np.ndarray:
    """Connected regions of equal id (4-connected), void ids and regions under ``min_pixels`` left 0."""
    from scipy import ndimage

    out = np.zeros(ids.shape, dtype=np.int32)
    n = 0
    for value in np.unique(ids):
        if int(value) in _VOID:
            continue
        labelled, count = ndimage.label(ids == value)
        if not count:
            continue
        sizes = np.bincount(labelled.ravel(), minlength=count + 1)
        keep = np.flatnonzero(sizes >= min_pixels)
        keep = keep[keep > 0]
        remap = np.zeros(count + 1, dtype=np.int32)
        remap[keep] = np.arange(n + 1, n + 1 + len(keep))
        out = np.where(labelled > 0, remap[labelled], out)
        n += len(keep)
    return out


def caption_of(ids: np.ndarray, words: dict[str, str], rng: np.random.Generator) -> str:
    """``"<lighting> <weather> <palette> street seen from <view> with two cars, a bus and trees"``: the
    style's words, then what is visible (things counted by connected regions, stuff covering more than
    2% of the frame) in random order, at most six."""
    total = ids.size
    parts = []
    from scipy import ndimage

    for value, word in COUNTABLE.items():
        mask = ids == value
        if mask.sum() < 6:
            continue
        count = ndimage.label(ndimage.binary_dilation(mask, iterations=2))[1]  # a wheel and its frame: one thing
        number = NUMBERS[min(count, len(NUMBERS) - 1)]
        parts.append(f"{number} {plural(word)}" if count > 1 else f"a {word}")
    for value, word in STUFF.items():
        if (ids == value).sum() > 0.02 * total:
            parts.append(word)
    parts = [parts[i] for i in rng.permutation(len(parts))][:6]
    head = f"{words['lighting']} {words['weather']} {words['palette']} street seen from {words['view']}"
    if not parts:
        return head
    return f"{head} with " + (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])


def draw_scene(seed: int, index: int, shuffled_looks: float = 0.0) -> Scene:
    """Scene ``index`` of the world of ``seed`` (deterministic); with probability ``shuffled_looks`` its
    classes' looks shuffled (decided by a generator of its own, so the scenes are the same for any share)."""
    rng = scene_rng(seed, index)
    looks_rng = None
    if shuffled_looks:
        looks_rng = np.random.default_rng([WORLD_TAG, seed, index, LOOKS_TAG])
        looks_rng = looks_rng if looks_rng.random() < shuffled_looks else None
    layers, view = draw_layers(rng, looks_rng)
    image, words = random_style(layers, rng)
    words["view"] = view
    return Scene(image=image, segments=segments_of(layers.ids), caption=caption_of(layers.ids, words, rng))


# -- the pool ------------------------------------------------------------------------------------------


def _draw_many(args: tuple[int, int, int, float]) -> list[Scene]:
    seed, start, stop, shuffled_looks = args
    return [draw_scene(seed, i, shuffled_looks) for i in range(start, stop)]


class WorldPool:
    """``size`` scenes of the world of ``seed``, generated once into the cache and kept in memory.

    The cache folder is keyed by the world's version, seed and size and written atomically (a
    temporary file renamed into place), so two processes can build it at once without one reading
    the other's half. Generation runs in ``workers`` processes (each scene has its own generator, so
    the pool is the same for any number of workers)."""

    def __init__(self, cfg: WorldConfig, cache: Path, progress: bool = True, workers: int | None = None):
        self.cfg = cfg
        looks = f"-looks{cfg.shuffled_looks:g}" if cfg.shuffled_looks else ""
        self.path = Path(cache) / "pretrain-world" / f"v{VERSION}-seed{cfg.seed}-n{cfg.size}{looks}.npz"
        if not self.path.is_file():
            self._generate(progress, workers or min(os.cpu_count() or 1, 4))
        with np.load(self.path, allow_pickle=False) as data:
            self.offsets = data["offsets"]
            self.shapes = data["shapes"]
            self.pixels = data["pixels"]
            self.segment_pixels = data["segments"]
            self.captions = [str(c) for c in data["captions"]]

    def __len__(self) -> int:
        return len(self.shapes)

    def image(self, i: int) -> np.ndarray:
        h, w = self.shapes[i]
        a = self.offsets[i]
        return self.pixels[a * 3 : (a + h * w) * 3].reshape(h, w, 3)

    def segments(self, i: int) -> np.ndarray:
        h, w = self.shapes[i]
        a = self.offsets[i]
        return self.segment_pixels[a : a + h * w].reshape(h, w)

    def _generate(self, progress: bool, workers: int) -> None:
        from concurrent.futures import ProcessPoolExecutor

        chunk = 50
        jobs = [(self.cfg.seed, a, min(a + chunk, self.cfg.size), self.cfg.shuffled_looks)
                for a in range(0, self.cfg.size, chunk)]
        scenes: list[Scene] = []
        with bar(total=self.cfg.size, desc="pretraining world", unit="scene", disable=not progress or None) as pbar:
            if workers > 1:
                with ProcessPoolExecutor(workers) as pool:
                    for part in pool.map(_draw_many, jobs):
                        scenes += part
                        pbar.update(len(part))
            else:
                for job in jobs:
                    part = _draw_many(job)
                    scenes += part
                    pbar.update(len(part))
        shapes = np.array([s.image.shape[:2] for s in scenes], dtype=np.int64)
        sizes = shapes[:, 0] * shapes[:, 1]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        if max(int(s.segments.max()) for s in scenes) > np.iinfo(np.uint16).max:
            raise ValueError("more segments in a scene than uint16 holds")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        part = self.path.with_name(self.path.name + f".part-{os.getpid()}.npz")
        np.savez(part, offsets=offsets, shapes=shapes,
                 pixels=np.concatenate([s.image.reshape(-1) for s in scenes]),
                 segments=np.concatenate([s.segments.reshape(-1) for s in scenes]).astype(np.uint16),
                 captions=np.array([s.caption for s in scenes]))
        os.replace(part, self.path)

    def fingerprint(self) -> str:
        """sha256 of the pool file (what a card records: the exact scenes a model saw)."""
        from fishertune.backbones.weights import file_sha256

        return file_sha256(self.path)


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator, scale=(0.25, 1.0),
                        ratio=(3 / 4, 4 / 3), segments: np.ndarray | None = None, flip: bool = True):
    """torchvision's ``RandomResizedCrop`` (area share ``scale``, aspect ``ratio``) to ``size`` x ``size``
    with a random horizontal flip, drawn from ``rng``; ``segments`` are cropped alike (nearest)."""
    h, w = image.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw, ch = min(w, h), min(w, h)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    mirror = flip and rng.random() < 0.5
    img = Image.fromarray(image[y : y + ch, x : x + cw]).resize((size, size), Image.BILINEAR)
    out = np.asarray(img)[:, ::-1] if mirror else np.asarray(img)
    if segments is None:
        return np.ascontiguousarray(out)
    seg = Image.fromarray(segments[y : y + ch, x : x + cw].astype(np.int32)).resize((size, size), Image.NEAREST)
    seg = np.asarray(seg)[:, ::-1] if mirror else np.asarray(seg)
    return np.ascontiguousarray(out), np.ascontiguousarray(seg)


def colour_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 0.4) -> np.ndarray:
    """Brightness, contrast and saturation each scaled by a factor in ``1 +- strength`` (random order
    kept fixed for speed); greyscale with probability 0.2 (DINO/SimCLR-style view augmentation)."""
    x = image.astype(np.float32)
    x = x * rng.uniform(1 - strength, 1 + strength)
    mean = x.mean()
    x = mean + (x - mean) * rng.uniform(1 - strength, 1 + strength)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(1 - strength, 1 + strength)
    if rng.random() < 0.2:
        x = np.repeat(x.mean(axis=2, keepdims=True), 3, axis=2)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def config_digest(obj) -> str:
    """A short stable hash of a JSON-able object (settings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
