"""The backbone interface every vision foundation model family implements (DESIGN section 3).

A backbone is an ``nn.Module`` with ``embed_dim``, ``patch_size``, ``num_layers``, ``blocks`` (the
ordered transformer blocks, which a tuning method may wrap or replace in place) and
``forward_features(x) -> list[Tensor]``: the token maps of four chosen layers rescaled to four strides,
as Rein feeds its decode head (x4, x2, x1 and x0.5 of the patch grid, i.e. strides 4/8/16/32 for
patch 16). ``qkv()`` says where each attention keeps its query, key and value weights, so methods and
selectors can address q, k and v without knowing the family; ``mlp_norm(i)`` is the norm whose output
feeds block ``i``'s MLP (its input is the block's residual stream before the MLP branch), so methods can
hook the MLP branch without knowing the block's internals.

Token extensions. Methods that work on the token sequence (VPT's prompts, VQT's query tokens, Rein's
per-layer refinement) install one :class:`TokenExtension` with :meth:`Backbone.set_token_extension`;
every family's block loop then calls it around each block, so a method is written once for all five
families. Per block ``i`` (see :class:`TokenExtension`):

* prompts ``(B, P, C)`` join the block's input; every token attends to them; their outputs are dropped;
* queries ``(B, T, C)`` join the block's input and attend to every token (themselves included), but no
  other token attends to them, so the frozen tokens are unchanged; their outputs go back to the
  extension;
* ``refine`` maps the block's output patch tokens ``(B, N, C)`` (prefix tokens left out) to new ones.

Sequence families (timm ViTs, EVA-02, open_clip) put the extra tokens right after the prefix tokens
(class token), as VPT does, and pass a boolean attention mask only when there are queries. EVA-02's
rotary embedding skips prefix tokens; the extra tokens get the identity rotation (sin 0, cos 1), so they
carry no position, like the class token. SAM's windowed (B, H, W, C) blocks run their attention through
``fishertune.backbones.sam``'s own extension path (see that module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


class TokenExtension(nn.Module):
    """Per-block hooks on the token sequence (module docstring); subclasses override what they use.

    Installed as the backbone's submodule ``token_extension``, so its parameters count on the backbone
    side, as the paper's "Trainable Params" column counts Rein's tokens and VPT's prompts.
    """

    #: whether :meth:`refine` changes anything (the block loop skips the split and join otherwise)
    refines: bool = False

    def prompts(self, i: int, batch: int) -> torch.Tensor | None:
        """``(batch, P, C)`` tokens every token of block ``i`` attends to; dropped after the block."""
        return None

    def queries(self, i: int, batch: int) -> torch.Tensor | None:
        """``(batch, T, C)`` tokens that read every token of block ``i`` and are read by none."""
        return None

    def take_query_outputs(self, i: int, out: torch.Tensor) -> None:
        """Receives block ``i``'s output for the query tokens, ``(batch, T, C)``."""

    def refine(self, i: int, patches: torch.Tensor) -> torch.Tensor:
        """Block ``i``'s output patch tokens ``(batch, N, C)`` -> new ones (only if :attr:`refines`)."""
        return patches


#: ``call(block, tokens, n_extra, mask) -> tokens``: runs one block of a sequence family
BlockCall = Callable[[nn.Module, torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]


class Backbone(nn.Module):
    """Base class: subclasses set the attributes below and implement the abstract methods."""

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

    num_prefix_tokens: int = 0

    def get_token_extension(self) -> TokenExtension | None:
        """The installed :class:`TokenExtension`, or ``None``."""
        return self._modules.get("token_extension")  # type: ignore[return-value]

    def set_token_extension(self, extension: TokenExtension) -> None:
        """Install ``extension`` (one per backbone: two token methods cannot be stacked)."""
        if self.get_token_extension() is not None:
            raise ValueError(f"this backbone already has a token extension "
                             f"({type(self.get_token_extension()).__name__}); methods using one cannot be combined")
        self.add_module("token_extension", extension)

    def run_sequence_block(self, i: int, block: nn.Module, t: torch.Tensor, call: BlockCall) -> torch.Tensor:
        """Run block ``i`` on ``t`` ``(B, L, C)`` (``num_prefix_tokens`` prefix tokens first), applying the
        token extension; ``call`` runs the block with ``n_extra`` tokens inserted after the prefix and an
        optional boolean attention mask (True = may attend)."""
        ext = self.get_token_extension()
        if ext is None:
            return call(block, t, 0, None)
        b, npt = t.shape[0], self.num_prefix_tokens
        prompts, queries = ext.prompts(i, b), ext.queries(i, b)
        p = 0 if prompts is None else prompts.shape[1]
        q = 0 if queries is None else queries.shape[1]
        if p or q:
            extra = [x.to(t.dtype) for x in (prompts, queries) if x is not None]
            t = torch.cat([t[:, :npt], *extra, t[:, npt:]], dim=1)
            mask = None
            if q:  # no token reads the queries, except the queries themselves (built on the device: no host copy)
                position = torch.arange(t.shape[1], device=t.device)
                query = (position >= npt + p) & (position < npt + p + q)
                mask = ~query[None, :] | query[:, None]
            t = call(block, t, p + q, mask)
            if q:
                ext.take_query_outputs(i, t[:, npt + p : npt + p + q])
            t = torch.cat([t[:, :npt], t[:, npt + p + q :]], dim=1)
        else:
            t = call(block, t, 0, None)
        if ext.refines:
            t = torch.cat([t[:, :npt], ext.refine(i, t[:, npt:])], dim=1)
        return t

    @staticmethod
    def multiscale(maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Rescale four same-stride maps by :data:`FEATURE_SCALES` (bilinear), as Rein does."""
        out = []
        for fmap, scale in zip(maps, FEATURE_SCALES):
            if scale != 1.0:
                fmap = F.interpolate(fmap, scale_factor=scale, mode="bilinear", align_corners=False)
            out.append(fmap)
        return out
