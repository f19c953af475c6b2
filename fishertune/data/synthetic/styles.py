"""The look of each domain, applied to a rendered scene (labels are never changed here).

``gtav`` a saturated synthetic-game look under strong sun; ``cityscapes`` overcast, desaturated,
grey-blue; ``bdd100k`` a dash-cam by day, at dusk or at night (vignetted, noisy; JPEG artefacts come
from the writer); ``mapillary`` one of sunny / overcast / dusk per image; ACDC's ``fog`` (contrast
lost to grey with distance), ``night`` (dark, lights glowing), ``rain`` (dark, grey, streaks) and
``snow`` (whitened ground, flakes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SKY_TRAIN_ID = 10
GROUND_TRAIN_IDS = (0, 1, 9)  # road, sidewalk, terrain


@dataclass
class Layers:
    """A rendered scene: float RGB (0..255), train ids, depth (metres), emitted light (RGB) and the
    Mapillary ids the train ids come from."""

    rgb: np.ndarray
    train: np.ndarray
    depth: np.ndarray
    light: np.ndarray
    ids: np.ndarray


def saturate(rgb: np.ndarray, factor: float) -> np.ndarray:
    grey = rgb.mean(axis=2, keepdims=True)
    return grey + (rgb - grey) * factor


def contrast(rgb: np.ndarray, factor: float, mid: float = 128.0) -> np.ndarray:
    return mid + (rgb - mid) * factor


def sky(layers: Layers, top: tuple, bottom: tuple, rng: np.random.Generator, clouds: float = 0.0) -> None:
    """Repaint the sky with a vertical gradient from ``top`` to ``bottom`` and ``clouds`` (0..1)."""
    mask = layers.train == SKY_TRAIN_ID
    if not mask.any():
        return
    h, w = mask.shape
    t = (np.arange(h, dtype=np.float32) / max(h - 1, 1))[:, None, None]
    colour = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    colour = np.broadcast_to(colour, (h, w, 3)).copy()
    if clouds:
        small = rng.standard_normal((max(h // 10, 2), max(w // 24, 2))).astype(np.float32)  # wide clouds
        cover = np.asarray(Image.fromarray(small, "F").resize((w, h), Image.BICUBIC))
        amount = np.clip(cover - 0.3, 0, 1)[..., None] * clouds
        colour = colour * (1 - amount) + np.asarray(bottom, np.float32).max() * 1.05 * amount
    layers.rgb[mask] = colour[mask]


def vignette(rgb: np.ndarray, strength: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    return rgb * (1 - strength * np.clip(r2 / 2, 0, 1))[..., None]


def glow(layers: Layers, radius: float, gain: float) -> np.ndarray:
    """Light sources plus their blurred halo, to add to a dark image."""
    light = Image.fromarray(np.clip(layers.light, 0, 255).astype(np.uint8))
    halo = np.asarray(light.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    return layers.light + gain * halo


def noise(rgb: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return rgb + rng.normal(0, sigma, rgb.shape).astype(np.float32)


def streaks(rgb: np.ndarray, rng: np.random.Generator, count: int, colour: tuple, alpha: float) -> np.ndarray:
    """Rain: thin slanted light streaks blended over the image."""
    h, w = rgb.shape[:2]
    overlay = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(overlay)
    slant = rng.uniform(-0.3, 0.3)
    for _ in range(count):
        x, y, length = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.04, 0.1) * h
        draw.line([(x, y), (x + slant * length, y + length)], fill=255, width=1)
    a = np.asarray(overlay.filter(ImageFilter.GaussianBlur(0.5)), dtype=np.float32)[..., None] / 255 * alpha
    return rgb * (1 - a) + np.asarray(colour, np.float32) * a


def flakes(rgb: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    overlay = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(overlay)
    for _ in range(count):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.4, 1.4)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=int(rng.integers(150, 256)))
    a = np.asarray(overlay, dtype=np.float32)[..., None] / 255
    return rgb * (1 - a) + 245 * a


def gtav(layers: Layers, rng: np.random.Generator) -> np.ndarray:
    sky(layers, (30, 100, 215), (150, 200, 245), rng, clouds=0.5)
    rgb = saturate(layers.rgb, 1.4)
    rgb = contrast(rgb, 1.15) * np.array([1.08, 1.02, 0.92], np.float32)
    return rgb + 10


def cityscapes(layers: Layers, rng: np.random.Generator) -> np.ndarray:
    sky(layers, (185, 192, 200), (220, 224, 228), rng, clouds=0.6)
    rgb = saturate(layers.rgb, 0.5)
    rgb = contrast(rgb, 0.8, 110) * np.array([0.94, 0.99, 1.06], np.float32)
    return noise(rgb, 2.0, rng)


def bdd100k(layers: Layers, rng: np.random.Generator) -> np.ndarray:
    """A dash-cam through the day, as BDD100K's frames are: by day (60%, hazy and a little washed out),
    at dusk (20%: dark, warm, lights glowing) or at night (20%: dark, lights glowing); always vignetted
    and noisy (the JPEG artefacts come from the writer)."""
    when = rng.choice(3, p=(0.6, 0.2, 0.2))
    if when == 0:  # day
        sky(layers, (120, 160, 205), (205, 215, 225), rng, clouds=0.4)
        rgb = contrast(saturate(layers.rgb, 0.85), 0.85, 120) * np.array([1.04, 1.0, 0.94], np.float32) + 8
    elif when == 1:  # dusk
        sky(layers, (55, 55, 100), (235, 140, 80), rng, clouds=0.3)
        rgb = layers.rgb * 0.55 * np.array([1.12, 0.95, 0.78], np.float32)
        rgb = rgb + glow(layers, layers.rgb.shape[1] * 0.015, 1.0) * 0.6
    else:  # night
        sky(layers, (12, 14, 28), (40, 38, 50), rng)
        rgb = layers.rgb * rng.uniform(0.2, 0.3) * np.array([1.05, 0.95, 0.9], np.float32)
        rgb = rgb + glow(layers, layers.rgb.shape[1] * 0.02, 1.5)
    return noise(vignette(rgb, 0.6), 4.0, rng)


def mapillary(layers: Layers, rng: np.random.Generator) -> np.ndarray:
    look = int(rng.integers(3))
    if look == 0:  # sunny
        sky(layers, (60, 120, 210), (170, 205, 240), rng, clouds=0.4)
        return contrast(saturate(layers.rgb, 1.15), 1.05) + 5
    if look == 1:  # overcast
        sky(layers, (175, 180, 190), (215, 218, 222), rng, clouds=0.5)
        return contrast(saturate(layers.rgb, 0.7), 0.85, 115)
    sky(layers, (70, 65, 110), (230, 160, 100), rng, clouds=0.3)  # dusk
    return layers.rgb * 0.7 * np.array([1.08, 0.97, 0.85], np.float32) + glow(layers, 2.0, 0.8) * 0.4


def fog(layers: Layers, rng: np.random.Generator) -> np.ndarray:
    air = rng.uniform(180, 205)
    sky(layers, (air, air, air + 3), (air, air, air + 3), rng)
    visibility = rng.uniform(20, 45)
    t = np.exp(-layers.depth / visibility)[..., None]
    rgb = saturate(layers.rgb, 0.7) * t + air * (1 - t)
    return noise(rgb, 1.5, rng)


def night(layers: Layers, rng: np.random.Generator) -> np.ndarray:
    sky(layers, (8, 10, 22), (30, 30, 45), rng)
    rgb = layers.rgb * rng.uniform(0.12, 0.2) * np.array([0.85, 0.9, 1.15], np.float32)
    rgb = rgb + glow(layers, max(layers.rgb.shape[1] * 0.02, 1.5), 2.0)
    return noise(rgb, 5.0, rng)


def rain(layers: Layers, rng: np.random.Generator) -> np.ndarray:
    sky(layers, (110, 115, 120), (150, 152, 155), rng, clouds=0.4)
    rgb = contrast(saturate(layers.rgb, 0.6), 0.85, 100) * 0.75
    rgb = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    rgb = np.asarray(rgb, dtype=np.float32) + glow(layers, 2.0, 0.5) * 0.3
    h, w = layers.train.shape
    return streaks(rgb, rng, int(h * w / 120), (200, 205, 215), 0.45)


def snow(layers: Layers, rng: np.random.Generator) -> np.ndarray:
    sky(layers, (190, 195, 205), (215, 218, 225), rng, clouds=0.3)
    rgb = saturate(layers.rgb, 0.7) * 1.05
    h, w = layers.train.shape
    cover = np.isin(layers.train, GROUND_TRAIN_IDS) | (layers.train == 8)
    small = rng.standard_normal((max(h // 8, 2), max(w // 8, 2))).astype(np.float32)
    patches = np.asarray(Image.fromarray(small, "F").resize((w, h), Image.BICUBIC))
    amount = np.clip(rng.uniform(0.5, 0.75) + 0.25 * patches, 0, 0.95)[..., None] * cover[..., None]
    rgb = rgb * (1 - amount) + np.array([232, 236, 242], np.float32) * amount
    return flakes(rgb, rng, int(h * w / 100))


STYLES = {f.__name__: f for f in (gtav, cityscapes, bdd100k, mapillary, fog, night, rain, snow)}


def apply_style(name: str, layers: Layers, rng: np.random.Generator) -> np.ndarray:
    """The styled image as ``H x W x 3`` uint8."""
    return np.clip(STYLES[name](layers, rng) + 0.5, 0, 255).astype(np.uint8)
