"""EVA-02 (Fang et al., 2023) through timm's ``Eva`` class: EVA02-L/14 pretrained by MIM on Merged-38M.

Architecture (EVA-02's ``eva02_large_patch14_xattn_fusedLN_NaiveSwiGLU_subln_RoPE`` = timm's
``eva02_large_patch14_224`` = Rein's ``rein_eva02-L_mask2former.py`` backbone): 24 pre-norm blocks of
width 1024, 16 heads, LayerNorm eps 1e-6, q and v biases but no k bias, SwiGLU MLP of hidden width
``int(1024 * 4 * 2/3) = 2730`` with a LayerNorm before its output projection (EVA-02's "sub-LN",
timm's ``swiglu_mlp=True, scale_mlp=True``), learned absolute position embedding with a class token,
and 2-D rotary position embedding on the patch tokens (not the class token) in every attention. The
rotary frequencies are those of the 16x16 pretraining grid (224/14; Rein's ``pt_hw_seq_len=16``)
interpolated to the run's grid (Rein's ``intp_freq=True``, timm's ``ref_feat_shape=(16, 16)``).

Sub-LN in attention: EVA-02's MIM models have none. In EVA-02's own code (``asuka/modeling_finetune.py``)
and in Rein's copy (``rein/models/backbones/eva_02.py``) ``subln=True`` only splits ``qkv`` into
``q_proj/k_proj/v_proj`` and adds ``mlp.ffn_ln``; the attention output goes straight to ``proj``.
The ``attn.inner_attn_ln`` norm exists only in EVA-CLIP's vision towers (timm's ``*_clip_*`` variants,
``scale_attn_inner=True``); timm's ``eva02_large_patch14_224`` (which loads the same MIM release)
leaves it off, and so do we. A file carrying ``inner_attn_ln`` keys is therefore refused as not this
model.

Fused q/k/v: the model is built with ``qkv_fused=True``, so every block holds one ``attn.qkv``
(``nn.Linear(1024, 3072, bias=False)``, rows q, k, v) like the other timm families and
:meth:`Eva02Backbone.qkv` addresses it the same way. EVA's biases live beside it, in the parameters
``attn.q_bias`` and ``attn.v_bias``; the key has no bias (timm's zero, non-persistent ``attn.k_bias``
buffer), hence ``QKV.bias is None``. Each attention is set to add the bias after calling
``attn.qkv(x)`` (timm's ``qkv_bias_separate``) instead of reading ``qkv.weight`` into one
``F.linear``: the module is then really called, so a method that wraps or hooks ``attn.qkv`` takes
effect (the result is the same up to float rounding).

Official files (EVA-02's release, baaivision/EVA ``EVA-02/asuka``): ``eva02_L_pt_m38m_p14.pt`` — a pickle of the
state dict, possibly nested under ``module`` or ``model`` (unwrapped by
:func:`~fishertune.backbones.weights.read_state_dict`), keys:

* ``cls_token`` (1, 1, 1024), ``pos_embed`` (1, 1 + 16*16, 1024), ``patch_embed.proj.weight``
  (1024, 3, 14, 14) and ``.bias``;
* per block ``blocks.N.norm1.*``, ``attn.q_proj.weight``, ``attn.k_proj.weight``,
  ``attn.v_proj.weight`` (1024, 1024 each, no bias), ``attn.q_bias``, ``attn.v_bias``,
  ``attn.proj.*``, ``norm2.*``, ``mlp.w1.*`` (gate), ``mlp.w2.*``, ``mlp.ffn_ln.*``, ``mlp.w3.*``;
* pretraining-only: ``mask_token``, ``norm.*`` (the final norm before the MIM head; features are
  taken before it, as Rein does, so the backbone has none), ``lm_head.*`` (the MIM regression head),
  and the fixed rotary tables ``rope.freqs_cos/freqs_sin`` — stored again under every block as
  ``blocks.N.attn.rope.freqs_*`` because EVA-02 registers the one rope module in each attention.

``eva02_L_pt_m38m_p14to16.pt`` (EVA-02's release for dense tasks) has the same keys with the patch kernel
already interpolated to 16x16; Rein's ``tools/convert_models/convert_eva2_512x512.py`` also resizes the
position grid to 32x32. Any source kernel or grid size is handled by shape; ``.safetensors`` exports load
too.

Conversion (:func:`convert_eva02`): the pretraining-only keys are dropped by name; ``q_proj``,
``k_proj`` and ``v_proj`` of a block are concatenated (rows q, k, v) into ``attn.qkv.weight``;
``mlp.w1 -> mlp.fc1_g``, ``w2 -> fc1_x``, ``ffn_ln -> norm``, ``w3 -> fc2`` (timm's names, as in
timm's ``checkpoint_filter_fn``); a patch kernel of another size is resampled with
``timm.layers.resample_patch_embed`` and a position grid of another size resized with
``timm.layers.resample_abs_pos_embed`` (both bicubic, antialiased, as for DINOv2; Rein's own converter
interpolates the kernel directly instead), whatever the source sizes are. Everything else must match
exactly (:func:`~fishertune.backbones.weights.load_strict`).

Assumptions: stochastic depth 0.2 (Rein's config), no layer scale (``init_values=None``), runs at 512
with patch 16 (Rein), ``patch_size=14`` keeps the native patching (then use an image size divisible by
14). Features: blocks 7, 11, 15, 23 (Rein's ``out_indices``), class token dropped.
"""

from __future__ import annotations

from functools import partial

import math
import re
from pathlib import Path

import torch
from torch import nn

from fishertune.backbones.base import QKV, Backbone, default_out_indices
from fishertune.backbones.registry import register_backbone
from fishertune.backbones.weights import load_strict, read_state_dict

#: the pretraining grid of EVA-02 (224 / 14) the rotary frequencies refer to (Rein: ``pt_hw_seq_len=16``)
REF_FEAT_SHAPE = (16, 16)

#: keys of the official release that only MIM pretraining uses (see the module docstring)
PRETRAIN_ONLY = re.compile(
    r"^(mask_token|norm\.(weight|bias)|lm_head\.(weight|bias)|(blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin))$"
)

#: official SwiGLU names -> timm's
_MLP_RENAMES = ((".mlp.w1.", ".mlp.fc1_g."), (".mlp.w2.", ".mlp.fc1_x."), (".mlp.ffn_ln.", ".mlp.norm."),
                (".mlp.w3.", ".mlp.fc2."))
_QKV_PROJ = re.compile(r"^(blocks\.\d+\.attn\.)([qkv])_proj\.weight$")


def eva02_model(img_size: int, patch_size: int, **arch) -> nn.Module:
    """A timm ``Eva`` with EVA-02's MIM options, fused q/k/v, no final norm or head, any input size."""
    from timm.models.eva import Eva

    return Eva(
        img_size=img_size, patch_size=patch_size, num_classes=0, global_pool="",
        qkv_bias=True, qkv_fused=True, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True,
        scale_attn_inner=False, use_abs_pos_emb=True, use_rot_pos_emb=True, ref_feat_shape=REF_FEAT_SHAPE,
        init_values=None, use_post_transformer_norm=False, use_fc_norm=False, dynamic_img_size=True, **arch,
    )


def _call_block(block: nn.Module, t: torch.Tensor, n_extra: int, mask: torch.Tensor | None,
                rope: torch.Tensor | None) -> torch.Tensor:
    """One EVA block; ``n_extra`` tokens after the prefix get the identity rotation (sin 0, cos 1)."""
    if n_extra and rope is not None:
        sin, cos = rope.chunk(2, dim=-1)  # timm's "cat" layout: [sin, cos] along the last axis
        shape = (*rope.shape[:-2], n_extra, sin.shape[-1])
        rope = torch.cat([torch.cat([sin.new_zeros(shape), sin], dim=-2),
                          torch.cat([cos.new_ones(shape), cos], dim=-2)], dim=-1)
    return block(t, rope=rope, attn_mask=mask)


class Eva02Backbone(Backbone):
    """Wraps a timm ``Eva`` (built by :func:`eva02_model`) behind the backbone interface."""

    def __init__(self, eva: nn.Module, family: str = "eva02", out_indices: tuple[int, ...] | None = None):
        super().__init__()
        self.eva = eva
        self.family = family
        self.embed_dim = eva.embed_dim
        self.patch_size = eva.patch_embed.patch_size[0]
        self.num_layers = len(eva.blocks)
        self.out_indices = tuple(out_indices or default_out_indices(self.num_layers))
        self.num_prefix_tokens = eva.num_prefix_tokens
        for blk in eva.blocks:
            # call attn.qkv(x) and add [q_bias, 0, v_bias] after it (see the module docstring)
            blk.attn.qkv_bias_separate = True

    @property
    def blocks(self) -> nn.Module:  # type: ignore[override]
        return self.eva.blocks

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = x.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        eva = self.eva
        t = eva.patch_embed(x)
        t, rope = eva._pos_embed(t)  # tokens with class token and absolute positions; rotary table
        t = eva.norm_pre(t)
        maps = []
        for i, block in enumerate(eva.blocks):
            t = self.run_sequence_block(i, block, t, partial(_call_block, rope=rope))
            if i in self.out_indices:
                patches = t[:, self.num_prefix_tokens :, :]
                maps.append(patches.transpose(1, 2).reshape(b, self.embed_dim, gh, gw))
        return self.multiscale(maps)

    def qkv(self) -> list[QKV]:
        # biases: attn.q_bias and attn.v_bias (parameters); the key has none
        return [QKV(block=i, module=blk.attn.qkv, weight="weight", bias=None, dim=self.embed_dim)
                for i, blk in enumerate(self.eva.blocks)]

    def mlp_norm(self, i: int) -> nn.Module:
        """The norm feeding block ``i``'s MLP (see :meth:`Backbone.mlp_norm`)."""
        return self.eva.blocks[i].norm2


def convert_eva02(state: dict[str, torch.Tensor], eva: nn.Module) -> dict[str, torch.Tensor]:
    """The official EVA-02 layout -> ``eva``'s state dict (see the module docstring)."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    out: dict[str, torch.Tensor] = {}
    proj: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if PRETRAIN_ONLY.match(key):
            continue
        m = _QKV_PROJ.match(key)
        if m:
            proj.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        for old, new in _MLP_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    for prefix, parts in proj.items():
        shapes = {tuple(p.shape) for p in parts.values()}
        if len(parts) == 3 and len(shapes) == 1 and len(next(iter(shapes))) == 2:
            out[prefix + "qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        else:  # incomplete or inconsistent: keep the names so that the strict load names them
            out.update({f"{prefix}{which}_proj.weight": p for which, p in parts.items()})

    kernel = out.get("patch_embed.proj.weight")
    target = tuple(eva.patch_embed.proj.weight.shape[-2:])
    if kernel is not None and kernel.ndim == 4 and tuple(kernel.shape[-2:]) != target:
        out["patch_embed.proj.weight"] = resample_patch_embed(kernel, list(target), interpolation="bicubic",
                                                              antialias=True)
    pos = out.get("pos_embed")
    prefix_tokens = eva.num_prefix_tokens
    grid = tuple(eva.patch_embed.grid_size)
    if pos is not None and pos.ndim == 3 and pos.shape[1] != eva.pos_embed.shape[1]:
        side = math.isqrt(pos.shape[1] - prefix_tokens)
        if side * side == pos.shape[1] - prefix_tokens:  # else left as is: the strict load reports the shape
            out["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(grid), old_size=[side, side],
                                                      num_prefix_tokens=prefix_tokens, interpolation="bicubic",
                                                      antialias=True)
    return out


def load_eva02(backbone: Eva02Backbone, path: Path) -> None:
    state = read_state_dict(path)
    load_strict(backbone.eva, convert_eva02(state, backbone.eva), path)


@register_backbone("eva02-l", family="eva02", weights="eva02_L_pt_m38m_p14.pt", loader=load_eva02)
def eva02_large(img_size: int = 512, patch_size: int = 16, drop_path_rate: float = 0.2, **kwargs) -> Eva02Backbone:
    """EVA02-L/14 (MIM, Merged-38M): 24 blocks, width 1024, 16 heads; patch 16 at 512 as in Rein."""
    eva = eva02_model(img_size, patch_size, embed_dim=1024, depth=24, num_heads=16,
                      drop_path_rate=drop_path_rate, **kwargs)
    return Eva02Backbone(eva)


@register_backbone("eva02-tiny", family="eva02", weights="eva02-tiny.safetensors", loader=load_eva02, shipped=True)
def eva02_tiny(img_size: int = 64, patch_size: int = 8, drop_path_rate: float = 0.0, **kwargs) -> Eva02Backbone:
    """The miniature's EVA-02: the same timm class and options, 6 blocks of width 128, 4 heads; pretrained by
    masked prediction of CLIP-tiny's features (``fishertune tiny pretrain eva02-tiny``,
    :mod:`fishertune.pretrain.eva02`)."""
    shape = {"embed_dim": 128, "depth": 6, "num_heads": 4, **kwargs}  # a test may build other shapes
    eva = eva02_model(img_size, patch_size, drop_path_rate=drop_path_rate, **shape)
    return Eva02Backbone(eva)
