"""VQT (Tu et al., CVPR 2023, "Visual Query Tuning"): query tokens that read every layer without changing it.

VQT's method (its Sec. 3 and Fig. 2): at every block ``i``, T learnable query tokens Q_i are appended to
the block's input; they attend to the keys and values of all tokens (their own included) and go through
the block's MLP, while no frozen token attends to them, so the backbone's own features are exactly the
frozen model's. The query outputs Z_i of every layer summarise that layer and feed the prediction head.
Query tokens are initialised as VPT's prompts, uniform in +-sqrt(6 / (3 p^2 + C)).

Assumption (how the query outputs reach a dense head): VQT was written for classification, where the
Z_i are concatenated and fed to a linear classifier. For segmentation we feed them to the Mask2Former
queries the way Rein feeds its tokens (``fishertune.heads.query_link``): with T equal to the head's
number of queries (100), the outputs of all layers ``(B, L, T, C)`` are projected to the head's width,
pooled over the layers (max, mean, last) and merged into per-image query embeddings, from which the
head's ``querys2feat`` makes the query content. The segmentation features the head reads are the frozen
backbone's. So VQT differs from Rein in that its queries are read-only summaries of the image rather
than refinements of the features. A head without a query hook is refused.

Families: the timm ViTs, EVA-02 (queries get no rotary position, like the class token) and CLIP append
the queries to the sequence with an attention mask (``fishertune.backbones.base``); on SAM the queries
read the keys/values of all windows of their image (``fishertune.backbones.sam``).

Trainable (backbone side), ViT-L with T = 100, Q = 256: queries 24 x 100 x 1024 = 2,457,600, transform
1024x256+256 = 262,400, merge 768x256+256 = 196,864; total 2,916,864 (2.92M). The paper prints 3.01M for
VQT without its configuration; that would need about 104 query tokens per layer with this link.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from fishertune.backbones.base import TokenExtension
from fishertune.heads.query_link import LayerMerge, link_queries, query_hook
from fishertune.tuning import MethodConfig, TuningMethod, register_method


class VQTConfig(MethodConfig):
    tokens: int | None = Field(None, gt=0, description="query tokens per layer; None: one per query of the decode "
                                                       "head (100 for Mask2Former), which they must equal "
                                                       "since their outputs become the head's queries "
                                                       "(our assumption, see the module docstring)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the query tokens (as VPT's prompt dropout; 0.0)")


class QueryTokens(TokenExtension):
    """Per-layer read-only query tokens; keeps the outputs of the last forward for the head."""

    def __init__(self, layers: int, tokens: int, dim: int, patch_size: int, dropout: float, query_dim: int,
                 device=None, dtype=None):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.empty(layers, tokens, dim, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout)
        self.link = LayerMerge(dim, query_dim, device=device, dtype=dtype)
        val = math.sqrt(6.0 / (3 * patch_size * patch_size + dim))
        nn.init.uniform_(self.query_tokens, -val, val)
        self._outputs: dict[int, torch.Tensor] = {}

    def queries(self, i: int, batch: int) -> torch.Tensor:
        if i == 0:
            self._outputs = {}
        return self.dropout(self.query_tokens[i]).unsqueeze(0).expand(batch, -1, -1)

    def take_query_outputs(self, i: int, out: torch.Tensor) -> None:
        self._outputs[i] = out

    def queries_embedding(self, batch_size: int) -> torch.Tensor:
        """Per-image query embeddings ``(B, T, Q)`` from the last backbone forward's query outputs."""
        if len(self._outputs) != self.query_tokens.shape[0]:
            raise RuntimeError("VQT: the head asked for queries before the backbone ran every layer")
        outputs, self._outputs = self._outputs, {}
        stacked = torch.stack([outputs[i] for i in sorted(outputs)], dim=1)  # (B, L, T, C)
        if stacked.shape[0] != batch_size:
            raise RuntimeError(f"VQT: query outputs for {stacked.shape[0]} images, head batch {batch_size}")
        return self.link(stacked)


@register_method
class VQT(TuningMethod):
    """Visual query tuning; see the module docstring."""

    name = "vqt"
    paper = "https://arxiv.org/abs/2212.03220"
    Config = VQTConfig

    def apply(self, segmentor, ctx) -> None:
        cfg: VQTConfig = self.cfg
        backbone = segmentor.backbone
        tokens, query_dim = query_hook(segmentor.head, self.name, cfg.tokens)
        backbone.requires_grad_(False)
        ref = next(backbone.parameters())
        vqt = QueryTokens(backbone.num_layers, tokens, backbone.embed_dim, backbone.patch_size, cfg.dropout,
                          query_dim, device=ref.device, dtype=ref.dtype)
        backbone.set_token_extension(vqt)
        link_queries(segmentor.head, vqt.queries_embedding)
