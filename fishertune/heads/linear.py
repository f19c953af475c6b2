"""A linear probe: what a frozen backbone's features say about the classes, with no decoder to learn.

DINOv2's linear semantic-segmentation evaluation (Oquab et al. 2023, https://arxiv.org/abs/2304.07193:
its ``linear`` and multi-scale ``ms`` set-ups): the backbone's feature maps,
resized to one grid and concatenated, then BatchNorm and a 1x1 convolution to the classes,

    scores = W . BN(concat_l resize(f_l)) + b,

trained with per-pixel cross-entropy (255 ignored) on the scores resized to the label size. At evaluation
BatchNorm is a fixed per-channel affine map, so the whole head is linear in the features: its mIoU measures
how linearly separable the classes are in them. Parameters: ``4 C`` x ``K`` weights, ``K`` biases and
``2 x 4 C`` BatchNorm scales and shifts (C the backbone's channels, K the classes); BatchNorm starts at
identity, the convolution at PyTorch's default (Kaiming-uniform).

Assumptions, where the paper's set-up has none to copy:
- All four levels the backbone gives are used (DINOv2's ``ms`` variant concatenates the last four blocks).
  Our levels are four blocks resampled to four strides (4 to 32 on a patch-16 ViT, 2 to 16 on the tiny
  models' patch 8) by bilinear interpolation, with no learned neck, so
  concatenating them on the finest grid adds no trainable layer between the features and the classifier.
- ``levels`` may pick fewer (e.g. ``[2]``: the native-stride level alone).
- Under several processes (DDP) each normalises its own batch (plain BatchNorm, as mmsegmentation's
  ``BN``); the miniature runs one process.

Used by ``benchmarks/mini/probe.yaml``: the miniature's frozen tiny foundation models against the same
architectures at random initialisation (results/perf/mini-signal.md), to tell "the pretraining learned
nothing the classes need" from "the Mask2Former head cannot use it in the budget".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fishertune.heads.base import HEADS, DecodeHead, pixel_cross_entropy


@HEADS.register("linear")
class LinearHead(DecodeHead):
    def __init__(self, in_channels: int, num_classes: int, levels: list[int] = [0, 1, 2, 3]):  # noqa: B006
        super().__init__()
        if not levels or len(set(levels)) != len(levels) or any(not 0 <= i < 4 for i in levels):
            raise ValueError(f"levels must be distinct indices of the four feature maps (0-3), got {levels}")
        self.levels = list(levels)
        channels = in_channels * len(self.levels)
        self.norm = nn.BatchNorm2d(channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def predict(self, features: list[torch.Tensor]) -> torch.Tensor:
        picked = [features[i] for i in self.levels]
        size = max((f.shape[-2:] for f in picked), key=lambda s: s[0] * s[1])
        x = torch.cat([f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                       for f in picked], dim=1)
        return self.classifier(self.norm(x))

    def losses(self, features: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return pixel_cross_entropy(self.predict(features), labels)
