"""Segmentor = backbone + decode head (DESIGN section 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fishertune.backbones import Backbone
from fishertune.heads import DecodeHead


class Segmentor(nn.Module):
    """``forward(images)`` gives logits at the input size; ``loss(images, labels)`` the training loss."""

    def __init__(self, backbone: Backbone, head: DecodeHead):
        super().__init__()
        self.backbone = backbone
        self.head = head
        #: the backbone's own weights, as built (before a tuning method adds modules or tokens to it)
        self.backbone_weights: tuple[nn.Parameter, ...] = tuple(backbone.parameters())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scores = self.head.predict(self.backbone.forward_features(images))
        return F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head.losses(self.backbone.forward_features(images), labels)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sum(self.losses(images, labels).values())
