"""Deep VPT (Jia et al., ECCV 2022, "Visual Prompt Tuning"): new learnable prompt tokens at every layer.

VPT-deep (the paper's Eq. 2 and its code, ``src/models/vit_prompt/vit.py``, ``incorporate_prompt`` and
``forward_deep_prompt``): before every block ``i`` the P prompts of that layer are inserted after the
class token, ``[x_cls, P_i, x_patches]``; after the block the prompt outputs are discarded, and the
next layer inserts its own ``P_{i+1}`` ("replaced at every layer"). The features passed to the decode
head are the patch tokens only. Prompts are initialised uniform in +-sqrt(6 / (3 p^2 + C)) (p the patch
size; VPT's xavier-style init), and VPT's prompt dropout (``MODEL.PROMPT.DROPOUT``, 0.0 by default)
is applied to them. 150 prompts per layer (FisherTune's comparison).

Families: on the timm ViTs, EVA-02 and CLIP the prompts really are inserted into the sequence by the
backbone's token extension (``fishertune.backbones.base``); on EVA-02 they get no rotary position, like
the class token. SAM has no sequence and splits its tokens into 14x14 windows: there the prompts are
extra keys/values of every window (each window's tokens read all of the layer's prompts, with no
relative-position bias). Because VPT-deep discards the prompts' outputs, the prompts act on the other
tokens only as keys and values of the attention, so this is the same computation as inserting the
prompts into every window (``fishertune.backbones.sam``, ``SamBlock.forward_extended``).

Trainable (backbone side): layers x P x C; ViT-L 24 x 150 x 1024 = 3,686,400 (the paper's 3.69M).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from fishertune.backbones.base import TokenExtension
from fishertune.tuning import MethodConfig, TuningMethod, register_method


class VPTConfig(MethodConfig):
    prompts: int = Field(150, gt=0, description="prompt tokens per layer (150 in the FisherTune/Rein comparison; "
                                                "VPT's MODEL.PROMPT.NUM_TOKENS)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the prompts (VPT's MODEL.PROMPT.DROPOUT, "
                                                        "default 0.0)")


class DeepPrompts(TokenExtension):
    """One set of ``P`` prompts per layer, given to the block and dropped after it."""

    def __init__(self, layers: int, prompts: int, dim: int, patch_size: int, dropout: float,
                 device=None, dtype=None):
        super().__init__()
        self.prompt_tokens = nn.Parameter(torch.empty(layers, prompts, dim, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout)
        val = math.sqrt(6.0 / (3 * patch_size * patch_size + dim))
        nn.init.uniform_(self.prompt_tokens, -val, val)

    def prompts(self, i: int, batch: int) -> torch.Tensor:
        return self.dropout(self.prompt_tokens[i]).unsqueeze(0).expand(batch, -1, -1)


@register_method
class VPT(TuningMethod):
    """Deep visual prompt tuning; see the module docstring."""

    name = "vpt"
    paper = "https://arxiv.org/abs/2203.12119"
    Config = VPTConfig

    def apply(self, segmentor, ctx) -> None:
        cfg: VPTConfig = self.cfg
        backbone = segmentor.backbone
        backbone.requires_grad_(False)
        ref = next(backbone.parameters())
        backbone.set_token_extension(DeepPrompts(backbone.num_layers, cfg.prompts, backbone.embed_dim,
                                                 backbone.patch_size, cfg.dropout, device=ref.device,
                                                 dtype=ref.dtype))
