"""The miniature: five small data sets in the real on-disk layouts, from one scene generator.

``synthesize(out)`` writes ``out/{gtav,cityscapes,bdd100k,mapillary,acdc}`` exactly as the real
releases lay them out (DESIGN section 4), with each data set's label encoding: GTAV Cityscapes label
ids in a palette PNG, Mapillary v1.2 ids (0..65) with ``config_v1.2.json``, train ids elsewhere.
Scenes come from :mod:`fishertune.data.synthetic.street` (same semantics in every domain), looks
from :mod:`fishertune.data.synthetic.styles`, cameras per domain below (Mapillary: varied horizon,
zoom, roll and aspect ratio; Cityscapes, BDD100K, ACDC: an ego-vehicle hood labelled 255 in some or
all images).

Counts: ``train_images`` for the two training sources (GTAV, Cityscapes train), ``images`` for every
evaluation split (Cityscapes, BDD100K and Mapillary val, each ACDC condition's val) and for the
training splits no manifest trains on (BDD100K, Mapillary, ACDC train), which exist for the layout.
Consecutive images cycle through three groups of rarer classes and a scene is redrawn until its
classes are visible (:func:`render`), so a split of three or more images normally holds all 19
classes. Sizes are the real releases' divided by 7.5 (GTAV), 8 (Cityscapes, ACDC), 5 (BDD100K) or
about 12 (Mapillary, whose frames vary).

Every image's randomness comes from ``numpy.random.default_rng`` seeded by (seed, data set, split,
group, index): the same seed writes byte-identical files, whatever the number of worker processes
writing them. Data sets are written under ``out/.tmp-<pid>/`` and renamed into place at the end;
``out/SYNTH.json`` (seed, counts, version) is written last, and a call whose marker matches returns
at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fishertune.data.labels import (IGNORE_INDEX, PALETTE, TRAIN_ID_TO_CITYSCAPES_ID,
                                    mapillary_to_train_id, mapillary_v12_config)
from fishertune.data.synthetic import canvas, street
from fishertune.data.synthetic.styles import Layers, apply_style
from fishertune.errors import UserError
from fishertune.progress import bar, enabled

VERSION = 3  # 2: separate training-source counts, GTAV at 256 x 141; 3: BDD100K by day, dusk or night
DATASETS = ("gtav", "cityscapes", "bdd100k", "mapillary", "acdc")
MARKER = "SYNTH.json"
REPLACING = ".synth-replacing"  # present while data sets are being swapped into place
LOCK = ".synth.lock"  # held (flock) by the process writing the tree
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
MAPILLARY_SIZES = ((320, 240), (320, 180), (288, 216), (300, 200), (256, 192), (192, 256), (240, 320))
FIXED_SIZES = {"gtav": (256, 141), "cityscapes": (256, 128), "bdd100k": (256, 144), "acdc": (240, 135)}
CITIES = {"train": ("aachen", "bremen"), "val": ("frankfurt", "munster")}
ATTEMPTS = 8  # scene draws per image at most, until every class it should show is visible
MIN_PIXELS = 4
#: ``class``: each class has its own colour family and texture, so a patch's look tells its class;
#: ``shuffled``: each image gives its classes one another's looks (:func:`street.shuffled_looks`), so only
#: shape, position and context do (a diagnostic of what the tiny models' pretraining is worth)
LOOKS = ("class", "shuffled")

#: Mapillary id -> train id, by the names of the official config (the generator draws Mapillary ids).
MAPILLARY_TO_TRAIN = mapillary_to_train_id(mapillary_v12_config())
_SPECIAL_CITYSCAPES_IDS = {canvas.EGO_VEHICLE: 1, canvas.CAR_MOUNT: 1, canvas.UNLABELED: 0, canvas.RAIL_TRACK: 10,
                           canvas.GUARD_RAIL: 14}
#: Mapillary id -> Cityscapes label id for the GTAV labels ("static", 4, for ignored objects without one).
MAPILLARY_TO_CITYSCAPES_ID = np.array(
    [TRAIN_ID_TO_CITYSCAPES_ID[t] if t != IGNORE_INDEX else _SPECIAL_CITYSCAPES_IDS.get(i, 4)
     for i, t in enumerate(MAPILLARY_TO_TRAIN)], dtype=np.uint8)


@dataclass(frozen=True)
class CameraRange:
    """Ranges a domain's camera is drawn from: horizon row and focal length as fractions of the
    image height and width, height above the road (m), roll (deg), and the ego-vehicle hood."""

    horizon: tuple[float, float]
    focal: tuple[float, float]
    height: tuple[float, float]
    yaw: float = 0.03  # spread of the vanishing point's column, fraction of the width
    roll: float = 0.0
    hood: float = 0.0  # probability of a hood
    hood_top: tuple[float, float] = (0.85, 0.9)


CAMERAS = {
    "gtav": CameraRange((0.40, 0.50), (0.8, 1.0), (1.2, 1.8)),
    "cityscapes": CameraRange((0.40, 0.46), (1.05, 1.15), (1.2, 1.3), hood=1.0, hood_top=(0.78, 0.84)),
    "bdd100k": CameraRange((0.42, 0.55), (0.75, 0.9), (1.2, 1.5), hood=0.5, hood_top=(0.85, 0.92)),
    "mapillary": CameraRange((0.30, 0.62), (0.6, 1.4), (1.0, 3.0), yaw=0.15, roll=8.0, hood=0.25),
    "acdc": CameraRange((0.42, 0.48), (0.9, 1.1), (1.3, 1.6), hood=0.3, hood_top=(0.88, 0.94)),
}


@dataclass(frozen=True)
class Item:
    """One image/label pair to write: paths relative to the data set's root."""

    dataset: str
    split: str
    group: str
    index: int
    image: str
    label: str
    size: tuple[int, int]
    style: str
    looks: str = "class"  # "class" or "shuffled" (LOOKS)


def item_rng(seed: int, dataset: str, split: str, group: str, index: int, purpose: str) -> np.random.Generator:
    """The generator of one image, derived from the seed and where the image is (never global state)."""
    words = [zlib.crc32(s.encode()) for s in (dataset, split, group, purpose)]
    return np.random.default_rng([seed, *words, index])


def plan(seed: int, images: int, train_images: int | None = None, looks: str = "class") -> list[Item]:
    """Every file pair of the miniature, in writing order (``train_images`` defaults to ``2 * images``)."""
    items = _plan(seed, images, 2 * images if train_images is None else train_images)
    return items if looks == "class" else [replace(item, looks=looks) for item in items]


def _plan(seed: int, images: int, train_images: int) -> list[Item]:
    items: list[Item] = []
    for i in range(train_images):
        name = f"{i + 1:05d}"
        items.append(Item("gtav", "train", "", i, f"images/{name}.png", f"labels/{name}.png",
                          FIXED_SIZES["gtav"], "gtav"))
    for split in ("train", "val"):
        for i in range(train_images if split == "train" else images):
            city = CITIES[split][i % 2]
            stem = f"{city}/{city}_000000_{19 + 20 * i:06d}"
            items.append(Item("cityscapes", split, "", i, f"leftImg8bit/{split}/{stem}_leftImg8bit.png",
                              f"gtFine/{split}/{stem}_gtFine_labelTrainIds.png", FIXED_SIZES["cityscapes"],
                              "cityscapes"))
    for split in ("train", "val"):
        for i in range(images):
            a, b = item_rng(seed, "bdd100k", split, "", i, "name").integers(0, 2**32, 2)
            stem = f"{a:08x}-{b:08x}"
            items.append(Item("bdd100k", split, "", i, f"images/10k/{split}/{stem}.jpg",
                              f"labels/sem_seg/masks/{split}/{stem}.png", FIXED_SIZES["bdd100k"], "bdd100k"))
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
    for split, folder in (("train", "training"), ("val", "validation")):
        for i in range(images):
            rng = item_rng(seed, "mapillary", split, "", i, "name")
            key = "".join(rng.choice(alphabet, 22))
            size = MAPILLARY_SIZES[rng.integers(len(MAPILLARY_SIZES))]
            items.append(Item("mapillary", split, "", i, f"{folder}/images/{key}.jpg",
                              f"{folder}/v1.2/labels/{key}.png", size, "mapillary"))
    for c, condition in enumerate(ACDC_CONDITIONS):
        for s, split in enumerate(("train", "val")):
            for i in range(images):
                seq = f"GOPR{300 + 20 * c + 4 * s + i % 2:04d}"
                stem = f"{condition}/{split}/{seq}/{seq}_frame_{100 + 37 * i:06d}"
                items.append(Item("acdc", split, condition, i, f"rgb_anon/{stem}_rgb_anon.png",
                                  f"gt/{stem}_gt_labelTrainIds.png", FIXED_SIZES["acdc"], condition))
    return items


def render(seed: int, item: Item) -> tuple[np.ndarray, np.ndarray]:
    """The styled image (uint8 RGB) and Mapillary-id label map of one item.

    Scenes are drawn again (from the same generator, so still deterministically) until every class
    the scene should show (:data:`street.ALWAYS_CLASSES` and its feature group) has at least
    :data:`MIN_PIXELS` pixels after occlusion, roll and hood; after :data:`ATTEMPTS` the most complete
    one is kept.
    """
    rng = item_rng(seed, item.dataset, item.split, item.group, item.index, "scene")
    looks_rng = item_rng(seed, item.dataset, item.split, item.group, item.index, "looks") \
        if item.looks == "shuffled" else None
    wanted = np.array(sorted(street.ALWAYS_CLASSES | street.FEATURE_CLASSES[item.index % 3]))
    best, best_missing = None, len(wanted) + 1
    for _ in range(ATTEMPTS):
        view = compose(item, rng, looks_rng)
        missing = int((np.bincount(view.train.ravel(), minlength=256)[wanted] < MIN_PIXELS).sum())
        if missing < best_missing:
            best, best_missing = view, missing
        if not missing:
            break
    return apply_style(item.style, best, rng), best.ids


def compose(item: Item, rng: np.random.Generator, looks_rng: np.random.Generator | None = None) -> Layers:
    """Camera, scene, texture, roll and hood of one item, before its domain's style; with ``looks_rng``
    its classes' looks shuffled (:func:`street.shuffled_looks`, drawn from that generator, so that the
    scene and its labels are those of the item's ``class`` looks)."""
    cams = CAMERAS[item.dataset]
    w, h = item.size
    roll = rng.uniform(-cams.roll, cams.roll)
    # draw on a canvas large enough that rotating it by the roll still covers the w x h image
    rad = math.radians(abs(roll))
    cw = int(math.ceil(w * math.cos(rad) + h * math.sin(rad))) + 2 if roll else w
    ch = int(math.ceil(w * math.sin(rad) + h * math.cos(rad))) + 2 if roll else h
    cam = canvas.Camera(cw, ch, horizon=rng.uniform(*cams.horizon) * h + (ch - h) / 2,
                       center=cw / 2 + rng.normal(0, cams.yaw) * w, focal=rng.uniform(*cams.focal) * max(w, h),
                       height_m=rng.uniform(*cams.height))
    drawn = street.Street(cam, rng, feature=item.index).render()
    train = MAPILLARY_TO_TRAIN[np.asarray(drawn.ids)]
    looks = street.shuffled_looks(train, looks_rng) if looks_rng is not None else None
    layers = [Image.fromarray(street.texture(drawn, train, rng, looks)), drawn.ids, drawn.depth, drawn.light]
    if roll:
        box = ((cw - w) // 2, (ch - h) // 2, (cw - w) // 2 + w, (ch - h) // 2 + h)
        resample = (Image.BILINEAR, Image.NEAREST, Image.NEAREST, Image.BILINEAR)
        layers = [layer.rotate(roll, resample=r).crop(box) for layer, r in zip(layers, resample)]
    rgb, ids, depth, light = (np.array(layer, dtype=np.uint8 if k == 1 else np.float32)
                              for k, layer in enumerate(layers))
    if item.dataset == "mapillary" and rng.random() < 0.5:  # too far to annotate
        ids[(depth > 100) & (ids != canvas.SKY)] = canvas.UNLABELED
    if rng.random() < cams.hood:
        hood(rgb, ids, depth, rng, cams.hood_top, item.dataset == "mapillary")
    return Layers(rgb=rgb, train=MAPILLARY_TO_TRAIN[ids], depth=depth, light=light, ids=ids)


def hood(rgb: np.ndarray, ids: np.ndarray, depth: np.ndarray, rng: np.random.Generator,
         top: tuple[float, float], mount: bool) -> None:
    """Draw the ego vehicle's bonnet (or, if ``mount`` and by chance, a camera mount) at the bottom."""
    h, w = ids.shape
    mask_image = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask_image)
    y = rng.uniform(*top) * h
    if mount and rng.random() < 0.4:
        label, colour = canvas.CAR_MOUNT, (35, 35, 38)
        draw.polygon([(0.4 * w, h), (0.45 * w, y), (0.55 * w, y), (0.6 * w, h)], fill=255)
    else:
        label, colour = canvas.EGO_VEHICLE, canvas.jitter(rng, (60, 65, 75), 20)
        draw.ellipse((-0.3 * w, y, 1.3 * w, y + 2.5 * (h - y) + 0.5 * h), fill=255)
    mask = np.asarray(mask_image) > 0
    ids[mask] = label
    depth[mask] = 1.5
    rows = np.linspace(0.85, 1.15, h, dtype=np.float32)[:, None, None]  # lit from above
    rgb[mask] = (np.broadcast_to(np.asarray(colour, np.float32) * rows, rgb.shape))[mask]


def encode_label(dataset: str, ids: np.ndarray) -> Image.Image:
    """A label PNG in the data set's own encoding."""
    if dataset == "mapillary":
        return Image.fromarray(ids, "L")
    if dataset == "gtav":  # palette PNG of Cityscapes label ids, like the real GTAV
        label = Image.fromarray(MAPILLARY_TO_CITYSCAPES_ID[ids], "P")
        palette = np.zeros((256, 3), np.uint8)
        palette[TRAIN_ID_TO_CITYSCAPES_ID] = PALETTE
        label.putpalette(palette.ravel().tolist())
        return label
    return Image.fromarray(MAPILLARY_TO_TRAIN[ids], "L")


def write_item(root: Path, seed: int, item: Item) -> None:
    """Render one item and write its image (PNG, or JPEG for BDD100K and Mapillary) and label."""
    image, ids = render(seed, item)
    for rel in (item.image, item.label):
        (root / item.dataset / rel).parent.mkdir(parents=True, exist_ok=True)
    quality = {"bdd100k": 30, "mapillary": 85}.get(item.dataset)  # BDD100K: visible compression artefacts
    if quality:
        Image.fromarray(image).save(root / item.dataset / item.image, quality=quality)
    else:
        Image.fromarray(image).save(root / item.dataset / item.image)
    encode_label(item.dataset, ids).save(root / item.dataset / item.label)


def counts(items: list[Item]) -> dict[str, dict[str, int]]:
    """Pairs per data set and split (ACDC: per ``split/condition``), as written."""
    out: dict[str, dict[str, int]] = {}
    for item in items:
        key = f"{item.split}/{item.group}" if item.group else item.split
        out.setdefault(item.dataset, {}).setdefault(key, 0)
        out[item.dataset][key] += 1
    return out


def synthesize(out: Path, seed: int = 0, images: int = 12, progress: bool = True, train_images: int | None = None,
               workers: int | None = None, looks: str = "class") -> dict[str, Path]:
    """Write the miniature under ``out`` and return the root of each data set by name: ``images`` per
    evaluation split, ``train_images`` (default ``2 * images``) per training source, rendered by
    ``workers`` processes (default: the CPU's cores, at most 4; the files are the same for any number),
    with the classes' ``looks`` of :data:`LOOKS` (the labels are the same for either).

    Returns at once if ``out/SYNTH.json`` records the same seed, counts and version. Refuses (with
    a :class:`UserError`) to replace data set folders in ``out`` that it did not write. Writing happens
    under an exclusive lock on ``out/.synth.lock``: a second process asking for the same tree meanwhile
    waits and then returns the first one's.
    """
    train_images = 2 * images if train_images is None else train_images
    for flag, value in (("--images", images), ("--train-images", train_images)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if looks not in LOOKS:
        raise UserError(f"--looks must be one of {', '.join(LOOKS)}, got {looks!r}")
    out = Path(out)
    roots = {name: out / name for name in DATASETS}
    params = {"seed": seed, "images": images, "train_images": train_images, "version": VERSION}
    if looks != "class":  # recorded only when not the default, so that existing trees keep their marker
        params["looks"] = looks
    marker = out / MARKER
    if _marker(marker) == params and all(root.is_dir() for root in roots.values()):
        return roots
    out.mkdir(parents=True, exist_ok=True)
    with _generation_lock(out):  # a second process waits, then finds the first one's tree complete
        if _marker(marker) == params and all(root.is_dir() for root in roots.values()):
            return roots
        _generate(out, roots, params, progress, workers or min(os.cpu_count() or 1, 4))
    return roots


@contextlib.contextmanager
def _generation_lock(out: Path):
    """An exclusive ``flock`` on ``out/.synth.lock`` while the tree is written (dropped by the kernel when its
    holder dies), so that two processes never replace folders the other is writing or already reading."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _generate(out: Path, roots: dict[str, Path], params: dict, progress: bool, workers: int) -> None:
    """Write the tree under ``out/.tmp-<pid>/`` and rename it into place (see :func:`synthesize`)."""
    marker = out / MARKER
    ours = marker.exists() or (out / REPLACING).exists()
    foreign = [name for name, root in roots.items() if root.exists()] if not ours else []
    if foreign:
        raise UserError(f"{out} already holds {', '.join(foreign)}/ not written by `fishertune data synth` "
                        f"(no {MARKER}); choose an empty --out directory")
    _remove_stale_tmp(out)
    tmp = out / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    seed = params["seed"]
    items = plan(seed, params["images"], params["train_images"], params.get("looks", "class"))
    try:
        _write_items(tmp, seed, items, progress, workers)
        (tmp / "mapillary" / "config_v1.2.json").write_text(json.dumps(mapillary_v12_config(), indent=2) + "\n")
        (out / REPLACING).write_text(json.dumps(params) + "\n")
        marker.unlink(missing_ok=True)
        for name, root in roots.items():
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp / name, root)
        _write_atomic(marker, json.dumps({**params, "counts": counts(items)}, indent=2) + "\n")
        (out / REPLACING).unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_chunk(args: tuple[Path, int, list[Item]]) -> int:
    root, seed, items = args
    for item in items:
        write_item(root, seed, item)
    return len(items)


def _write_items(root: Path, seed: int, items: list[Item], progress: bool, workers: int) -> None:
    """Render and write ``items`` under ``root`` in ``workers`` processes (chunks of 16), with a progress bar."""
    chunks = [(root, seed, items[a : a + 16]) for a in range(0, len(items), 16)]
    with bar(total=len(items), disable=not (progress and enabled()), desc="synth", unit="img") as pbar:
        if workers <= 1:
            for chunk in chunks:
                pbar.update(_write_chunk(chunk))
            return
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            for done in pool.map(_write_chunk, chunks):
                pbar.update(done)


def _marker(path: Path) -> dict | None:
    """The seed, counts, version (and looks, if not ``class``) recorded in a marker, or None if absent or
    unreadable."""
    try:
        data = json.loads(path.read_text())
        return {k: data[k] for k in ("seed", "images", "train_images", "version")} | (
            {"looks": data["looks"]} if "looks" in data else {})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one."""
    part = path.with_name(path.name + f".part-{os.getpid()}")
    part.write_text(text)
    os.replace(part, path)


def _remove_stale_tmp(out: Path) -> None:
    """Remove the temporary folders of earlier runs that were killed."""
    for tmp in out.glob(".tmp-*"):
        pid = tmp.name[len(".tmp-"):]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (POSIX)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
