"""LoRA (Hu et al., 2021): low-rank updates of the query and value projections of every block.

Every attention's fused q/k/v weight (``Backbone.qkv()``: timm's and SAM's ``attn.qkv.weight``,
open_clip's ``nn.MultiheadAttention.in_proj_weight``) is reparametrised with
``torch.nn.utils.parametrize`` as

    W' = W + (alpha / r) * [B_q A_q ; 0 ; B_v A_v]

(rows q, k, v), A of shape (r, in) initialised kaiming-uniform (a = sqrt(5), as LoRA's and PEFT's
code), B of shape (dim, r) zero, so the model starts as the frozen one and the key rows never change.
The frozen W is kept as it is (``parametrizations.<name>.original``); the attention modules' own
forwards read the parametrised weight, so every family works without touching its code.
:meth:`LoRA.merge` folds the update into the weights for inference.

Dropout on the LoRA input (PEFT's ``lora_dropout``; default 0.0 here as in PEFT) cannot be expressed
through a weight: for ``nn.Linear`` slots it is added by a forward hook that corrects the output to
``W x + s B A dropout(x)`` in training; open_clip's ``nn.MultiheadAttention`` computes its projection
internally, so a non-zero dropout on a CLIP backbone is refused with a user error.

Trainable (backbone side): blocks x 2 x (r x in + dim x r); ViT-L 24 x 2 x (8 x 1024 + 1024 x 8) = 786,432
(the paper's 0.79M).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from fishertune.errors import UserError
from fishertune.tuning import MethodConfig, TuningMethod, register_method


class LoRAConfig(MethodConfig):
    rank: int = Field(8, gt=0, description="rank r of the low-rank update of the query and value projections "
                                           "(LoRA paper Sec. 4; 8 in the FisherTune/Rein comparison)")
    alpha: float = Field(8.0, gt=0, description="scaling numerator: the update is multiplied by alpha / rank "
                                                "(LoRA Sec. 4.1; alpha = rank gives a scale of 1)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch's input (PEFT's lora_dropout, "
                                                        "default 0.0 there too); only for nn.Linear q/k/v "
                                                        "projections, not CLIP's nn.MultiheadAttention")


class LoRAParametrization(nn.Module):
    """``W -> W + scale * [B_q A_q ; 0 ; B_v A_v]`` on the rows of a fused (3 * dim, in) q/k/v weight."""

    def __init__(self, weight: torch.Tensor, dim: int, rank: int, scale: float):
        super().__init__()
        if weight.ndim != 2 or weight.shape[0] != 3 * dim:
            raise ValueError(f"expected a fused (3 * {dim}, in) q/k/v weight, got {tuple(weight.shape)}")
        factory = {"device": weight.device, "dtype": weight.dtype}
        fan_in = weight.shape[1]
        self.dim, self.rank, self.scale = dim, rank, scale
        self.hook = None  # the dropout hook's handle on the module, if any
        self.lora_A_q = nn.Parameter(torch.empty(rank, fan_in, **factory))
        self.lora_B_q = nn.Parameter(torch.zeros(dim, rank, **factory))
        self.lora_A_v = nn.Parameter(torch.empty(rank, fan_in, **factory))
        self.lora_B_v = nn.Parameter(torch.zeros(dim, rank, **factory))
        for a in (self.lora_A_q, self.lora_A_v):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        dq = self.lora_B_q @ self.lora_A_q
        dv = self.lora_B_v @ self.lora_A_v
        return weight + self.scale * torch.cat([dq, torch.zeros_like(dq), dv], dim=0)


def _dropout_hook(p: float):
    """Forward hook of a parametrised ``nn.Linear``: output += s * B A (dropout(x) - x) on q and v columns."""

    def hook(module: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        lora: LoRAParametrization = module.parametrizations.weight[0]
        x = args[0]
        d = F.dropout(x, p, training=True) - x
        dq = (d @ lora.lora_A_q.t()) @ lora.lora_B_q.t()
        dv = (d @ lora.lora_A_v.t()) @ lora.lora_B_v.t()
        return output + lora.scale * torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)

    return hook


@register_method
class LoRA(TuningMethod):
    """LoRA on the query and value projections of every block; see the module docstring."""

    name = "lora"
    paper = "https://arxiv.org/abs/2106.09685"
    Config = LoRAConfig

    def apply(self, segmentor, ctx) -> None:
        cfg: LoRAConfig = self.cfg
        backbone = segmentor.backbone
        backbone.requires_grad_(False)
        slots = backbone.qkv()
        if cfg.dropout > 0:
            bad = sorted({type(s.module).__name__ for s in slots if not isinstance(s.module, nn.Linear)})
            if bad:
                raise UserError(f"method 'lora' config field 'dropout': {cfg.dropout} needs nn.Linear q/k/v "
                                f"projections, but backbone {backbone.family!r} has {', '.join(bad)}; set dropout: 0.0")
        for slot in slots:
            weight = getattr(slot.module, slot.weight)
            lora = LoRAParametrization(weight, slot.dim, cfg.rank, cfg.alpha / cfg.rank)
            parametrize.register_parametrization(slot.module, slot.weight, lora)
            if cfg.dropout > 0:
                lora.hook = slot.module.register_forward_hook(_dropout_hook(cfg.dropout))

    def merge(self, segmentor) -> None:
        """Fold every update into its weight (W <- W + delta) and remove the LoRA modules, for inference."""
        for slot in segmentor.backbone.qkv():
            if parametrize.is_parametrized(slot.module, slot.weight):
                for p in getattr(slot.module.parametrizations, slot.weight):
                    if getattr(p, "hook", None) is not None:
                        p.hook.remove()
                parametrize.remove_parametrizations(slot.module, slot.weight, leave_parametrized=True)
