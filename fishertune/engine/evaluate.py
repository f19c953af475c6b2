"""Evaluation as in Rein's configs (DESIGN section 4).

Each target image is resized keeping its aspect ratio to fit the target's test size (mmseg
``Resize(keep_ratio=True)``), normalised, and predicted by a sliding window (``crop`` x ``crop``,
``stride``; windows batched; a window that overhangs a small image is zero-padded and its padding
cut from the logits); overlapping logits are averaged, resized bilinearly to the label's size and
arg-maxed (:func:`predict`, the one place a prediction is made). One confusion matrix accumulates
over the whole target set, and one per group when the reader groups its images (ACDC: one per
condition, reported per condition and as their mean, as Rein's ``DGIoUMetric`` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fishertune.data import NUM_CLASSES, TestResize, to_tensor
from fishertune.engine.metrics import confusion_matrix, iou_per_class, mean_iou
from fishertune.precision import autocast, to_compute
from fishertune.progress import bar


def window_origins(length: int, crop: int, stride: int) -> list[int]:
    """Window starts along one axis, mmseg's slide rule: the last window is flush with the edge. With
    ``0 < stride <= crop`` the windows cover every position; a larger stride would leave gaps and is refused."""
    if not 0 < stride <= crop:
        raise ValueError(f"sliding-window stride {stride} must be in 1..crop ({crop}); a larger one leaves "
                         "pixels no window covers")
    n = max(math.ceil((length - crop) / stride), 0) + 1
    return sorted({max(min(i * stride, length - crop), 0) for i in range(n)})


@torch.no_grad()
def slide_logits(model: torch.nn.Module, image: torch.Tensor, num_classes: int, crop: int, stride: int,
                 batch: int) -> torch.Tensor:
    """Averaged window logits for one normalised image ``1 x 3 x H x W`` -> ``1 x K x H x W``."""
    _, _, h, w = image.shape
    boxes = [(y, x) for y in window_origins(h, crop, stride) for x in window_origins(w, crop, stride)]
    logits = image.new_zeros((1, num_classes, h, w))
    count = image.new_zeros((1, 1, h, w))
    for start in range(0, len(boxes), batch):
        chunk = boxes[start : start + batch]
        windows = []
        for y, x in chunk:
            win = image[:, :, y : y + crop, x : x + crop]
            pad_h, pad_w = crop - win.shape[-2], crop - win.shape[-1]
            windows.append(F.pad(win, (0, pad_w, 0, pad_h)) if pad_h or pad_w else win)
        out = to_compute(model(torch.cat(windows)))
        for (y, x), win_logits in zip(chunk, out):
            hh, ww = min(crop, h - y), min(crop, w - x)
            logits[0, :, y : y + hh, x : x + ww] += win_logits[:, :hh, :ww]
            count[0, :, y : y + hh, x : x + ww] += 1
    if not bool((count > 0).all()):  # never average over no window: 0/0 would be arg-maxed to class 0
        raise AssertionError(f"sliding windows ({crop}, stride {stride}) left pixels of a {h}x{w} image uncovered")
    return logits / count


@torch.no_grad()
def predict(model: torch.nn.Module, image: np.ndarray, label_shape: tuple[int, int], test_size: tuple[int, int],
            crop: int, stride: int, batch: int, device: torch.device, num_classes: int = NUM_CLASSES,
            precision: str = "fp32") -> np.ndarray:
    """The train-id map (``label_shape``, uint8) that evaluation predicts for one ``H x W x 3`` uint8 image:
    ratio-keeping :class:`TestResize` to ``test_size``, :func:`slide_logits`, logits resized bilinearly to
    ``label_shape``, arg-max. :func:`evaluate` scores exactly this. ``model`` should be in eval mode."""
    x = to_compute(to_tensor(TestResize(test_size)(image)).unsqueeze(0).to(device))
    with autocast(device, precision):
        logits = slide_logits(model, x, num_classes, crop, stride, batch)
    logits = F.interpolate(logits, size=tuple(int(n) for n in label_shape), mode="bilinear", align_corners=False)
    pred = logits.argmax(1)[0].cpu().numpy()
    return pred.astype(np.uint8) if num_classes <= 256 else pred


@dataclass
class TargetResult:
    """Outcome on one target set: confusion matrix, IoU per class (0..1, NaN if absent), mIoU."""

    confusion: np.ndarray
    num_images: int
    groups: dict[str, "TargetResult"] | None = None  # per group (ACDC condition), when the reader has groups
    #: ``(index, train-id map)`` of the first images, when :func:`evaluate` was asked to keep them
    predictions: list[tuple[int, np.ndarray]] = field(default_factory=list)

    @property
    def iou(self) -> np.ndarray:
        return iou_per_class(self.confusion)

    @property
    def miou(self) -> float:
        """mIoU of the pooled confusion matrix; with groups, the unweighted mean of the groups' mIoU."""
        if self.groups:
            return float(np.mean([g.miou for g in self.groups.values()]))
        return mean_iou(self.iou)

    @property
    def pooled_miou(self) -> float:
        """mIoU of one confusion matrix over every image, groups or not."""
        return mean_iou(self.iou)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, test_size: tuple[int, int], crop: int, stride: int, batch: int,
             device: torch.device, desc: str = "eval", num_classes: int = NUM_CLASSES, keep: int = 0,
             precision: str = "fp32") -> TargetResult:
    """Evaluate ``model`` on every image of ``dataset`` (a reader returning image and label); the
    predictions (:func:`predict`) of the first ``keep`` images are returned in ``predictions``."""
    was_training = model.training
    model.eval()
    scan = getattr(dataset, "scan", None)
    names = list(scan.groups) if scan is not None and len(set(scan.groups)) > 1 else [""] * len(dataset)
    confusion = {g: torch.zeros((num_classes, num_classes), dtype=torch.int64) for g in dict.fromkeys(names)}
    kept = []
    for i in bar(range(len(dataset)), desc=desc, unit="img"):
        sample = dataset[i]
        label = torch.from_numpy(np.asarray(sample["label"]))
        pred = predict(model, sample["image"], tuple(label.shape), test_size, crop, stride, batch, device, num_classes,
                       precision)
        confusion[names[i]] += confusion_matrix(torch.from_numpy(pred), label, num_classes)
        if i < keep:
            kept.append((i, pred))
    model.train(was_training)
    pooled = sum(confusion.values()).numpy()
    if len(confusion) == 1:
        return TargetResult(confusion=pooled, num_images=len(dataset), predictions=kept)
    groups = {g: TargetResult(confusion=c.numpy(), num_images=names.count(g)) for g, c in confusion.items()}
    return TargetResult(confusion=pooled, num_images=len(dataset), groups=groups, predictions=kept)
