"""Training and test transforms: sizes, image/label alignment, category-max-ratio, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fishertune.data import TestResize, TrainTransform, to_tensor
from fishertune.data.transforms import IMAGENET_MEAN, IMAGENET_STD, photometric_distortion

STEP = 12  # label k is drawn with grey level STEP * k + STEP, so the image encodes the label


def striped(h: int, w: int, classes: int = 19) -> tuple[np.ndarray, np.ndarray]:
    """An image whose colour encodes its label: vertical stripes, left-right asymmetric."""
    label = np.broadcast_to((np.arange(w) * classes // w).astype(np.uint8), (h, w)).copy()
    label[: h // 4] = 255  # an ignored band on top
    grey = np.where(label == 255, 0, label.astype(np.int32) * STEP + STEP).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), label


def decode(image: np.ndarray) -> np.ndarray:
    grey = image[..., 0].astype(np.int32)
    return np.where(grey == 0, 255, np.round(grey / STEP) - 1).astype(np.int32)


@pytest.mark.parametrize("shape", [(96, 160), (40, 50), (64, 64)])
def test_output_is_a_crop_of_the_crop_size(shape):
    image, label = striped(*shape)
    transform = TrainTransform(crop_size=48, short_edge_range=(32, 96), max_long_edge=192)
    for seed in range(10):
        out_image, out_label = transform(image, label, np.random.default_rng(seed))
        assert out_image.shape == (48, 48, 3) and out_image.dtype == np.uint8
        assert out_label.shape == (48, 48) and out_label.dtype == np.uint8


def test_small_images_are_padded_with_zero_and_ignore():
    image, label = striped(20, 30)
    transform = TrainTransform(crop_size=48, short_edge_range=(20, 20), max_long_edge=64, photometric=False)
    out_image, out_label = transform(image, label, np.random.default_rng(0))
    assert (out_label[20:] == 255).all() and (out_label[:, 30:] == 255).all()
    assert (out_image[20:] == 0).all() and (out_image[:, 30:] == 0).all()
    assert (out_label[5:20, :30] != 255).all()


def test_flip_and_crop_keep_image_and_label_aligned():
    image, label = striped(64, 128)
    transform = TrainTransform(crop_size=48, short_edge_range=(64, 64), max_long_edge=128, photometric=False)
    flips = 0
    for seed in range(20):
        out_image, out_label = transform(image, label, np.random.default_rng(seed))
        assert np.array_equal(decode(out_image), out_label)
        valid = out_label[out_label != 255].reshape(-1, 48) if (out_label != 255).any() else None
        if valid is not None and valid[0, 0] > valid[0, -1]:
            flips += 1
    assert 0 < flips < 20  # both orientations were drawn


def test_rescaled_image_and_label_stay_aligned():
    image, label = striped(64, 128)
    transform = TrainTransform(crop_size=48, short_edge_range=(80, 120), max_long_edge=256, photometric=False)
    for seed in range(10):
        out_image, out_label = transform(image, label, np.random.default_rng(seed))
        inside = out_label != 255
        agree = (decode(out_image)[inside] == out_label[inside]).mean()
        assert agree > 0.85  # bilinear blends colours only along stripe edges


def test_resize_short_edge_range_and_long_edge_cap():
    image, label = striped(50, 200)
    transform = TrainTransform(crop_size=32, short_edge_range=(60, 100), max_long_edge=300)
    shorts = set()
    for seed in range(30):
        out_image, out_label = transform.resize(image, label, np.random.default_rng(seed))
        h, w = out_label.shape
        assert out_image.shape[:2] == (h, w) and w <= 300
        assert abs(w / h - 4) < 0.1
        shorts.add(h)
    assert min(shorts) >= 60 and max(shorts) == 75  # 75 = 300 / 4: capped by the long edge
    assert len(shorts) > 5


def crops(label: np.ndarray, crop_size: int, ratio: float, seeds: int = 100) -> list[np.ndarray]:
    image = np.zeros((*label.shape, 3), np.uint8)
    transform = TrainTransform(crop_size=crop_size, short_edge_range=(min(label.shape),) * 2,
                               max_long_edge=max(label.shape), cat_max_ratio=ratio, flip_prob=0, photometric=False)
    return [transform(image, label, np.random.default_rng(seed))[1] for seed in range(seeds)]


def test_cat_max_ratio_avoids_crops_of_one_class():
    label = np.zeros((128, 128), np.uint8)
    label[:, :64] = 1

    def good_share(ratio):
        shares = [np.bincount(c.ravel()).max() / c.size for c in crops(label, 48, ratio)]
        return np.mean(np.array(shares) < 0.75)

    assert good_share(0.75) > 0.9 and good_share(1.0) < 0.4


def test_cat_max_ratio_does_not_count_ignored_pixels():
    """Crops that are mostly ignore but hold two balanced classes pass the rule (mmseg semantics)."""
    label = np.full((64, 64), 255, np.uint8)
    label[:, 0:6:2], label[:, 1:6:2] = 3, 4  # a narrow band of alternating columns on the left

    def both_classes(ratio):
        return np.mean([{3, 4} <= set(np.unique(c).tolist()) for c in crops(label, 32, ratio)])

    assert both_classes(0.75) > 0.6 and both_classes(1.0) < 0.3


def test_same_generator_same_result_and_no_global_state():
    image, label = striped(90, 120)
    image = (image.astype(np.int32) + np.arange(120)[None, :, None] % 7 * 5).astype(np.uint8)
    transform = TrainTransform(crop_size=64, short_edge_range=(64, 128), max_long_edge=256)
    np.random.seed(1)
    a = transform(image, label, np.random.default_rng(123))
    np.random.seed(2)
    b = transform(image, label, np.random.default_rng(123))
    c = transform(image, label, np.random.default_rng(124))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not (np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1]))


def test_photometric_distortion_changes_colours_only():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    unchanged = [np.array_equal(photometric_distortion(image, np.random.default_rng(s)), image) for s in range(64)]
    assert 0 < sum(unchanged) < 16  # each of the four steps is applied with probability 1/2
    out = photometric_distortion(image, np.random.default_rng(1))
    assert out.shape == image.shape and out.dtype == np.uint8


@pytest.mark.parametrize("image_size, test_size, expected", [
    ((2048, 1024), (1024, 512), (1024, 512)),  # Cityscapes
    ((1280, 720), (1280, 720), (1280, 720)),  # BDD100K
    ((1920, 1080), (960, 540), (960, 540)),  # ACDC
    ((1000, 1500), (1024, 512), (512, 768)),  # portrait: the short edge bounds it
])
def test_test_resize_keeps_ratio_within_bounds(image_size, test_size, expected):
    assert TestResize(test_size).output_size(*image_size) == expected


def test_test_resize_resizes_the_image():
    image = np.zeros((135, 240, 3), np.uint8)
    assert TestResize((120, 60))(image).shape == (60, 107, 3)
    assert TestResize((240, 135))(image) is image


def test_to_tensor_normalises_with_imagenet_statistics():
    image = np.zeros((4, 5, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 124, 116, 104
    image[0, 0] = (255, 255, 255)
    tensor = to_tensor(image)
    assert tensor.shape == (3, 4, 5) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, 1, 1], (torch.tensor([124, 116, 104.]) - torch.tensor(IMAGENET_MEAN))
                          / torch.tensor(IMAGENET_STD))
    assert torch.allclose(tensor[:, 0, 0], (255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))
