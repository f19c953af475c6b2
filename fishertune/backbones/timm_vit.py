"""A backbone around a timm ``VisionTransformer`` (DINOv2, EVA-style and MAE ViTs share this).

Features are the block outputs of ``out_indices`` (before the final norm, as Rein takes them), with
the prefix tokens (class, registers) dropped and the patch tokens laid out on the patch grid.
"""

from __future__ import annotations

import torch
from torch import nn

from fishertune.backbones.base import QKV, Backbone, default_out_indices


def timm_vit(img_size: int, patch_size: int, **arch) -> nn.Module:
    """A timm ``VisionTransformer`` without classifier or pooling, accepting any input size."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=0, global_pool="",
                             dynamic_img_size=True, **arch)


def _call_block(block: nn.Module, t: torch.Tensor, n_extra: int, mask: torch.Tensor | None) -> torch.Tensor:
    return block(t) if mask is None else block(t, attn_mask=mask)


class TimmViTBackbone(Backbone):
    """Wraps ``timm.models.vision_transformer.VisionTransformer`` behind the backbone interface."""

    def __init__(self, vit: nn.Module, family: str, out_indices: tuple[int, ...] | None = None):
        super().__init__()
        self.vit = vit
        self.family = family
        self.embed_dim = vit.embed_dim
        self.patch_size = vit.patch_embed.patch_size[0]
        self.num_layers = len(vit.blocks)
        self.out_indices = tuple(out_indices or default_out_indices(self.num_layers))
        self.num_prefix_tokens = vit.num_prefix_tokens

    @property
    def blocks(self) -> nn.Module:  # type: ignore[override]
        return self.vit.blocks

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = x.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        vit = self.vit
        t = vit.patch_embed(x)
        t = vit._pos_embed(t)
        t = vit.norm_pre(t)
        maps = []
        for i, block in enumerate(vit.blocks):
            t = self.run_sequence_block(i, block, t, _call_block)
            if i in self.out_indices:
                patches = t[:, self.num_prefix_tokens :, :]
                maps.append(patches.transpose(1, 2).reshape(b, self.embed_dim, gh, gw))
        return self.multiscale(maps)

    def qkv(self) -> list[QKV]:
        return [
            QKV(block=i, module=blk.attn.qkv, weight="weight", bias="bias" if blk.attn.qkv.bias is not None else None,
                dim=self.embed_dim)
            for i, blk in enumerate(self.vit.blocks)
        ]

    def mlp_norm(self, i: int) -> nn.Module:
        """The norm feeding block ``i``'s MLP (see :meth:`Backbone.mlp_norm`)."""
        return self.vit.blocks[i].norm2
