"""MAE (He et al., 2022) encoders through timm: ViT-H/14 and ViT-L/16.

The paper's Table 1 labels its MAE row "Huge", but its numbers are Rein's, and Rein used MAE ViT-L
(the row's 304.20M "Full" count is a ViT-L's); both are registered: ``mae-l`` and ``mae-h``.
MAE's encoder is a plain ViT (no layer scale, qkv bias, LayerNorm eps 1e-6), which is timm's
``VisionTransformer`` with the same parameter names, so its checkpoints load with the same
converter as DINOv2's.

Official files (facebookresearch/mae): ``mae_pretrain_vit_large.pth`` and ``mae_pretrain_vit_huge.pth``,
``{"model": state_dict}`` with keys ``cls_token``, ``pos_embed`` (1, 1+14*14 or 1+16*16, C: MAE's fixed
sin-cos table, trainable from here on as in MAE's fine-tuning), ``patch_embed.proj.*`` (16x16 for L,
14x14 for H), ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`` and ``norm.*``. A full
pretraining checkpoint saved by MAE's ``main_pretrain.py`` also holds ``mask_token`` and the
``decoder_*`` keys of the pixel decoder; those are pretraining-only and dropped by name.

At 512 with patch 16 (Rein's setting) ViT-H's 14x14 kernel is resampled to 16x16 and both models'
position grids resized to 32x32 (timm's converter, bicubic, antialiased); ``patch_size=14`` keeps
ViT-H's native patching.

Assumption: stochastic depth 0.1 for both (Rein publishes no MAE configuration; 0.1 is what Rein uses for
CLIP ViT-L and what MAE's own ViT-L segmentation fine-tuning used).
"""

from __future__ import annotations

from pathlib import Path

from fishertune.backbones.registry import register_backbone
from fishertune.backbones.timm_vit import TimmViTBackbone, timm_vit
from fishertune.backbones.weights import load_strict, read_state_dict

#: MAE's pixel decoder and mask token: in full pretraining checkpoints, unused by the encoder
PRETRAIN_ONLY_PREFIXES = ("mask_token", "decoder_")


def load_mae(backbone: TimmViTBackbone, path: Path) -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(PRETRAIN_ONLY_PREFIXES)}
    state = checkpoint_filter_fn(state, backbone.vit)
    load_strict(backbone.vit, state, path)


def _mae(img_size: int, patch_size: int, drop_path_rate: float, **arch) -> TimmViTBackbone:
    vit = timm_vit(img_size, patch_size, qkv_bias=True, drop_path_rate=drop_path_rate, **arch)
    return TimmViTBackbone(vit, family="mae")


@register_backbone("mae-l", family="mae", weights="mae_pretrain_vit_large.pth", loader=load_mae)
def mae_large(img_size: int = 512, patch_size: int = 16, drop_path_rate: float = 0.1, **kwargs) -> TimmViTBackbone:
    """MAE ViT-L/16: 24 blocks, width 1024, 16 heads (the model behind the paper's MAE row)."""
    return _mae(img_size, patch_size, drop_path_rate, embed_dim=1024, depth=24, num_heads=16, **kwargs)


@register_backbone("mae-h", family="mae", weights="mae_pretrain_vit_huge.pth", loader=load_mae)
def mae_huge(img_size: int = 512, patch_size: int = 16, drop_path_rate: float = 0.1, **kwargs) -> TimmViTBackbone:
    """MAE ViT-H/14: 32 blocks, width 1280, 16 heads; features of blocks 7/15/23/31."""
    return _mae(img_size, patch_size, drop_path_rate, embed_dim=1280, depth=32, num_heads=16, **kwargs)


@register_backbone("mae-tiny", family="mae", weights="mae-tiny.safetensors", loader=load_mae, shipped=True)
def mae_tiny(img_size: int = 64, patch_size: int = 8, drop_path_rate: float = 0.0, **kwargs) -> TimmViTBackbone:
    """The miniature's MAE: the same timm class and block type, 6 blocks of width 128, 4 heads; pretrained by
    masked-patch reconstruction (``fishertune tiny pretrain mae-tiny``, :mod:`fishertune.pretrain.mae`)."""
    return _mae(img_size, patch_size, drop_path_rate, **{"embed_dim": 128, "depth": 6, "num_heads": 4, **kwargs})
