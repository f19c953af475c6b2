"""MAE-tiny: masked-patch pixel reconstruction (He et al., 2022, https://arxiv.org/abs/2111.06377).

As MAE's ``main_pretrain.py`` / ``models_mae.py``, scaled to the miniature:

* each image's patches are masked at random, 75% of them (per-image random shuffle, as MAE);
* the encoder (the ``mae-tiny`` backbone: timm's ``VisionTransformer``, the class the benchmark uses)
  sees the class token and the visible 25% only, with fixed 2-D sine-cosine position embeddings
  (MAE's; kept frozen during pretraining and trainable afterwards, as MAE's fine-tuning does), and
  ends with its final norm;
* a light decoder (2 timm blocks of width 64, MAE-L's has 8 of width 512) gets the encoded visible
  tokens and a shared mask token at every masked position, with its own fixed sine-cosine positions,
  and predicts each patch's pixels;
* the loss is the mean squared error on the masked patches of per-patch normalised pixels (MAE's
  ``norm_pix_loss=True``).

Simplifications: 64 px crops of the pretraining world (8x8 patches of 8 px) instead of 224 px ImageNet
images; 2,000 steps of 64 crops instead of 800 epochs of ImageNet; the pixel decoder, its position table and the
mask token are dropped afterwards (the official file keeps them; the ``mae`` loader drops
``decoder_*`` and ``mask_token`` by name: this file carries the encoder only).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch import nn

from fishertune.backbones import build_backbone
from fishertune.pretrain.loop import Recipe, RecipeConfig, to_tensor
from fishertune.pretrain.world import WorldPool, random_resized_crop


def sincos_2d(dim: int, grid: int, cls_token: bool) -> torch.Tensor:
    """MAE's ``get_2d_sincos_pos_embed``: ``(1 [+1], grid*grid, dim)`` fixed 2-D sine-cosine positions."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):  # MAE: first half from the height axis, second from the width
        out = pos[:, None] * omega[None]
        parts += [torch.sin(out), torch.cos(out)]
    table = torch.cat(parts, dim=1).float()
    if cls_token:
        table = torch.cat([torch.zeros(1, dim), table])
    return table.unsqueeze(0)


class MAEConfig(RecipeConfig):
    steps: int = Field(2000, gt=0, description="optimiser steps")
    batch_size: int = Field(64, gt=0, description="crops per step")
    lr: float = Field(1.5e-3, gt=0, description="peak learning rate (MAE: 1.5e-4 x batch / 256 at batch 4096)")
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="share of patches masked per image (MAE: 0.75)")
    decoder_width: int = Field(64, gt=0, description="width of the pixel decoder")
    decoder_depth: int = Field(2, gt=0, description="blocks of the pixel decoder")
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="RandomResizedCrop area range (MAE: 0.2-1)")


class MAETrainer(nn.Module):
    def __init__(self, cfg: MAEConfig):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.backbone = build_backbone("mae-tiny", pretrained=False, img_size=cfg.image_size)
        vit = self.backbone.vit
        grid = cfg.image_size // self.backbone.patch_size
        with torch.no_grad():
            vit.pos_embed.copy_(sincos_2d(vit.embed_dim, grid, cls_token=True))
        vit.pos_embed.requires_grad_(False)
        self.patch = self.backbone.patch_size
        self.decoder_embed = nn.Linear(vit.embed_dim, cfg.decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_width))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_pos", sincos_2d(cfg.decoder_width, grid, cls_token=True))
        self.decoder = nn.Sequential(*[Block(cfg.decoder_width, 4, mlp_ratio=4.0, qkv_bias=True)
                                       for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(cfg.decoder_width)
        self.decoder_pred = nn.Linear(cfg.decoder_width, self.patch * self.patch * 3)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, x: torch.Tensor, noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
        vit = self.backbone.vit
        t = vit.patch_embed(x).flatten(1, 2) + vit.pos_embed[:, 1:]  # dynamic_img_size: NHWC out
        b, n, c = t.shape
        keep = int(n * (1 - mask_ratio))
        order = noise.argsort(dim=1)
        restore = order.argsort(dim=1)
        visible = torch.gather(t, 1, order[:, :keep, None].expand(-1, -1, c))
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(b, -1, -1)
        t = vit.norm(vit.blocks(torch.cat([cls, visible], dim=1)))
        d = self.decoder_embed(t)
        masked = self.mask_token.expand(b, n - keep, -1)
        full = torch.cat([d[:, 1:], masked], dim=1)
        full = torch.gather(full, 1, restore[:, :, None].expand(-1, -1, d.shape[-1]))
        d = torch.cat([d[:, :1], full], dim=1) + self.decoder_pos
        pred = self.decoder_pred(self.decoder_norm(self.decoder(d)))[:, 1:]
        target = self.patchify(x)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore)
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()


class MAERecipe(Recipe):
    name = "mae"
    backbone = "mae-tiny"
    version = 1
    Config = MAEConfig

    def build(self) -> nn.Module:
        return MAETrainer(self.cfg)

    def loss(self, trainer: MAETrainer, pool: WorldPool, rng: np.random.Generator, step: int) -> torch.Tensor:
        cfg = self.cfg
        idx = rng.integers(0, len(pool), cfg.batch_size)
        crops = np.stack([random_resized_crop(pool.image(i), cfg.image_size, rng, scale=cfg.crop_scale) for i in idx])
        grid = (cfg.image_size // trainer.patch) ** 2
        noise = torch.from_numpy(rng.random((cfg.batch_size, grid))).float()
        return trainer(to_tensor(crops), noise, cfg.mask_ratio)

    def export(self, trainer: MAETrainer) -> dict[str, torch.Tensor]:
        """The encoder in MAE's official layout: timm's ``VisionTransformer`` names are MAE's."""
        return dict(trainer.backbone.vit.state_dict())
