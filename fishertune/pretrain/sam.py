"""SAM-tiny: class-agnostic masks from point prompts (Kirillov et al., 2023, https://arxiv.org/abs/2304.02643).

As SAM's training, scaled to the miniature, with segment-anything's own modules:

* the image encoder is the ``sam-tiny`` backbone (segment-anything's ``ImageEncoderViT`` with windowed
  and global blocks) with SAM's neck (two convolutions to a 64-channel image embedding);
* the prompt encoder and the mask decoder are segment-anything's ``PromptEncoder`` and ``MaskDecoder``
  (a two-way transformer of 2 blocks, width 64; SAM's has 2 blocks of width 256), with SAM's three
  multimask outputs and its IoU-prediction head;
* per scene, ``prompts`` segments of the crop are drawn (class-agnostic: the world's connected regions,
  never a class id); each gets one positive point uniformly inside it, and, for half of the scenes, a
  second one; a one-point prompt is ambiguous, so as in SAM only the best of the three multimask
  outputs is trained; a two-point prompt trains the single-mask output;
* loss: SAM's focal loss (weight 20) plus dice loss (weight 1) of the low-resolution masks (4x the
  embedding grid) against the segment resized to them, plus the mean squared error of the predicted
  IoU.

Simplifications: no box or mask prompts and no iterative re-prompting from the error region (SAM's 11
interactive rounds); no data engine. The file holds a whole miniature SAM in the official layout
(``image_encoder.*`` with its neck, ``prompt_encoder.*``, ``mask_decoder.*``); the ``sam`` loader keeps
the image encoder without its neck, as for SAM-H.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fishertune.backbones import build_backbone
from fishertune.pretrain.loop import Recipe, RecipeConfig, to_tensor
from fishertune.pretrain.world import WorldPool, colour_jitter, random_resized_crop


class SAMConfig(RecipeConfig):
    steps: int = Field(1200, gt=0, description="optimiser steps")
    batch_size: int = Field(32, gt=0, description="scenes per step")
    lr: float = Field(1.0e-3, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (SAM: 0.9, 0.999)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (SAM: 0.1)")
    prompts: int = Field(4, gt=0, description="segments prompted per scene")
    min_pixels: int = Field(12, gt=0, description="least pixels of a segment in the crop to be prompted")
    crop_scale: tuple[float, float] = Field((0.3, 1.0), description="RandomResizedCrop area range")


class SAMTrainer(nn.Module):
    def __init__(self, cfg: SAMConfig):
        super().__init__()
        from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

        self.backbone = build_backbone("sam-tiny", pretrained=False, img_size=cfg.image_size, neck=True)
        channels = self.backbone.encoder.neck[0].out_channels
        grid = cfg.image_size // self.backbone.patch_size
        self.prompt_encoder = PromptEncoder(embed_dim=channels, image_embedding_size=(grid, grid),
                                            input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=16)
        self.mask_decoder = MaskDecoder(
            transformer_dim=channels, num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=64,
            transformer=TwoWayTransformer(depth=2, embedding_dim=channels, num_heads=4, mlp_dim=4 * channels))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss per mask (mean over pixels), as SAM's training uses."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid().flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


class SAMRecipe(Recipe):
    name = "sam"
    backbone = "sam-tiny"
    version = 1
    Config = SAMConfig

    def build(self) -> nn.Module:
        return SAMTrainer(self.cfg)

    def loss(self, trainer: SAMTrainer, pool: WorldPool, rng: np.random.Generator, step: int) -> torch.Tensor:
        cfg = self.cfg
        images, prompts = [], []
        while len(images) < cfg.batch_size:
            i = int(rng.integers(len(pool)))
            crop, seg = random_resized_crop(pool.image(i), cfg.image_size, rng, scale=cfg.crop_scale,
                                            segments=pool.segments(i))
            ids, counts = np.unique(seg[seg > 0], return_counts=True)
            ids = ids[counts >= cfg.min_pixels]
            if not len(ids):
                continue
            chosen = rng.choice(ids, min(cfg.prompts, len(ids)), replace=False)
            two = rng.random() < 0.5
            points, masks = [], []
            for s in chosen:
                ys, xs = np.nonzero(seg == s)
                picks = rng.choice(len(xs), 2 if two else 1)
                points.append([(xs[k] + 0.5, ys[k] + 0.5) for k in picks])  # pixel centres, (x, y) as SAM
                masks.append(seg == s)
            images.append(colour_jitter(crop, rng, strength=0.2))
            prompts.append((torch.tensor(points, dtype=torch.float32), torch.from_numpy(np.stack(masks))))
        embeddings = trainer.backbone.encoder(to_tensor(np.stack(images)))
        image_pe = trainer.prompt_encoder.get_dense_pe()
        total = []
        for emb, (points, masks) in zip(embeddings, prompts):
            labels = torch.ones(points.shape[:2], dtype=torch.long)
            sparse, dense = trainer.prompt_encoder(points=(points, labels), boxes=None, masks=None)
            low, iou_pred = trainer.mask_decoder.predict_masks(emb[None], image_pe, sparse, dense)
            target = F.interpolate(masks[:, None].float(), size=low.shape[-2:], mode="area")
            target = (target > 0.5).float()
            if points.shape[1] == 1:  # ambiguous: the best of the three multimask outputs
                low, iou_pred = low[:, 1:], iou_pred[:, 1:]
            else:
                low, iou_pred = low[:, :1], iou_pred[:, :1]
            per_mask = 20 * focal_loss(low, target.expand_as(low)) + dice_loss(low, target.expand_as(low))
            best = per_mask.argmin(dim=1)
            rows = torch.arange(len(best))
            with torch.no_grad():
                hard = (low[rows, best] > 0).float()
                t = target[:, 0]
                iou = (hard * t).flatten(1).sum(1) / ((hard + t).clamp(max=1).flatten(1).sum(1) + 1e-6)
            total.append(per_mask[rows, best].mean() + F.mse_loss(iou_pred[rows, best], iou))
        return torch.stack(total).mean()

    def export(self, trainer: SAMTrainer) -> dict[str, torch.Tensor]:
        """A whole miniature SAM in the official layout (``sam_vit_h_4b8939.pth``'s key names)."""
        state = {f"image_encoder.{k}": v for k, v in trainer.backbone.encoder.state_dict().items()}
        state.update({f"prompt_encoder.{k}": v for k, v in trainer.prompt_encoder.state_dict().items()})
        state.update({f"mask_decoder.{k}": v for k, v in trainer.mask_decoder.state_dict().items()})
        return state
