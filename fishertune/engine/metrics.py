"""Confusion matrix and IoU, computed over a whole target set (not per image), as mmseg does.

Rows of the confusion matrix are ground-truth classes, columns predictions; pixels labelled 255 are
ignored. IoU_c = TP_c / (TP_c + FP_c + FN_c). A class whose union is empty (absent from both the
labels and the predictions of the whole set) has no IoU (NaN) and is left out of the mean, exactly
like mmseg's ``IoUMetric`` used by Rein; a class that is predicted but absent from the labels gets
IoU 0 and counts.
"""

from __future__ import annotations

import numpy as np
import torch

from fishertune.data.labels import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``num_classes x num_classes`` int64 counts of (label, pred) pairs over non-ignored pixels."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    label = label.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = label != ignore_index
    label, pred = label[keep], pred[keep]
    if label.numel() and (int(label.max()) >= num_classes or int(label.min()) < 0):
        raise ValueError(f"label values must be in 0..{num_classes - 1} or {ignore_index}")
    idx = label * num_classes + pred
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def iou_per_class(confusion: np.ndarray | torch.Tensor) -> np.ndarray:
    """IoU per class in [0, 1]; NaN where the class is absent from labels and predictions."""
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(iou: np.ndarray) -> float:
    """Mean over the classes that have an IoU (see module docstring)."""
    present = iou[~np.isnan(iou)]
    return float(present.mean()) if present.size else float("nan")
