"""IoU from one confusion matrix, checked against a matrix computed by hand."""

import numpy as np
import torch

from fishertune.engine.metrics import confusion_matrix, iou_per_class, mean_iou


def test_confusion_matches_hand_count_with_ignore_and_absent_classes():
    # 4 classes; class 3 is in neither labels nor predictions, class 2 is predicted but never labelled.
    label = torch.tensor([[0, 0, 1, 1], [0, 255, 1, 255], [1, 1, 0, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 3, 1, 0], [1, 0, 0, 2]])
    # counted pairs (label, pred), ignoring the two 255 pixels:
    # (0,0) (0,1) (1,1) (1,1) (0,2) (1,1) (1,1) (1,0) (0,0) (0,2)
    expected = np.zeros((4, 4), dtype=np.int64)
    for lab, prd in [(0, 0), (0, 1), (1, 1), (1, 1), (0, 2), (1, 1), (1, 1), (1, 0), (0, 0), (0, 2)]:
        expected[lab, prd] += 1
    cm = confusion_matrix(pred, label, num_classes=4).numpy()
    np.testing.assert_array_equal(cm, expected)

    iou = iou_per_class(cm)
    # class 0: TP 2, FP 1 (label 1 predicted 0), FN 3 (0 predicted 1 once, 2 twice) -> union 6
    assert iou[0] == 2 / 6
    # class 1: TP 4, FP 1, FN 1
    assert iou[1] == 4 / 6
    # class 2: predicted twice, never labelled: IoU 0 and it counts
    assert iou[2] == 0.0
    # class 3: absent from both (the pixel predicted 3 is ignored): no IoU
    assert np.isnan(iou[3])
    assert mean_iou(iou) == (2 / 6 + 4 / 6 + 0.0) / 3


def test_confusion_accumulates_over_images_not_per_image_mean():
    # image A: class 0 perfect on 1 pixel; image B: class 0 fully wrong on 3 pixels.
    a = confusion_matrix(torch.tensor([0]), torch.tensor([0]), 2)
    b = confusion_matrix(torch.tensor([1, 1, 1]), torch.tensor([0, 0, 0]), 2)
    iou = iou_per_class(a + b)
    assert iou[0] == 1 / 4  # a per-image mean would give (1 + 0) / 2
    assert iou[1] == 0.0


def test_bad_label_values_are_refused():
    import pytest

    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 4)
