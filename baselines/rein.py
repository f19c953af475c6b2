"""Rein (Wei et al., CVPR 2024, "Stronger, Fewer, & Superior"): learnable tokens refine every block's features.

Rein's public code (``rein/models/backbones/reins.py``, class ``LoRAReins``, as configured in
``configs/_base_/models/rein_dinov2_mask2former.py``: ``token_length=100``, ``lora_dim=16``,
``link_token_to_query=True``, ``scale_init=0.001``, softmax on, ``zero_mlp_delta_f=False``). After every
block ``i``, on the patch tokens f (class token left out):

    T_i = A_i B_i                                    (T x C tokens, A_i: T x r, B_i: r x C)
    S   = softmax(f T_i^T / sqrt(C))                 (N x T)
    d   = mlp_delta_f(S[:, 1:] mlp_token2feat(T_i[1:]) + f)
    f  <- f + s * d                                  (s learnable, initialised at 1e-3)

The first token's column is dropped from the product (it takes part in the softmax only), and the two
MLPs (single linear layers in Rein) are shared by all layers. The tokens of all layers are linked to the
Mask2Former queries (``fishertune.heads.query_link``): max-, mean- and last-layer pooled, merged into
the 100 query embeddings; the head's own query embeddings are removed. Initialisation as Rein: A and B
uniform in +-sqrt(6 / (3 p^2 + sqrt(C r))) (p the patch size), the MLPs kaiming-uniform (a = sqrt(5)),
biases PyTorch's default. The same code runs on every family through the backbone's token extension
(``fishertune.backbones.base``); on SAM, which has no class token, every token is a patch token (as
Rein's ``has_cls_token=False`` path).

Trainable (backbone side), ViT-L (C = 1024, 24 layers, Q = 256):
A 24x100x16 + B 24x16x1024 + 2 x (1024^2 + 1024) + scale 1 + transform 1024x256+256 + merge 768x256+256
= 38,400 + 393,216 + 2,099,200 + 1 + 262,400 + 196,864 = 2,990,081 (the paper's 2.99M). The head's
``querys2feat`` (256x256+256) counts on the head side, as in Rein.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fishertune.backbones.base import TokenExtension
from fishertune.heads.query_link import LayerMerge, link_queries, query_hook
from fishertune.tuning import MethodConfig, TuningMethod, register_method


class ReinConfig(MethodConfig):
    tokens: int | None = Field(None, gt=0, description="learnable tokens per layer (Rein's token_length, 100); "
                                                       "None: one per query of the decode head, which they "
                                                       "must equal since tokens become queries")
    rank: int = Field(16, gt=0, description="rank r of the tokens, T_i = A_i B_i (Rein's LoRAReins lora_dim, 16)")
    scale_init: float = Field(1e-3, description="initial value of the learnable scale s on the refinement "
                                                "(Rein's scale_init, 0.001)")


class ReinTokens(TokenExtension):
    """Rein's tokens, shared MLPs and scale; ``refine`` is the per-block update of the module docstring."""

    refines = True

    def __init__(self, layers: int, dim: int, patch_size: int, tokens: int, rank: int, scale_init: float,
                 query_dim: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.dim = dim
        self.tokens_a = nn.Parameter(torch.empty(layers, tokens, rank, **factory))
        self.tokens_b = nn.Parameter(torch.empty(layers, rank, dim, **factory))
        self.scale = nn.Parameter(torch.tensor(float(scale_init), **factory))
        self.mlp_token2feat = nn.Linear(dim, dim, **factory)
        self.mlp_delta_f = nn.Linear(dim, dim, **factory)
        self.link = LayerMerge(dim, query_dim, **factory)
        val = math.sqrt(6.0 / (3 * patch_size * patch_size + math.sqrt(dim * rank)))
        for t in (self.tokens_a, self.tokens_b):
            nn.init.uniform_(t, -val, val)

    def layer_tokens(self) -> torch.Tensor:
        """All layers' tokens, ``(L, T, C)``."""
        return self.tokens_a @ self.tokens_b

    def refine(self, i: int, patches: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens_a[i] @ self.tokens_b[i]  # (T, C)
        attn = F.softmax(patches @ tokens.to(patches.dtype).T * self.dim**-0.5, dim=-1)  # (B, N, T)
        delta = attn[..., 1:] @ self.mlp_token2feat(tokens[1:]).to(patches.dtype)
        return patches + self.scale * self.mlp_delta_f(delta + patches)

    def queries_embedding(self, batch_size: int) -> torch.Tensor:
        """The query embeddings for the head, ``(T, Q)`` (the same for every image)."""
        return self.link(self.layer_tokens())


@register_method
class Rein(TuningMethod):
    """Rein; see the module docstring."""

    name = "rein"
    paper = "https://arxiv.org/abs/2312.04265"
    Config = ReinConfig

    def apply(self, segmentor, ctx) -> None:
        cfg: ReinConfig = self.cfg
        backbone = segmentor.backbone
        tokens, query_dim = query_hook(segmentor.head, self.name, cfg.tokens)
        backbone.requires_grad_(False)
        ref = next(backbone.parameters())
        rein = ReinTokens(backbone.num_layers, backbone.embed_dim, backbone.patch_size, tokens, cfg.rank,
                          cfg.scale_init, query_dim, device=ref.device, dtype=ref.dtype)
        backbone.set_token_extension(rein)
        link_queries(segmentor.head, rein.queries_embedding)
