"""Evaluation through the whole path (ratio-keeping resize, sliding windows, logits back to the label's
size, one confusion matrix per target or per ACDC condition) against IoU computed by hand."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fishertune.data import NUM_CLASSES
from fishertune.engine.evaluate import evaluate, slide_logits, window_origins

RED, BLUE = (255, 0, 0), (0, 0, 255)


class RedVsBlue(nn.Module):
    """Predicts class 0 where the (normalised) image is redder than blue, class 1 where bluer."""

    def forward(self, x):
        logits = torch.full((x.shape[0], NUM_CLASSES, *x.shape[-2:]), -100.0)
        logits[:, 0] = x[:, 0] - x[:, 2]
        logits[:, 1] = x[:, 2] - x[:, 0]
        return logits


class Images(torch.utils.data.Dataset):
    def __init__(self, samples, groups=None):
        self.samples = samples
        if groups is not None:
            self.scan = type("Scan", (), {"groups": groups})()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def _halves(h=100, w=200):
    """Left half red, right half blue; the label: left 0, right top 1, right bottom 2, a strip ignored."""
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = RED
    image[:, w // 2 :] = BLUE
    label = np.zeros((h, w), np.uint8)
    label[: h // 2, w // 2 :] = 1
    label[h // 2 :, w // 2 :] = 2
    label[:10, :] = 255  # ignored: counts nowhere
    return {"image": image, "label": label, "path": "x"}


def test_known_prediction_gives_the_hand_computed_iou_through_resize_slide_and_back():
    # 200x100 image resized (ratio kept) to 128x64, slid by 48-pixel windows at stride 32 (3x2 windows,
    # overlapping), logits resized back to 200x100. The prediction is class 0 on the left half and
    # class 1 on the right half; the boundary survives both resizes exactly (x = 100 <-> 64).
    res = evaluate(RedVsBlue(), Images([_halves()]), test_size=(128, 64), crop=48, stride=32, batch=4,
                   device=torch.device("cpu"))
    # by hand, rows 10..99 count (rows 0..9 ignored):
    #   class 0: predicted and labelled on the left 90 x 100 -> IoU 1
    #   class 1: labelled right rows 10..49 (40 x 100), predicted on the whole right (90 x 100) -> 4000/9000
    #   class 2: labelled right rows 50..99, never predicted -> 0 / 5000 = 0
    assert res.iou[0] == 1.0
    assert res.iou[1] == pytest.approx(4000 / 9000)
    assert res.iou[2] == 0.0
    assert all(math.isnan(v) for v in res.iou[3:])
    assert res.miou == pytest.approx((1 + 4000 / 9000 + 0) / 3)
    assert res.confusion.sum() == 90 * 200 and res.num_images == 1


def test_groups_get_their_own_confusion_and_the_target_reports_their_mean():
    # two "conditions": one image predicted perfectly, one with its colours swapped (all wrong)
    good = _halves()
    good["label"] = np.where(good["label"] == 2, 1, good["label"]).astype(np.uint8)
    bad = {**good, "image": good["image"][:, ::-1].copy()}
    res = evaluate(RedVsBlue(), Images([good, bad], groups=["fog", "night"]), test_size=(128, 64), crop=48,
                   stride=32, batch=4, device=torch.device("cpu"))
    assert set(res.groups) == {"fog", "night"}
    assert res.groups["fog"].miou == 1.0 and res.groups["night"].miou == 0.0
    assert res.miou == 0.5  # the mean over conditions, as Rein's DGIoUMetric
    assert res.pooled_miou == pytest.approx(1 / 3)  # one matrix over both images: 9000/27000 per class
    assert (res.confusion == res.groups["fog"].confusion + res.groups["night"].confusion).all()


# ---- sliding-window coverage: a property check over random image sizes, windows and strides --------------

def _mmseg_origins(length: int, crop: int, stride: int) -> list[int]:
    """mmseg's ``slide_inference`` window starts along one axis, written out independently."""
    grids = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(grids)]


def test_windows_cover_every_pixel_as_mmseg_places_them_for_random_sizes():
    rng = np.random.default_rng(18)
    for _ in range(500):
        length, crop = int(rng.integers(1, 400)), int(rng.integers(1, 128))
        stride = int(rng.integers(1, crop + 1))
        origins = window_origins(length, crop, stride)
        assert origins == _mmseg_origins(length, crop, stride), (length, crop, stride)
        covered = np.zeros(length, int)
        for o in origins:
            covered[o : o + crop] += 1
        assert covered.min() >= 1 and origins[0] == 0 and origins[-1] == max(length - crop, 0)
        assert all(0 < b - a <= stride for a, b in zip(origins, origins[1:]))


class Identity(nn.Module):
    """Returns its input as the logits of three classes: averaging the windows must give the image back."""

    def forward(self, x):
        return x


def test_averaged_windows_give_back_every_pixel_for_random_images_windows_and_strides():
    rng = np.random.default_rng(1818)
    for _ in range(60):
        h, w = (int(n) for n in rng.integers(1, 90, 2))
        crop = int(rng.integers(4, 48))
        stride = int(rng.integers(1, crop + 1))
        image = torch.from_numpy(rng.normal(size=(1, 3, h, w)))
        out = slide_logits(Identity(), image, 3, crop, stride, batch=int(rng.integers(1, 9)))
        assert out.shape == image.shape
        # exact but for the float32 the windows' logits are kept in; a window misplaced is off by O(1)
        torch.testing.assert_close(out, image, rtol=1e-6, atol=1e-6, msg=f"{h}x{w}, crop {crop}, stride {stride}")


def test_a_stride_past_the_window_is_refused_and_an_uncovered_pixel_is_never_averaged(monkeypatch):
    with pytest.raises(ValueError, match="leaves pixels no window covers"):
        window_origins(100, 32, 33)
    import fishertune.engine.evaluate as evaluate_module

    # windows at the two ends only (a stride of 68 for a 32-pixel window): columns 32..67 would be 0/0
    monkeypatch.setattr(evaluate_module, "window_origins", lambda length, crop, stride: [0, max(length - crop, 0)])
    with pytest.raises(AssertionError, match="uncovered"):
        slide_logits(Identity(), torch.zeros(1, 3, 32, 100), 3, 32, 32, batch=2)
