"""The backbone interface every vision foundation model family implements (DESIGN section 3).

A backbone is an ``nn.Module`` with ``embed_dim``, ``patch_size``, ``num_layers``, ``blocks`` (the
ordered transformer blocks, which a tuning method may wrap or replace in place) and
``forward_features(x) -> list[Tensor]``: the token maps of four chosen layers rescaled to four strides,
as Rein feeds its decode head (x4, x2, x1 and x0.5 of the patch grid, i.e. strides 4/8/16/32 for
patch 16). ``qkv()`` says where each attention keeps its query, key and value weights, so methods and
selectors can address q, k and v without knowing the family; ``mlp_norm(i)`` is the norm whose output
feeds block ``i``'s MLP (its input is the block's residual stream before the MLP branch), so methods can
hook the MLP branch without knowing the block's internals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: rescale factors applied to the four selected layers' token maps (Rein: 4x, 2x, 1x, 0.5x)
FEATURE_SCALES = (4.0, 2.0, 1.0, 0.5)


@dataclass(frozen=True)
class QKV:
    """Where one attention layer keeps its fused q/k/v projection.

    ``getattr(module, weight)`` is a ``(3 * dim, in)`` tensor whose rows ``[0:dim]`` are the query,
    ``[dim:2*dim]`` the key and ``[2*dim:3*dim]`` the value projection (fused ``qkv`` in timm and SAM,
    ``in_proj_weight`` in open_clip); ``bias`` names the matching bias or is ``None``.
    """

    block: int
    module: nn.Module
    weight: str
    bias: str | None
    dim: int

    def rows(self, which: str) -> slice:
        """Row slice of ``which`` in ``"qkv"`` inside the fused weight."""
        i = "qkv".index(which)
        return slice(i * self.dim, (i + 1) * self.dim)


def default_out_indices(depth: int) -> tuple[int, ...]:
    """Rein's layers 7, 11, 15, 23 for 24-layer models; four evenly spaced layers otherwise."""
    if depth == 24:
        return (7, 11, 15, 23)
    if depth < 4:
        raise ValueError(f"a backbone needs at least 4 layers for 4 feature levels, got {depth}")
    return tuple(round((i + 1) * depth / 4) - 1 for i in range(4))


class Backbone(nn.Module):
    """Base class: subclasses set the attributes below and implement ``tokens_to_maps`` inputs."""

    family: str
    embed_dim: int
    patch_size: int
    num_layers: int
    out_indices: tuple[int, ...]
    blocks: nn.Module

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def qkv(self) -> list[QKV]:  # pragma: no cover - abstract
        raise NotImplementedError

    def mlp_norm(self, i: int) -> nn.Module:  # pragma: no cover - abstract
        """The norm whose output feeds block ``i``'s MLP, called once per block forward."""
        raise NotImplementedError

    @staticmethod
    def multiscale(maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Rescale four same-stride maps by :data:`FEATURE_SCALES` (bilinear), as Rein does."""
        out = []
        for fmap, scale in zip(maps, FEATURE_SCALES):
            if scale != 1.0:
                fmap = F.interpolate(fmap, scale_factor=scale, mode="bilinear", align_corners=False)
            out.append(fmap)
        return out
