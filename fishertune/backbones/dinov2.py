"""DINOv2 (Oquab et al., 2023) through timm.

Rein runs DINOv2-L/14 at 512x512 with patch 16: the official 14x14 patch-embedding kernel is
resampled to 16x16 and the 37x37 position grid resized to 32x32 (timm's checkpoint filter does both,
bicubic, antialiased). ``patch_size=14`` keeps the native patching.
Official file: ``dinov2_vitl14_pretrain.pth`` (keys ``cls_token``, ``pos_embed``, ``mask_token``,
``patch_embed.*``, ``blocks.N.*``, ``norm.*``); ``mask_token`` is only used by DINOv2's own masked
training and is dropped.
"""

from __future__ import annotations

from pathlib import Path

from timm.models.vision_transformer import checkpoint_filter_fn

from fishertune.backbones.registry import register_backbone
from fishertune.backbones.timm_vit import TimmViTBackbone, timm_vit
from fishertune.backbones.weights import load_strict, read_state_dict


def load_dinov2(backbone: TimmViTBackbone, path: Path) -> None:
    state = read_state_dict(path)
    state = checkpoint_filter_fn(dict(state), backbone.vit)
    load_strict(backbone.vit, state, path)


@register_backbone("dinov2-l", family="dinov2", weights="dinov2_vitl14_pretrain.pth", loader=load_dinov2)
def dinov2_large(img_size: int = 512, patch_size: int = 16, **kwargs) -> TimmViTBackbone:
    """DINOv2 ViT-L/14: 24 blocks, width 1024, 16 heads, layer scale; patch 16 at 512 as in Rein."""
    arch = dict(embed_dim=1024, depth=24, num_heads=16, **kwargs)
    return TimmViTBackbone(timm_vit(img_size, patch_size, init_values=1e-5, **arch), family="dinov2")


@register_backbone("dinov2-tiny", family="dinov2", weights="dinov2-tiny.safetensors", loader=load_dinov2, shipped=True)
def dinov2_tiny(img_size: int = 64, patch_size: int = 8, **kwargs) -> TimmViTBackbone:
    """The miniature's DINOv2: the same timm class and block type, 6 blocks of width 128, 4 heads; pretrained
    by self-distillation (``fishertune tiny pretrain dinov2-tiny``, :mod:`fishertune.pretrain.dinov2`)."""
    arch = {"embed_dim": 128, "depth": 6, "num_heads": 4, **kwargs}  # a test may build other shapes
    return TimmViTBackbone(timm_vit(img_size, patch_size, init_values=1e-5, **arch), family="dinov2")
