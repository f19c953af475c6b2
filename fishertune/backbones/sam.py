"""SAM (Kirillov et al., 2023) image encoder, built with segment-anything's own ``ImageEncoderViT``.

Official file: ``sam_vit_h_4b8939.pth``, a plain ``torch.save`` of the whole ``Sam`` model's state_dict:
``image_encoder.*`` (``patch_embed.proj.*`` 16x16 kernel; ``pos_embed`` (1, 64, 64, 1280), the absolute
position grid of 1024/16; ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.lin1,mlp.lin2}.*``;
``blocks.N.attn.rel_pos_h``/``rel_pos_w``, (127, 80) in the global-attention blocks 7/15/23/31 and
(27, 80) in the 14x14-window blocks; ``neck.*``, two convolutions to SAM's 256-channel embedding),
plus ``prompt_encoder.*`` and ``mask_decoder.*`` (SAM's prompt-driven mask head). The loader keeps
``image_encoder.*`` and drops ``prompt_encoder.*``/``mask_decoder.*`` by name; ``neck.*`` is dropped
by name too unless the variant is built with ``neck=True``. A file holding only the image encoder's
keys (with or without the ``image_encoder.`` prefix) and ``.safetensors`` exports load the same way.

Conversion to Rein's setting (512x512 input, patch 16, so a 32x32 token grid):
- the 64x64 absolute position grid is resized to 32x32 as a (1, H, W, C) map, bicubic, antialiased
  (``timm.layers.resample_abs_pos_embed_nhwc``, timm's converter for its own SAM ViTs);
- relative-position tables are resized to the length the model holds, linearly along the table, the
  interpolation segment-anything's own ``get_rel_pos`` applies on the fly. The windowed blocks keep
  2*14-1 = 27 rows (the window is 14 at any input size). For the global blocks see ``rel_pos_grid``:
  by default ``sam-h`` keeps the official 2*64-1 = 127 rows and ``get_rel_pos`` interpolates them to
  2*32-1 = 63 at every forward; ``rel_pos_grid=None`` sizes them for the model's own grid instead and
  the loader resizes 127 -> 63 once. Both give identical outputs (the same ``F.interpolate`` call on the
  same table); they differ in the parameter count and in what full fine-tuning updates. The default
  is the one whose count is the paper's 632.18M "Full" (see ``test_full_size_counts``).
- a patch kernel of another size (only when the caller asks for a patch size other than 16) is
  resampled with ``timm.layers.resample_patch_embed``.
``img_size=1024`` is SAM's native setting and needs no resampling.

Windows: at 512 the 32x32 grid is not a multiple of the 14x14 window; segment-anything's
``window_partition`` pads it with zeros (after ``norm1``) on the bottom/right to 42x42 (3x3 windows,
padded tokens take part as keys, unmasked) and crops back afterwards - exactly as SAM itself does at
1024 (64 -> 70). Inputs of another size than ``img_size`` are accepted: the position grid is resized
to them on the fly (same bicubic resampling) and ``get_rel_pos`` handles the global tables.

Features: SAM's blocks work on (B, H, W, C) token maps with no class token; the outputs of blocks
``out_indices`` (default 7/15/23/31) are permuted to (B, C, H, W). The neck is not part of the
backbone (Rein-style decode heads take the block outputs).

Attention: segment-anything's ``Attention`` computes softmax(q k^T * scale + decomposed relative
position bias) explicitly. By default (``attention="sdpa"``) the blocks compute the same through
PyTorch's ``scaled_dot_product_attention`` with the decomposed bias (segment-anything's own function)
as ``attn_mask``, so that a GPU runs its fused memory-efficient kernel; equal to the explicit path up
to float rounding (tested). ``attention="explicit"`` runs segment-anything's own ``Block.forward``.

Token extensions (VPT prompts, VQT queries, Rein; see ``fishertune.backbones.base``): SAM has no token
sequence to insert tokens into, and its windows would split any inserted token. ``SamBlock.forward_extended``
therefore works at the attention: prompts are extra keys/values of every window (each window's tokens
read all of the image's prompts, with no relative-position bias), which is exactly what deep VPT's
inserted prompts contribute, since their own outputs are discarded; queries read the keys/values of
all windows of their image plus their own and go through the block's MLP. This path computes attention
with SDPA and the decomposed bias as ``attn_mask`` (segment-anything's own bias function), equal to the
plain path up to float rounding; a test checks that with empty extensions.

Assumption - stochastic depth: segment-anything's ``Block`` has no drop path and Rein publishes no SAM
configuration. ``drop_path_rate`` defaults to 0.1 for ``sam-h``, the value Rein's CLIP ViT-L config
uses, rising linearly from 0 at block 0 to the rate at the last block (as Rein's CLIP). It is applied
per sample to each of the two residual branches of a block (timm/Rein semantics) by giving each
upstream ``Block`` the subclass :class:`SamBlock` (same parameters and state_dict keys; with
``attention="explicit"``, in eval mode or at rate 0, it runs segment-anything's own ``Block.forward``). ``sam-tiny`` defaults to 0.0.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fishertune.backbones.base import QKV, Backbone, default_out_indices
from fishertune.backbones.registry import register_backbone
from fishertune.backbones.weights import load_strict, read_state_dict

#: SAM's parts other than the image encoder, in the official whole-model file
NON_ENCODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")
ENCODER_PREFIX = "image_encoder."
_REL_POS = re.compile(r"blocks\.\d+\.attn\.rel_pos_[hw]$")


def _extended_attention(attn: nn.Module, x: torch.Tensor, prompts: torch.Tensor | None,
                        windows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """segment-anything's ``Attention.forward`` on ``x`` ``(B*windows, h, w, C)`` with extra keys/values.

    ``prompts`` ``(B, P, C)`` (already normed) are read by every window of their image, with no
    relative-position bias. Returns the attention output ``(B*windows, h, w, C)`` after ``proj`` and
    the windows' keys and values ``(B*windows, heads, h*w, d)`` (for query tokens that read them).
    """
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    bw, h, w, _ = x.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(x).reshape(bw, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = None
    if attn.use_rel_pos:  # SAM's decomposed bias, computed by its own function on a zero score map
        zero = q.new_zeros(bw * heads, h * w, h * w)
        bias = add_decomposed_rel_pos(zero, q.reshape(bw * heads, h * w, -1), attn.rel_pos_h, attn.rel_pos_w,
                                      (h, w), (h, w)).view(bw, heads, h * w, h * w)
    keys, values = k, v
    if prompts is not None:
        _, pk, pv = attn.qkv(prompts).reshape(prompts.shape[0], -1, 3, heads, k.shape[-1]).permute(2, 0, 3, 1, 4)
        keys = torch.cat([k, pk.repeat_interleave(windows, dim=0)], dim=2)
        values = torch.cat([v, pv.repeat_interleave(windows, dim=0)], dim=2)
        if bias is not None:
            bias = F.pad(bias, (0, pk.shape[2]))
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)  # scale d^-0.5, SAM's attn.scale
    return attn.proj(out.transpose(1, 2).reshape(bw, h, w, -1)), k, v


@lru_cache(maxsize=None)
def _sam_block_class() -> type:
    """segment-anything's ``Block`` plus drop path (built on first use: segment-anything imports torchvision)."""
    from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition

    class SamBlock(Block):
        """segment-anything's ``Block`` with per-sample drop path on both residual branches in training,
        and :meth:`forward_extended` for token extensions."""

        drop_path: nn.Module
        sdpa: bool = True  # attention through F.scaled_dot_product_attention; False: segment-anything's own

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.sdpa:
                return self.forward_extended(x, None, None)[0]
            if not self.training or isinstance(self.drop_path, nn.Identity):
                return super().forward(x)
            # Block.forward with the two branch outputs passed through drop_path
            shortcut = x
            x = self.norm1(x)
            if self.window_size > 0:
                h, w = x.shape[1], x.shape[2]
                x, pad_hw = window_partition(x, self.window_size)
            x = self.attn(x)
            if self.window_size > 0:
                x = window_unpartition(x, self.window_size, pad_hw, (h, w))
            x = shortcut + self.drop_path(x)
            return x + self.drop_path(self.mlp(self.norm2(x)))

        def forward_extended(self, x: torch.Tensor, prompts: torch.Tensor | None,
                             queries: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
            """The block with prompt tokens (read by every window) and query tokens (reading every window).

            Prompts: each window's tokens attend to the image's ``P`` prompts besides the window's own
            tokens (deep VPT inserted into every window; the prompts' own outputs would be dropped, so
            they are not computed). Queries: each attends to the keys/values of all windows of its
            image (zero-padded window tokens included, as SAM's windows include them) and to the
            queries' own, then passes through the block's MLP like any token; nothing reads them.
            Returns the block output and the query outputs (or ``None``).
            """
            b, h, w, _ = x.shape
            drop = self.drop_path if self.training else nn.Identity()
            shortcut = x
            x = self.norm1(x)
            pad_hw = (h, w)
            if self.window_size > 0:
                x, pad_hw = window_partition(x, self.window_size)
            windows = x.shape[0] // b
            prompts = None if prompts is None else self.norm1(prompts.to(x.dtype))
            x, k, v = _extended_attention(self.attn, x, prompts, windows)
            if self.window_size > 0:
                x = window_unpartition(x, self.window_size, pad_hw, (h, w))
            x = shortcut + drop(x)
            x = x + drop(self.mlp(self.norm2(x)))
            if queries is None:
                return x, None
            heads = self.attn.num_heads
            t = queries.shape[1]
            qq, qk, qv = self.attn.qkv(self.norm1(queries.to(x.dtype))).reshape(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4)
            # all windows' keys/values of an image side by side: (B, heads, windows*h*w + T, d)
            keys = torch.cat([k.reshape(b, windows, heads, -1, k.shape[-1]).transpose(1, 2).flatten(2, 3), qk], dim=2)
            values = torch.cat([v.reshape(b, windows, heads, -1, v.shape[-1]).transpose(1, 2).flatten(2, 3), qv], dim=2)
            out = F.scaled_dot_product_attention(qq, keys, values)
            y = queries.to(x.dtype) + drop(self.attn.proj(out.transpose(1, 2).reshape(b, t, -1)))
            return x, y + drop(self.mlp(self.norm2(y)))

    SamBlock.__module__ = __name__
    SamBlock.__qualname__ = "SamBlock"
    return SamBlock


def __getattr__(name: str):
    # ``fishertune.backbones.sam.SamBlock`` resolves lazily (so pickling a built model finds the class)
    if name == "SamBlock":
        return _sam_block_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class SamBackbone(Backbone):
    """Wraps segment-anything's ``ImageEncoderViT`` (neck removed unless kept) behind the interface."""

    family = "sam"

    def __init__(self, encoder: nn.Module, out_indices: tuple[int, ...] | None = None):
        super().__init__()
        self.encoder = encoder
        proj = encoder.patch_embed.proj
        self.embed_dim = proj.out_channels
        self.patch_size = proj.kernel_size[0]
        self.num_layers = len(encoder.blocks)
        self.out_indices = tuple(out_indices or default_out_indices(self.num_layers))

    @property
    def blocks(self) -> nn.Module:  # type: ignore[override]
        return self.encoder.blocks

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        enc = self.encoder
        t = enc.patch_embed(x)  # (B, H, W, C)
        if enc.pos_embed is not None:
            pos = enc.pos_embed
            if pos.shape[1:3] != t.shape[1:3]:
                from timm.layers import resample_abs_pos_embed_nhwc

                pos = resample_abs_pos_embed_nhwc(pos, list(t.shape[1:3]))
            t = t + pos
        maps = []
        ext = self.get_token_extension()
        for i, block in enumerate(self.blocks):
            if ext is None:
                t = block(t)
            else:
                t = self._extended_block(ext, i, block, t)
            if i in self.out_indices:
                maps.append(t.permute(0, 3, 1, 2).contiguous())
        return self.multiscale(maps)

    @staticmethod
    def _extended_block(ext, i: int, block: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """Block ``i`` with the token extension (see ``SamBlock.forward_extended``); ``t`` is (B, H, W, C)."""
        b = t.shape[0]
        prompts, queries = ext.prompts(i, b), ext.queries(i, b)
        if prompts is None and queries is None:
            t = block(t)
        else:
            t, out = block.forward_extended(t, prompts, queries)
            if out is not None:
                ext.take_query_outputs(i, out)
        if ext.refines:
            t = ext.refine(i, t.flatten(1, 2)).view_as(t)
        return t

    def qkv(self) -> list[QKV]:
        return [
            QKV(block=i, module=blk.attn.qkv, weight="weight", bias="bias" if blk.attn.qkv.bias is not None else None,
                dim=self.embed_dim)
            for i, blk in enumerate(self.encoder.blocks)
        ]

    def mlp_norm(self, i: int) -> nn.Module:
        """The norm feeding block ``i``'s MLP (see :meth:`Backbone.mlp_norm`)."""
        return self.encoder.blocks[i].norm2


def _sam(
    img_size: int,
    patch_size: int,
    drop_path_rate: float,
    neck: bool,
    rel_pos_grid: int | None,
    *,
    embed_dim: int,
    depth: int,
    num_heads: int,
    window_size: int,
    global_attn_indexes: tuple[int, ...],
    out_chans: int = 256,
    out_indices: tuple[int, ...] | None = None,
    attention: str = "sdpa",
) -> SamBackbone:
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    encoder = ImageEncoderViT(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        mlp_ratio=4.0, out_chans=out_chans, qkv_bias=True, norm_layer=_layer_norm_eps6, act_layer=nn.GELU,
        use_abs_pos=True, use_rel_pos=True, window_size=window_size, global_attn_indexes=tuple(global_attn_indexes),
    )
    if not neck:
        encoder.neck = nn.Identity()
    head_dim = embed_dim // num_heads
    if rel_pos_grid is not None and rel_pos_grid != img_size // patch_size:
        for i in global_attn_indexes:  # tables sized for rel_pos_grid (zeros, as segment-anything initialises)
            attn = encoder.blocks[i].attn
            attn.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_grid - 1, head_dim))
            attn.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_grid - 1, head_dim))
    if attention not in ("sdpa", "explicit"):
        raise ValueError(f"attention: 'sdpa' or 'explicit', got {attention!r}")
    block_cls = _sam_block_class()
    for i, blk in enumerate(encoder.blocks):
        blk.sdpa = attention == "sdpa"
        rate = drop_path_rate * i / (depth - 1) if depth > 1 else drop_path_rate
        blk.__class__ = block_cls  # adds no parameters: state_dict keys stay segment-anything's
        if rate > 0:
            from timm.layers import DropPath

            blk.drop_path = DropPath(rate)
        else:
            blk.drop_path = nn.Identity()
    return SamBackbone(encoder, out_indices=out_indices)


def _layer_norm_eps6(dim: int) -> nn.LayerNorm:
    """SAM's ``partial(nn.LayerNorm, eps=1e-6)`` (build_sam.py)."""
    return nn.LayerNorm(dim, eps=1e-6)


def load_sam(backbone: SamBackbone, path: Path) -> None:
    """Load an official SAM file (whole model, or image encoder only) into ``backbone.encoder``."""
    state = read_state_dict(path)
    if any(k.startswith(ENCODER_PREFIX) for k in state):
        state = {k[len(ENCODER_PREFIX):] if k.startswith(ENCODER_PREFIX) else k: v
                 for k, v in state.items() if not k.startswith(NON_ENCODER_PREFIXES)}
    enc = backbone.encoder
    own = enc.state_dict()
    state = dict(state)

    kernel = state.get("patch_embed.proj.weight")
    want = own["patch_embed.proj.weight"]
    if kernel is not None and kernel.ndim == 4 and kernel.shape[-2:] != want.shape[-2:]:
        from timm.layers import resample_patch_embed

        state["patch_embed.proj.weight"] = resample_patch_embed(kernel, list(want.shape[-2:]))

    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.ndim == 4 and pos.shape[1:3] != own["pos_embed"].shape[1:3]:
        from timm.layers import resample_abs_pos_embed_nhwc

        state["pos_embed"] = resample_abs_pos_embed_nhwc(pos, list(own["pos_embed"].shape[1:3]))

    for key, table in list(state.items()):
        if _REL_POS.match(key) and key in own and table.ndim == 2 and table.shape[0] != own[key].shape[0]:
            state[key] = resize_rel_pos(table, own[key].shape[0])

    has_neck = any(k.startswith("neck.") for k in own)
    ignore = () if has_neck else tuple(k for k in state if k.startswith("neck."))
    load_strict(enc, state, path, ignore=ignore)


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Resize an (L, C) relative-position table to ``length`` rows, linearly, as ``get_rel_pos`` does."""
    out = F.interpolate(table.float().t().unsqueeze(0), size=length, mode="linear")
    return out[0].t().to(table.dtype).contiguous()


@register_backbone("sam-h", family="sam", weights="sam_vit_h_4b8939.pth", loader=load_sam)
def sam_huge(img_size: int = 512, patch_size: int = 16, drop_path_rate: float = 0.1, neck: bool = False,
             rel_pos_grid: int | None = 64, **kwargs) -> SamBackbone:
    """SAM ViT-H image encoder: 32 blocks, width 1280, 16 heads, 14x14 windows, global blocks 7/15/23/31.

    ``rel_pos_grid``: the token grid the global blocks' relative-position tables are sized for; 64 (the
    official 1024/16 tables, interpolated at each forward) or None (the model's own grid).
    """
    return _sam(img_size, patch_size, drop_path_rate, neck, rel_pos_grid, embed_dim=1280, depth=32, num_heads=16,
                window_size=14, global_attn_indexes=(7, 15, 23, 31), **kwargs)


@register_backbone("sam-tiny", family="sam", weights="sam-tiny.safetensors", loader=load_sam, shipped=True)
def sam_tiny(img_size: int = 64, patch_size: int = 8, drop_path_rate: float = 0.0, neck: bool = False,
             rel_pos_grid: int | None = None, **kwargs) -> SamBackbone:
    """The miniature's SAM: the same classes, 6 blocks of width 128, 4 heads, global blocks 2 and 5;
    pretrained on promptable class-agnostic masks (``fishertune tiny pretrain sam-tiny``,
    :mod:`fishertune.pretrain.sam`).

    Window 3 (not 4) so that the 8x8 grid at 64 px is padded to 9x9 (3x3 windows), as SAM-H's 32x32
    grid is padded to 42x42 (3x3 windows of 14) at 512; blocks 2 and 5 take the global path (every third
    block, as SAM-H's every eighth).
    """
    shape = {"out_chans": 64, "embed_dim": 128, "depth": 6, "num_heads": 4, "window_size": 3,
             "global_attn_indexes": (2, 5), **kwargs}  # a test may build other shapes
    return _sam(img_size, patch_size, drop_path_rate, neck, rel_pos_grid, **shape)
