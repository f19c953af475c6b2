"""A light FPN-style decode head for quick runs (not the paper's head; Mask2Former is).

Each of the four levels is projected by a 1x1 convolution to ``channels``, resized to the finest
level and summed; a 3x3 convolution with GroupNorm and ReLU, dropout and a 1x1 classifier follow.
Trained with per-pixel cross-entropy (255 ignored) on logits resized to the label size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fishertune.heads.base import HEADS, DecodeHead, pixel_cross_entropy


@HEADS.register("light")
class LightHead(DecodeHead):
    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1, groups: int = 32):
        super().__init__()
        if channels < 1 or groups < 1:
            raise ValueError(f"channels ({channels}) and groups ({groups}) must be at least 1")
        self.lateral = nn.ModuleList(nn.Conv2d(in_channels, channels, 1) for _ in range(4))
        self.fuse = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(min(groups, channels), channels),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def predict(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        x = 0
        for lateral, fmap in zip(self.lateral, features):
            y = lateral(fmap)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            x = x + y
        return self.classifier(self.dropout(self.fuse(x)))

    def losses(self, features: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return pixel_cross_entropy(self.predict(features), labels)
