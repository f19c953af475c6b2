"""CLIP-tiny: image-text contrastive pretraining (Radford et al., 2021, https://arxiv.org/abs/2103.00020).

As CLIP / open_clip's training, scaled to the miniature:

* each scene of the pretraining world comes with a caption generated from its contents and style
  (:func:`fishertune.pretrain.world.caption_of`: "dusk foggy plain street seen from high with a bus,
  two cars and trees"); one random crop of 50-100% of the scene's area is the image;
* the image tower is open_clip's ``VisionTransformer`` (the ``clip-tiny`` backbone, QuickGELU as
  OpenAI's CLIP) whose class token goes through CLIP's ``ln_post`` and ``proj`` to a 64-d embedding;
* the text tower is open_clip's ``TextTransformer`` (3 blocks of width 64, causal mask, the end token's
  output projected to 64-d, as CLIP's) over a word-level vocabulary of the captions' words (CLIP: a
  49k byte-pair vocabulary), context 32 tokens;
* the loss is CLIP's symmetric cross-entropy over the batch's image-text similarities, scaled by a
  learned temperature (initialised at 1/0.07, clamped at 100).

Simplifications: captions are template sentences over a few dozen words; captions of different scenes
can coincide (the batch's duplicates count as negatives, as in CLIP's noisy web data). The file is a
whole miniature CLIP in OpenAI's layout: the image tower (``visual.*`` with ``ln_post`` and ``proj``),
the text tower and ``logit_scale``; the ``clip`` loader keeps the image tower without ``ln_post`` and
``proj``, as Rein does with the real one. EVA-02-tiny's recipe reads the whole image tower as its
teacher.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fishertune.backbones import build_backbone
from fishertune.pretrain.loop import Recipe, RecipeConfig, to_tensor
from fishertune.pretrain.world import WorldPool, colour_jitter, random_resized_crop, vocabulary

#: token ids: 0 pads, 1 starts, the last ends (open_clip pools the end token as the highest id: argmax)
PAD, START = 0, 1


class Tokenizer:
    """Word-level tokens for the world's captions: ``[START] words... [END] pad``."""

    def __init__(self, context: int):
        self.words = vocabulary()
        self.ids = {w: i + 2 for i, w in enumerate(self.words)}
        self.end = len(self.words) + 2
        self.size = self.end + 1
        self.context = context

    def __call__(self, captions: list[str]) -> torch.Tensor:
        out = torch.full((len(captions), self.context), PAD, dtype=torch.long)
        for row, text in enumerate(captions):
            words = text.replace(",", " ").split()
            unknown = [w for w in words if w not in self.ids]
            if unknown:
                raise ValueError(f"caption word(s) outside the vocabulary: {unknown}")
            ids = [START, *(self.ids[w] for w in words)][: self.context - 1] + [self.end]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


class CLIPConfig(RecipeConfig):
    steps: int = Field(1200, gt=0, description="optimiser steps")
    batch_size: int = Field(96, gt=0, description="image-caption pairs per step (the contrastive batch)")
    lr: float = Field(1.0e-3, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas (CLIP: 0.9, 0.98)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (CLIP: 0.2)")
    embed_dim: int = Field(64, gt=0, description="joint embedding width")
    text_width: int = Field(64, gt=0, description="text tower width")
    text_layers: int = Field(3, gt=0, description="text tower blocks")
    context: int = Field(32, gt=0, description="text context length in tokens")
    crop_scale: tuple[float, float] = Field((0.5, 1.0), description="RandomResizedCrop area range of the image")


class CLIPTrainer(nn.Module):
    def __init__(self, cfg: CLIPConfig, vocab_size: int):
        super().__init__()
        from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer

        self.backbone = build_backbone("clip-tiny", pretrained=False, img_size=cfg.image_size)
        width = self.backbone.embed_dim
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(width ** -0.5 * torch.randn(width, cfg.embed_dim))
        self.text = TextTransformer(context_length=cfg.context, vocab_size=vocab_size, width=cfg.text_width,
                                    heads=4, layers=cfg.text_layers, output_dim=cfg.embed_dim, pad_id=PAD,
                                    act_layer=QuickGELU)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        t = b._embed(x)
        for block in b.blocks:
            t = block(t)
        return self.ln_post(t[:, 0]) @ self.proj

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.text(tokens), dim=-1)
        logits = self.logit_scale.clamp(max=np.log(100)).exp() * img @ txt.t()
        target = torch.arange(len(img))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class CLIPRecipe(Recipe):
    name = "clip"
    backbone = "clip-tiny"
    version = 1
    Config = CLIPConfig

    def __init__(self, cfg: CLIPConfig | None = None):
        super().__init__(cfg)
        self.tokenizer = Tokenizer(self.cfg.context)

    def build(self) -> nn.Module:
        return CLIPTrainer(self.cfg, self.tokenizer.size)

    def loss(self, trainer: CLIPTrainer, pool: WorldPool, rng: np.random.Generator, step: int) -> torch.Tensor:
        cfg = self.cfg
        idx = rng.choice(len(pool), cfg.batch_size, replace=False)
        crops = np.stack([colour_jitter(random_resized_crop(pool.image(i), cfg.image_size, rng, scale=cfg.crop_scale,
                                                            flip=True), rng, strength=0.1) for i in idx])
        return trainer(to_tensor(crops), self.tokenizer([pool.captions[i] for i in idx]))

    def export(self, trainer: CLIPTrainer) -> dict[str, torch.Tensor]:
        """A whole CLIP in OpenAI's key layout: ``visual.*`` (with ``ln_post`` and ``proj``), the text tower
        (``token_embedding``, ``positional_embedding``, ``transformer.resblocks.*``, ``ln_final``,
        ``text_projection``) and ``logit_scale``."""
        state = dict(trainer.backbone.state_dict())  # visual.* (ln_post is an identity there, proj None)
        state["visual.ln_post.weight"] = trainer.ln_post.weight.detach()
        state["visual.ln_post.bias"] = trainer.ln_post.bias.detach()
        state["visual.proj"] = trainer.proj.detach()
        state.update({k: v for k, v in trainer.text.state_dict().items() if k != "attn_mask"})
        state["logit_scale"] = trainer.logit_scale.detach()
        return state
