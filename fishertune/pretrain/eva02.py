"""EVA02-tiny: masked image modelling with a CLIP teacher (Fang et al., 2023, https://arxiv.org/abs/2303.11331).

As EVA-02's MIM pretraining (``EVA-02/asuka``), scaled to the miniature:

* the student is the ``eva02-tiny`` backbone (timm's ``Eva`` with EVA-02's SwiGLU, sub-LN and 2-D rotary
  positions); block-wise masks (BEiT's: rectangles of 2-16 patches until ``mask_ratio`` of the grid,
  EVA-02's 40%) replace patch embeddings by a learned mask token before the position embedding;
* the teacher is the frozen CLIP-tiny image tower made by this suite (``clip-tiny.safetensors``,
  :mod:`fishertune.pretrain.clip`; EVA-02's teacher is EVA-CLIP): its last block's patch tokens through
  its ``ln_post`` and ``proj``, i.e. per-patch features in the image-text space;
* the student's final norm and a linear MIM head (EVA-02's ``lm_head``) regress the teacher's
  features at the masked positions; the loss is their negative cosine similarity (EVA-02's).

The recipe therefore needs CLIP-tiny first (``fishertune tiny pretrain --all`` orders them), and its
hash includes the teacher file's sha256: a new CLIP-tiny asks for a new EVA02-tiny.

Simplifications: 64 px crops (8x8 patches), one teacher resolution, no stochastic depth. The file
holds the student in EVA-02's official MIM layout (``q_proj``/``k_proj``/``v_proj`` split, ``mlp.w1``..
``w3`` and ``ffn_ln``, plus the pretraining-only ``mask_token``, ``norm`` and ``lm_head``, which the
``eva02`` loader drops as it does for the real release).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fishertune.backbones import build_backbone
from fishertune.backbones.weights import TINY_DIR, file_sha256, read_state_dict
from fishertune.errors import UserError
from fishertune.pretrain.loop import Recipe, RecipeConfig, to_tensor
from fishertune.pretrain.world import WorldPool, colour_jitter, random_resized_crop

TEACHER = "clip-tiny"


class EVA02Config(RecipeConfig):
    steps: int = Field(1500, gt=0, description="optimiser steps")
    batch_size: int = Field(64, gt=0, description="crops per step")
    lr: float = Field(1.5e-3, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas (EVA-02: 0.9, 0.98)")
    mask_ratio: float = Field(0.4, gt=0, lt=1, description="share of patches masked, block-wise (EVA-02: 0.4)")
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="RandomResizedCrop area range")


def block_mask(rng: np.random.Generator, grid: int, ratio: float) -> np.ndarray:
    """BEiT's block-wise mask: random rectangles (area 2..16 patches, aspect 0.3..3.3) until
    ``ratio`` of the ``grid x grid`` patches are masked."""
    mask = np.zeros((grid, grid), dtype=bool)
    goal = int(round(ratio * grid * grid))
    for _ in range(100):
        if mask.sum() >= goal:
            break
        area = rng.uniform(2, max(min(16, goal - mask.sum()), 2))
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h = max(1, min(grid, int(round(math.sqrt(area * aspect)))))
        w = max(1, min(grid, int(round(math.sqrt(area / aspect)))))
        y, x = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
        mask[y : y + h, x : x + w] = True
    return mask.reshape(-1)


class EVA02Trainer(nn.Module):
    def __init__(self, cfg: EVA02Config, teacher: Path):
        super().__init__()
        self.backbone = build_backbone("eva02-tiny", pretrained=False, img_size=cfg.image_size)
        dim = self.backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.teacher = build_backbone(TEACHER, weights=teacher, img_size=cfg.image_size).eval().requires_grad_(False)
        state = read_state_dict(teacher)
        self.register_buffer("teacher_ln_w", state["visual.ln_post.weight"].float())
        self.register_buffer("teacher_ln_b", state["visual.ln_post.bias"].float())
        self.register_buffer("teacher_proj", state["visual.proj"].float())
        self.lm_head = nn.Linear(dim, self.teacher_proj.shape[1])

    @torch.no_grad()
    def targets(self, x: torch.Tensor) -> torch.Tensor:
        t = self.teacher._embed(x)
        for block in self.teacher.blocks:
            t = block(t)
        t = F.layer_norm(t[:, 1:], (t.shape[-1],), self.teacher_ln_w, self.teacher_ln_b)
        return t @ self.teacher_proj

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        eva = self.backbone.eva
        t = eva.patch_embed(x)  # B x H x W x C (dynamic size)
        w = mask.view(t.shape[:3])[..., None].to(t.dtype)
        t = t * (1 - w) + self.mask_token.view(1, 1, 1, -1) * w
        t, rope = eva._pos_embed(t)
        t = eva.norm_pre(t)
        for block in eva.blocks:
            t = block(t, rope=rope)
        pred = self.lm_head(self.norm(t[:, eva.num_prefix_tokens :]))
        target = self.targets(x)
        cos = F.cosine_similarity(pred[mask], target[mask], dim=-1)
        return -cos.mean()


class EVA02Recipe(Recipe):
    name = "eva02"
    backbone = "eva02-tiny"
    version = 1
    Config = EVA02Config
    needs = (TEACHER,)

    def __init__(self, cfg: EVA02Config | None = None, teacher_dir: Path = TINY_DIR):
        super().__init__(cfg)
        self.teacher = Path(teacher_dir) / f"{TEACHER}.safetensors"

    def _teacher(self) -> Path:
        if not self.teacher.is_file():
            raise UserError(f"eva02-tiny distils CLIP-tiny, but {self.teacher} is missing; run "
                            f"`fishertune tiny pretrain {TEACHER}` first (or --all, which orders them)")
        return self.teacher

    def extra_identity(self) -> dict:
        return {"teacher": {"backbone": TEACHER, "sha256": file_sha256(self._teacher())}}

    def build(self) -> nn.Module:
        return EVA02Trainer(self.cfg, self._teacher())

    def loss(self, trainer: EVA02Trainer, pool: WorldPool, rng: np.random.Generator, step: int) -> torch.Tensor:
        cfg = self.cfg
        idx = rng.integers(0, len(pool), cfg.batch_size)
        crops = np.stack([colour_jitter(random_resized_crop(pool.image(i), cfg.image_size, rng, scale=cfg.crop_scale),
                                        rng, strength=0.2) for i in idx])
        grid = cfg.image_size // trainer.backbone.patch_size
        mask = torch.from_numpy(np.stack([block_mask(rng, grid, cfg.mask_ratio) for _ in idx]))
        return trainer(to_tensor(crops), mask)

    def export(self, trainer: EVA02Trainer) -> dict[str, torch.Tensor]:
        """EVA-02's official MIM layout (see the module docstring)."""
        out: dict[str, torch.Tensor] = {}
        renames = ((".mlp.fc1_g.", ".mlp.w1."), (".mlp.fc1_x.", ".mlp.w2."), (".mlp.norm.", ".mlp.ffn_ln."),
                   (".mlp.fc2.", ".mlp.w3."))
        for key, value in trainer.backbone.eva.state_dict().items():
            if key.endswith(".attn.qkv.weight"):
                prefix = key[: -len("qkv.weight")]
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}{name}_proj.weight"] = part
                continue
            for old, new in renames:
                key = key.replace(old, new)
            out[key] = value
        out["mask_token"] = trainer.mask_token.detach()
        out.update({f"norm.{k}": v for k, v in trainer.norm.state_dict().items()})
        out.update({f"lm_head.{k}": v for k, v in trainer.lm_head.state_dict().items()})
        return out
