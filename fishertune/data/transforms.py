"""Training and test transforms of Rein's configs (DESIGN section 4), sizes as parameters.

Training: random short-edge resize (long edge capped), random crop with mmseg's category-max-ratio
rule, horizontal flip, mmseg's ``PhotoMetricDistortion``, then padding to the crop size. Every random
draw comes from the generator passed in, so an augmented sample is a pure function of its inputs and
the generator's state. Test: mmseg ``Resize(keep_ratio=True)`` of the image only.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fishertune.data.labels import IGNORE_INDEX

#: ImageNet mean and standard deviation of R, G, B in 0..255 units.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def resize_pair(image: np.ndarray, label: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize to ``size = (width, height)``: image bilinear, label nearest."""
    if (image.shape[1], image.shape[0]) == size:
        return image, label
    return (np.array(Image.fromarray(image).resize(size, Image.BILINEAR)),
            np.array(Image.fromarray(label).resize(size, Image.NEAREST)))


class TrainTransform:
    """Rein's training augmentation with all sizes as parameters.

    Args:
        crop_size: side of the square training crop (Rein: 512).
        short_edge_range: inclusive range the short edge is drawn from (Rein: 256..1024).
        max_long_edge: cap on the long edge after the resize (Rein: 2048).
        cat_max_ratio: a crop is redrawn (up to 10 times) while one class covers this share or more
            of its non-ignored pixels, or it holds fewer than two classes (mmseg ``RandomCrop``).
        flip_prob: probability of a horizontal flip.
        photometric: apply mmseg's ``PhotoMetricDistortion``.
    """

    crop_tries = 10
    brightness_delta = 32
    contrast_range = (0.5, 1.5)
    saturation_range = (0.5, 1.5)
    hue_delta = 18  # in OpenCV hue units (0..180)

    def __init__(self, crop_size: int, short_edge_range: tuple[int, int], max_long_edge: int,
                 cat_max_ratio: float = 0.75, flip_prob: float = 0.5, photometric: bool = True) -> None:
        lo, hi = short_edge_range
        if not 0 < lo <= hi or crop_size <= 0 or max_long_edge < hi:
            raise ValueError(f"bad sizes: crop {crop_size}, short edge {short_edge_range}, long edge {max_long_edge}")
        self.crop_size = crop_size
        self.short_edge_range = (lo, hi)
        self.max_long_edge = max_long_edge
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = photometric

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.resize(image, label, rng)
        image, label = self.crop(image, label, rng)
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(image, rng, self.brightness_delta, self.contrast_range,
                                           self.saturation_range, self.hue_delta)
        return self.pad(image, label)

    def resize(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Short edge to a random integer in range, ratio kept, long edge at most ``max_long_edge``."""
        h, w = image.shape[:2]
        short = int(rng.integers(self.short_edge_range[0], self.short_edge_range[1] + 1))
        scale = min(short / min(h, w), self.max_long_edge / max(h, w))
        return resize_pair(image, label, (int(w * scale + 0.5), int(h * scale + 0.5)))

    def crop(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Random ``crop_size`` crop, redrawn while one class dominates (mmseg ``RandomCrop``)."""
        h, w = label.shape
        size = self.crop_size

        def draw() -> tuple[int, int]:
            return int(rng.integers(0, max(h - size, 0) + 1)), int(rng.integers(0, max(w - size, 0) + 1))

        y, x = draw()
        if self.cat_max_ratio < 1.0:
            for _ in range(self.crop_tries):
                counts = np.bincount(label[y : y + size, x : x + size].ravel(), minlength=256)
                counts[IGNORE_INDEX] = 0
                if np.count_nonzero(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                y, x = draw()
        return image[y : y + size, x : x + size], label[y : y + size, x : x + size]

    def pad(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pad bottom/right to the crop size with 0 (image) and 255 (label)."""
        h, w = label.shape
        ph, pw = max(self.crop_size - h, 0), max(self.crop_size - w, 0)
        if ph or pw:
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness_delta: float = 32,
                           contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` on uint8 RGB.

    Brightness (add a delta), then contrast either before or after the HSV part (scale), saturation
    (scale S) and hue (shift H); each step applied with probability 1/2, rounding to uint8 after each
    as mmseg does.

    Every step maps each uint8 value of a channel to a uint8 value, so each is computed once on the 256
    levels (in float32, exactly as it would be per pixel) and applied as a lookup table; consecutive
    tables are composed. The result is the same, bit for bit, as running the steps per pixel.
    """
    pre = post = None  # uint8 tables applied to R, G, B before and after the HSV part
    if rng.integers(2):
        pre = _convert_lut(pre, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        pre = _convert_lut(pre, alpha=rng.uniform(*contrast_range))
    saturation = rng.uniform(*saturation_range) if rng.integers(2) else None
    hue = int(rng.integers(-hue_delta, hue_delta + 1)) if rng.integers(2) else None
    if not contrast_first and rng.integers(2):
        post = _convert_lut(None, alpha=rng.uniform(*contrast_range))
    if saturation is None and hue is None:
        lut = pre if post is None else post if pre is None else post[pre]
        return image if lut is None else np.array(Image.fromarray(image).point(lut.tolist() * 3))
    pil = Image.fromarray(image)
    if pre is not None:
        pil = pil.point(pre.tolist() * 3)
    # PIL's hue runs over 0..255 where OpenCV's runs over 0..180
    hue_lut = _LEVELS_U8 if hue is None else np.mod(np.round(_LEVELS + hue * 256 / 180), 256).astype(np.uint8)
    sat_lut = _LEVELS_U8 if saturation is None else np.clip(_LEVELS * saturation, 0, 255).astype(np.uint8)
    pil = pil.convert("HSV").point(hue_lut.tolist() + sat_lut.tolist() + _LEVELS_U8.tolist()).convert("RGB")
    if post is not None:
        pil = pil.point(post.tolist() * 3)
    return np.array(pil)


#: The 256 uint8 levels, as float32 (what the per-pixel steps compute in) and as uint8.
_LEVELS = np.arange(256, dtype=np.float32)
_LEVELS_U8 = np.arange(256, dtype=np.uint8)


def _convert_lut(lut: np.ndarray | None, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """Table of ``clip(x * alpha + beta)`` rounded down to uint8 (mmseg's ``convert``), after ``lut``."""
    step = np.clip(_LEVELS * alpha + beta, 0, 255).astype(np.uint8)
    return step if lut is None else step[lut]


class TestResize:
    """mmseg ``Resize(scale=size, keep_ratio=True)`` for test images.

    The image is scaled by ``min(max(size) / long_edge, min(size) / short_edge)`` (bilinear) so it
    fits the (long, short) bounds; labels are left at their size (the evaluator resizes logits).
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = (int(size[0]), int(size[1]))

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` an image of the given size is resized to."""
        factor = min(max(self.size) / max(width, height), min(self.size) / min(width, height))
        return int(width * factor + 0.5), int(height * factor + 0.5)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        size = self.output_size(w, h)
        if size == (w, h):
            return image
        return np.array(Image.fromarray(image).resize(size, Image.BILINEAR))


def to_tensor(image: np.ndarray, mean: tuple[float, float, float] = IMAGENET_MEAN,
              std: tuple[float, float, float] = IMAGENET_STD) -> torch.Tensor:
    """``H x W x 3`` uint8 -> normalised float32 ``3 x H x W`` tensor.

    Computed channel by channel in NumPy (float32 subtract, then divide: the same IEEE operations as
    the tensor expression ``(x - mean) / std``), which avoids a strided permute and torch's
    intra-op threads, slow for small tensors in a process that also trains.
    """
    out = np.empty((3, *image.shape[:2]), dtype=np.float32)
    for c in range(3):
        np.subtract(image[..., c], np.float32(mean[c]), out=out[c], dtype=np.float32)
        np.divide(out[c], np.float32(std[c]), out=out[c])
    return torch.from_numpy(out)
