"""DINOv2-tiny: self-distillation with an EMA teacher (Oquab et al., 2023, https://arxiv.org/abs/2304.07193).

As DINOv2's ``train/ssl_meta_arch.py``, scaled to the miniature:

* views: 2 global crops (64 px, area 32-100%) and ``local_crops`` local crops (32 px, area 8-32%) of
  a scene, each flipped and colour-jittered; the second global crop is sometimes solarised (DINO's
  asymmetric augmentation);
* the teacher is an exponential moving average of the student (momentum from ``momentum`` to 1 along
  a cosine), sees the global crops only, and gives targets through the same projection head (DINOv2's
  default: one head shared by the image-level and the patch-level losses, ``ibot.separate_head=False``);
* image-level (DINO) loss: cross-entropy between the teacher's class-token prototype assignment
  (Sinkhorn-Knopp over the batch, DINOv2's centring, at a temperature warmed from 0.02 to 0.04) and
  the student's softmax (temperature 0.1) over every pair of a teacher global view and another
  student view;
* patch-level (iBOT) loss: for half of the student's global crops, 10-50% of the patches are replaced
  by the mask token; the student's masked patch tokens predict the teacher's (unmasked) patch tokens'
  prototype assignment (Sinkhorn-Knopp over the batch's masked patches);
* head: 3-layer MLP (width 256; DINO's initialisation, truncated normal 0.02 and zero biases), 64-d
  L2-normalised bottleneck, weight-normalised prototypes (``prototypes`` of them).

Simplifications: no KoLeo regulariser; 2 global and ``local_crops`` local crops instead of 2 + 8;
256 prototypes instead of 65,536 and a colder teacher (0.02 to 0.04: with few prototypes and short
training the warmer teacher's assignments stay near uniform); no stochastic depth. Layer scale starts at 0.1, not DINOv2's
1e-5: at 1e-5 the blocks barely write into the class token, which then is the same for every image
for hundreds of steps (measured: a standard deviation of 4e-5 across a batch at initialisation), and
the Sinkhorn-Knopp or centred teacher carries no information; at this scale and step count the
self-distillation then never starts (the loss stayed at log K over 300 steps). The backbone is the ``dinov2-tiny`` timm ViT with layer scale, as the
benchmark builds it; the file holds the student's backbone and its ``mask_token`` as DINOv2's official
file does (the loader drops the mask token); the heads and the teacher are dropped.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fishertune.backbones import build_backbone
from fishertune.pretrain.loop import Recipe, RecipeConfig, to_tensor
from fishertune.pretrain.world import WorldPool, colour_jitter, random_resized_crop


class DINOv2Config(RecipeConfig):
    steps: int = Field(1200, gt=0, description="optimiser steps")
    batch_size: int = Field(32, gt=0, description="scenes per step (each gives 2 global and the local crops)")
    lr: float = Field(5.0e-4, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (DINOv2: 0.9, 0.999)")
    weight_decay: float = Field(0.04, ge=0, description="AdamW weight decay (DINOv2: 0.04 rising to 0.2; fixed here)")
    local_crops: int = Field(2, ge=0, description="local crops per scene (DINOv2: 8)")
    local_size: int = Field(32, gt=0, description="side of a local crop")
    prototypes: int = Field(256, gt=0, description="prototypes of the projection head (DINOv2: 65536)")
    momentum: float = Field(0.99, gt=0, lt=1, description="teacher EMA momentum at the start, rising to 1 (DINOv2: 0.992)")
    teacher_temp: tuple[float, float] = Field((0.02, 0.04), description="teacher temperature, warmed over 30% of "
                                              "steps (DINOv2: 0.04 to 0.07)")
    student_temp: float = Field(0.1, gt=0, description="student temperature")
    mask_ratio: tuple[float, float] = Field((0.1, 0.5), description="iBOT: share of patches masked, drawn per image")
    mask_probability: float = Field(0.5, ge=0, le=1, description="iBOT: share of global crops that are masked")
    layer_scale_init: float = Field(0.1, gt=0, description="initial layer scale of the blocks (DINOv2: 1e-5)")


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """DINOv2's ``sinkhorn_knopp_teacher``: teacher probabilities ``N x K`` whose prototypes are used
    equally over the batch (rows sum to 1, columns to N / K), from ``exp(logits / temp)``."""
    q = torch.exp((logits - logits.max()) / temp).t()  # K x N (the max subtracted for range; it cancels)
    k, n = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    return (q * n).t()


class DINOHead(nn.Module):
    """DINO's projection head: MLP, L2-normalised bottleneck, weight-normalised prototypes (no bias)."""

    def __init__(self, dim: int, prototypes: int, hidden: int = 256, bottleneck: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for layer in self.mlp:  # DINO's init: truncated normal 0.02, zero bias (no constant output to start from)
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, prototypes, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad_(False)  # DINO: norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


class DINOTrainer(nn.Module):
    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.backbone = build_backbone("dinov2-tiny", pretrained=False, img_size=cfg.image_size)
        dim = self.backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # DINOv2's, at the official file's shape
        self.head = DINOHead(dim, cfg.prototypes)
        with torch.no_grad():  # see the module docstring: layer scale starts at layer_scale_init
            for block in self.backbone.vit.blocks:
                block.ls1.gamma.fill_(cfg.layer_scale_init)
                block.ls2.gamma.fill_(cfg.layer_scale_init)
        self.teacher_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)

    @staticmethod
    def encode(backbone, x: torch.Tensor, mask: torch.Tensor | None = None, mask_token=None) -> torch.Tensor:
        """Tokens after the final norm (class token first); masked patches replaced by the mask token."""
        vit = backbone.vit
        t = vit.patch_embed(x)  # B x H x W x C (dynamic size)
        if mask is not None:
            t = torch.where(mask.view(t.shape[:3])[..., None], mask_token.to(t.dtype).view(1, 1, 1, -1), t)
        t = vit.norm_pre(vit._pos_embed(t))
        return vit.norm(vit.blocks(t))


class DINOv2Recipe(Recipe):
    name = "dinov2"
    backbone = "dinov2-tiny"
    version = 1
    Config = DINOv2Config

    def build(self) -> nn.Module:
        return DINOTrainer(self.cfg)

    def views(self, pool: WorldPool, rng: np.random.Generator):
        cfg = self.cfg
        idx = rng.integers(0, len(pool), cfg.batch_size)
        globals_, locals_ = [[], []], []
        for i in idx:
            image = pool.image(i)
            for v in range(2):
                crop = colour_jitter(random_resized_crop(image, cfg.image_size, rng, scale=(0.32, 1.0)), rng)
                if v == 1 and rng.random() < 0.2:  # solarisation of the second view (DINO)
                    crop = np.where(crop >= 128, 255 - crop, crop).astype(np.uint8)
                globals_[v].append(crop)
            for _ in range(cfg.local_crops):
                locals_.append(colour_jitter(random_resized_crop(image, cfg.local_size, rng, scale=(0.08, 0.32)), rng))
        g = [to_tensor(np.stack(v)) for v in globals_]
        loc = to_tensor(np.stack(locals_)) if locals_ else None
        return g, loc

    def masks(self, rng: np.random.Generator, n: int, grid: int) -> torch.Tensor:
        cfg = self.cfg
        out = np.zeros((n, grid * grid), dtype=bool)
        for i in range(n):
            if rng.random() < cfg.mask_probability:
                k = int(round(rng.uniform(*cfg.mask_ratio) * grid * grid))
                out[i, rng.permutation(grid * grid)[:k]] = True
        return torch.from_numpy(out)

    def loss(self, trainer: DINOTrainer, pool: WorldPool, rng: np.random.Generator, step: int) -> torch.Tensor:
        cfg = self.cfg
        (g1, g2), loc = self.views(pool, rng)
        b = g1.shape[0]
        grid = cfg.image_size // trainer.backbone.patch_size
        warm = min(step / max(0.3 * cfg.steps, 1), 1.0)
        t_temp = cfg.teacher_temp[0] + (cfg.teacher_temp[1] - cfg.teacher_temp[0]) * warm
        globals_ = torch.cat([g1, g2])
        mask = self.masks(rng, 2 * b, grid)
        with torch.no_grad():
            t_tokens = trainer.encode(trainer.teacher_backbone, globals_)
            t_logits = trainer.teacher_head(t_tokens)  # 2B x (1 + N) x K
            t_cls = sinkhorn_knopp(t_logits[:, 0], t_temp)
            t_patch = sinkhorn_knopp(t_logits[:, 1:][mask], t_temp) if mask.any() else None
        s_tokens = trainer.encode(trainer.backbone, globals_, mask, trainer.mask_token)
        s_logits = trainer.head(s_tokens)
        s_cls = [F.log_softmax(s_logits[:, 0] / cfg.student_temp, dim=-1)]
        if loc is not None:
            l_tokens = trainer.encode(trainer.backbone, loc)
            s_cls.append(F.log_softmax(trainer.head(l_tokens[:, 0]) / cfg.student_temp, dim=-1))
        # DINO: each teacher global view against every student view but itself
        t_views = t_cls.chunk(2)
        s_global = s_cls[0].chunk(2)
        # local crops are ordered scene by scene: crop l of every scene is column l
        s_local = s_cls[1].view(b, cfg.local_crops, -1).unbind(1) if loc is not None else ()
        terms = []
        for ti, t in enumerate(t_views):
            for si, s in enumerate(s_global):
                if si != ti:
                    terms.append(-(t * s).sum(-1).mean())
            for s in s_local:
                terms.append(-(t * s).sum(-1).mean())
        dino = sum(terms) / len(terms)
        # iBOT on the masked patches
        if t_patch is not None:
            s_patch = F.log_softmax(s_logits[:, 1:][mask] / cfg.student_temp, dim=-1)
            ibot = -(t_patch * s_patch).sum(-1).mean()
        else:
            ibot = s_logits.sum() * 0
        return dino + ibot

    @torch.no_grad()
    def after_step(self, trainer: DINOTrainer, step: int) -> None:
        cfg = self.cfg
        m = 1 - (1 - cfg.momentum) * (math.cos(math.pi * step / cfg.steps) + 1) / 2
        for student, teacher in ((trainer.backbone, trainer.teacher_backbone), (trainer.head, trainer.teacher_head)):
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)

    def export(self, trainer: DINOTrainer) -> dict[str, torch.Tensor]:
        """DINOv2's official layout: timm's names plus ``mask_token`` (1, C)."""
        return {**trainer.backbone.vit.state_dict(), "mask_token": trainer.mask_token.detach()}
