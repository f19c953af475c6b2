"""AdaptFormer (Chen et al., 2022): a parallel bottleneck adapter beside the MLP of every block.

AdaptFormer's code (ShoufaChen/AdaptFormer, ``models/custom_modules.py`` ``Block.forward`` and
``models/adapter.py``, run with ``ffn_option="parallel"``, ``ffn_adapter_layernorm_option="none"``,
``ffn_adapter_init_option="lora"``, ``ffn_adapter_scalar="0.1"``, ``ffn_num=64``, dropout 0.1) computes

    x = x + attn(norm1(x))
    x = x + drop_path(MLP(norm2(x))) + s * up(dropout(relu(down(x))))

so the adapter reads the residual stream *before* the MLP's norm (``x``, not ``norm2(x)``), has no norm
of its own, and its branch passes through neither drop path nor layer scale (their ViT has no layer
scale). Down projection kaiming-uniform (a = sqrt(5)) with zero bias; up projection and its bias zero,
so the model starts as the frozen one.

Mechanism, the same for every family: ``Backbone.mlp_norm(i)`` is the norm feeding block ``i``'s MLP;
a forward pre-hook on it records its input (the adapter's input), and a forward hook on the block adds
``s * adapter(recorded)`` to the block's output (after the block's own layer scale and drop path, which
therefore do not touch the adapter branch, as in AdaptFormer). The adapter lives in the block as
``blocks[i].adaptformer``, so it is part of the backbone's parameters and of its checkpoints.

Trainable (backbone side): blocks x (width x b + b + b x width + width); ViT-L 24 x (1024 x 64 + 64 +
64 x 1024 + 1024) = 3,171,840 (the paper's 3.17M).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from fishertune.tuning import MethodConfig, TuningMethod, register_method


class AdaptFormerConfig(MethodConfig):
    bottleneck: int = Field(64, gt=0, description="hidden width of each adapter (AdaptFormer's ffn_num, 64 in "
                                                  "their image experiments and in the FisherTune comparison)")
    scale: float = Field(0.1, ge=0, description="factor s on the adapter branch (AdaptFormer's "
                                                "ffn_adapter_scalar, 0.1)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout after the adapter's ReLU (AdaptFormer's "
                                                        "Adapter(dropout=0.1))")


class Adapter(nn.Module):
    """``x -> s * up(dropout(relu(down(x))))``, up projection zero-initialised."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        with torch.no_grad():  # AdaptFormer's init_option="lora"
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self._input: torch.Tensor | None = None  # the pre-MLP residual stream of the current block call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(self.act(self.down(x))))

    def record(self, norm: nn.Module, args: tuple) -> None:
        """Forward pre-hook on the block's pre-MLP norm: keep its input."""
        self._input = args[0]

    def add(self, block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the block: its output plus the adapter branch of the recorded input."""
        x, self._input = self._input, None
        if x is None:
            raise RuntimeError("AdaptFormer: the block ran without calling its pre-MLP norm")
        return output + self(x)


@register_method
class AdaptFormer(TuningMethod):
    """Parallel MLP adapters in every block; see the module docstring."""

    name = "adaptformer"
    paper = "https://arxiv.org/abs/2205.13535"
    Config = AdaptFormerConfig

    def apply(self, segmentor, ctx) -> None:
        cfg: AdaptFormerConfig = self.cfg
        backbone = segmentor.backbone
        backbone.requires_grad_(False)
        ref = next(backbone.parameters())
        for i, block in enumerate(backbone.blocks):
            adapter = Adapter(backbone.embed_dim, cfg.bottleneck, cfg.scale, cfg.dropout,
                              device=ref.device, dtype=ref.dtype)
            block.adaptformer = adapter
            backbone.mlp_norm(i).register_forward_pre_hook(adapter.record)
            block.register_forward_hook(adapter.add)
