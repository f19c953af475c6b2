"""CLIP (Radford et al., 2021) image tower through open_clip: ViT-L/14.

The backbone is open_clip's own ``open_clip.transformer.VisionTransformer`` (width 1024, 24 blocks,
16 heads, MLP ratio 4), kept as ``self.visual`` so that our parameter names are the checkpoints'
``visual.*`` names. It runs at 512 with patch 16 as Rein's CLIP config does
(configs/_base_/models/clip-L_mask2former.py: ``patch_size=16``, ``input_resolution=512``,
``drop_path_rate=0.1``, ``out_indices=[7, 11, 15, 23]``, ``get_embeddings=False``); ``patch_size=14``
keeps the native patching. With ``get_embeddings=False`` Rein's tower has no final norm and no
projection, so ``ln_post`` and ``proj`` are removed from ours (open_clip's own
``prune_intermediate_layers`` does the same) and their checkpoint keys are ignored by name.

Official files, both with the same ``visual.*`` layout:

- ``clip-l``: OpenAI's ``ViT-L-14.pt``, a TorchScript archive (``torch.jit``, fp16 tensors), read by
  :func:`fishertune.backbones.torchscript.read_torchscript_state_dict`, never ``torch.jit.load``.
  Keys: ``visual.class_embedding`` (1024), ``visual.positional_embedding`` (257x1024: class + 16x16
  grid), ``visual.conv1.weight`` (1024x3x14x14, no bias), ``visual.ln_pre.*``,
  ``visual.transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj,
  ln_2, mlp.c_fc, mlp.c_proj}.*``, ``visual.ln_post.*``, ``visual.proj`` (1024x768), and the text
  tower (``transformer.*``, ``token_embedding.weight``, ``positional_embedding``, ``ln_final.*``,
  ``text_projection``, ``logit_scale``, and ``input_resolution``/``context_length``/``vocab_size``).
  OpenAI's models use QuickGELU (``x * sigmoid(1.702 x)``), as Rein's tower does.
- ``clip-l-openclip``: open_clip's own ViT-L-14 trainings (e.g. LAION-2B), plain state dicts
  ``open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``, given as an explicit path), the
  same keys (a TorchScript export of an open_clip model also holds the text tower's ``attn_mask``), GELU.

Conversion (:func:`load_clip`, one loader for both): keep the ``visual.*`` keys as float32, ignore the
text tower's keys by name (a file without ``visual.*`` keys is refused), drop ``visual.proj`` and
``visual.ln_post.*``; when the patch differs, the 14x14 kernel is resampled with timm's
``resample_patch_embed`` (FlexiViT pseudo-inverse, as this project's DINOv2 and MAE loaders do) and the
16x16 position grid resized with timm's ``resample_abs_pos_embed`` (bicubic) keeping the class
position. Rein itself resizes CLIP's kernel by plain bicubic interpolation and the grid bilinearly.
An input whose patch grid differs from the built one gets its position grid resized on the fly
(Rein resizes it bilinearly in every forward).

Assumptions:

- Stochastic depth: Rein's rate 0.1 for CLIP, rising linearly over the blocks (``linspace(0, 0.1,
  24)``) and applied to both residual branches as Rein's ``ResidualAttentionBlock`` does. open_clip's
  blocks have no drop path; each block computes ``x + ls_1(attn(ln_1(x)))`` and
  ``x + ls_2(mlp(ln_2(x)))`` with ``ls_*`` identities when there is no layer scale (none in CLIP), so
  timm's ``DropPath`` is put in their place: exactly the residual branches, no parameters added.
  Rein's tokens are sequence-first, so its drop path masks token positions; ours masks samples (open_clip
  is batch-first), which is what stochastic depth means.
- Rein adds ``class_embedding`` to the class position once more in its forward (the class token enters
  as ``2 * class_embedding + pos[0]``); we follow OpenAI's and open_clip's forward (once).
- Attention is ``nn.MultiheadAttention`` called with ``need_weights=False`` by open_clip's block, which
  takes PyTorch's fused path (``scaled_dot_product_attention`` in training, the native fused kernel in
  inference).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fishertune.backbones.base import QKV, Backbone, default_out_indices
from fishertune.backbones.registry import register_backbone
from fishertune.backbones.weights import load_strict, read_state_dict
from fishertune.errors import UserError

#: keys of CLIP's text tower and OpenAI's metadata: present in the official files, unused here
TEXT_KEYS = ("token_embedding.weight", "positional_embedding", "text_projection", "logit_scale", "attn_mask",
             "input_resolution", "context_length", "vocab_size")
TEXT_PREFIXES = ("transformer.", "ln_final.")
#: the image tower's final norm and projection to the joint embedding: unused for dense features
HEAD_KEYS = ("visual.proj", "visual.ln_post.weight", "visual.ln_post.bias")


class CLIPBackbone(Backbone):
    """Wraps open_clip's ``VisionTransformer`` (without ``ln_post``/``proj``) behind the interface."""

    def __init__(self, visual: nn.Module, drop_path_rate: float = 0.0, out_indices: tuple[int, ...] | None = None):
        super().__init__()
        from timm.layers import DropPath

        visual.ln_post = nn.Identity()
        visual.proj = None
        self.visual = visual
        self.family = "clip"
        self.embed_dim = visual.conv1.out_channels
        self.patch_size = visual.conv1.kernel_size[0]
        self.num_layers = len(visual.transformer.resblocks)
        self.out_indices = tuple(out_indices or default_out_indices(self.num_layers))
        self.batch_first = visual.transformer.batch_first
        self.num_prefix_tokens = 1  # the class token
        rates = torch.linspace(0, drop_path_rate, self.num_layers, device="cpu").tolist()
        for block, rate in zip(self.blocks, rates):
            if rate > 0:
                if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
                    raise ValueError("drop path goes where layer scale would be; CLIP has no layer scale")
                block.ls_1, block.ls_2 = DropPath(rate), DropPath(rate)

    @property
    def blocks(self) -> nn.Module:  # type: ignore[override]
        return self.visual.transformer.resblocks

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """open_clip's ``VisionTransformer._embeds``, with the position grid resized for other sizes."""
        v = self.visual
        x = v.conv1(x)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = v.positional_embedding
        if (gh, gw) != tuple(v.grid_size):
            from timm.layers import resample_abs_pos_embed

            pos = resample_abs_pos_embed(pos.unsqueeze(0), [gh, gw], old_size=list(v.grid_size), num_prefix_tokens=1)[0]
        x = x + pos.to(x.dtype)
        x = v.patch_dropout(x)
        return v.ln_pre(x)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = x.shape[0]
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        t = self._embed(x)
        maps = []
        for i, block in enumerate(self.blocks):
            t = self.run_sequence_block(i, block, t, self._call_block)
            if i in self.out_indices:
                maps.append(t[:, 1:, :].transpose(1, 2).reshape(b, self.embed_dim, gh, gw))
        return self.multiscale(maps)

    def _call_block(self, block: nn.Module, t: torch.Tensor, n_extra: int, mask: torch.Tensor | None) -> torch.Tensor:
        """One open_clip block on batch-first ``t``. open_clip casts ``attn_mask`` to the tokens' dtype and
        adds it, so the boolean mask becomes an additive one (0 / -inf) here."""
        if mask is not None:
            mask = torch.zeros(mask.shape, dtype=t.dtype, device=t.device).masked_fill_(~mask, float("-inf"))
        if self.batch_first:
            return block(t, attn_mask=mask)
        return block(t.transpose(0, 1), attn_mask=mask).transpose(0, 1)  # older open_clip: LND blocks

    def qkv(self) -> list[QKV]:
        return [QKV(block=i, module=blk.attn, weight="in_proj_weight", bias="in_proj_bias", dim=self.embed_dim)
                for i, blk in enumerate(self.blocks)]

    def mlp_norm(self, i: int) -> nn.Module:
        """The norm feeding block ``i``'s MLP (see :meth:`Backbone.mlp_norm`)."""
        return self.blocks[i].ln_2


def clip_vit(img_size: int, patch_size: int, width: int, layers: int, heads: int, quick_gelu: bool,
             drop_path_rate: float = 0.0, **kwargs) -> CLIPBackbone:
    """A CLIP image tower built with open_clip's ``VisionTransformer``, wrapped as a backbone."""
    from open_clip.transformer import QuickGELU, VisionTransformer

    visual = VisionTransformer(
        image_size=img_size, patch_size=patch_size, width=width, layers=layers, heads=heads, mlp_ratio=4.0,
        act_layer=QuickGELU if quick_gelu else nn.GELU, **kwargs,
    )
    return CLIPBackbone(visual, drop_path_rate=drop_path_rate)


def _is_text_key(key: str) -> bool:
    return key in TEXT_KEYS or key.startswith(TEXT_PREFIXES)


def load_clip(backbone: CLIPBackbone, path: Path) -> None:
    """Load an OpenAI (TorchScript) or open_clip (state dict) CLIP checkpoint's image tower."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    state = read_state_dict(path)
    if not any(k.startswith("visual.") for k in state):
        raise UserError(f"checkpoint {path} has no `visual.*` keys, so it holds no CLIP image tower; "
                        "use OpenAI's ViT-L-14.pt or an open_clip ViT-L-14 checkpoint")
    # the image tower in float32 (OpenAI's file is fp16); text keys dropped; anything else kept to be reported
    state = {k: (v.float() if k.startswith("visual.") and v.is_floating_point() else v)
             for k, v in state.items() if not _is_text_key(k)}
    own = backbone.visual
    kernel = state.get("visual.conv1.weight")
    if kernel is not None and kernel.ndim == 4 and kernel.shape[-2:] != own.conv1.weight.shape[-2:]:
        state["visual.conv1.weight"] = resample_patch_embed(kernel, list(own.conv1.weight.shape[-2:]))
    pos = state.get("visual.positional_embedding")
    if pos is not None and pos.ndim == 2 and pos.shape[0] != own.positional_embedding.shape[0]:
        side = round((pos.shape[0] - 1) ** 0.5)
        if side * side == pos.shape[0] - 1:
            state["visual.positional_embedding"] = resample_abs_pos_embed(
                pos.unsqueeze(0), list(own.grid_size), old_size=[side, side], num_prefix_tokens=1)[0]
    load_strict(backbone, state, path, ignore=HEAD_KEYS)


@register_backbone("clip-l", family="clip", weights="ViT-L-14.pt", loader=load_clip)
def clip_large(img_size: int = 512, patch_size: int = 16, drop_path_rate: float = 0.1, **kwargs) -> CLIPBackbone:
    """OpenAI CLIP ViT-L/14 image tower: 24 blocks, width 1024, 16 heads, QuickGELU; patch 16 at 512."""
    return clip_vit(img_size, patch_size, width=1024, layers=24, heads=16, quick_gelu=True,
                    drop_path_rate=drop_path_rate, **kwargs)


@register_backbone("clip-l-openclip", family="clip", weights="open_clip_model.safetensors", loader=load_clip)
def clip_large_openclip(img_size: int = 512, patch_size: int = 16, drop_path_rate: float = 0.1,
                        **kwargs) -> CLIPBackbone:
    """open_clip's ViT-L-14 trainings: OpenAI's architecture with GELU instead of QuickGELU."""
    return clip_vit(img_size, patch_size, width=1024, layers=24, heads=16, quick_gelu=False,
                    drop_path_rate=drop_path_rate, **kwargs)


@register_backbone("clip-tiny", family="clip", weights="clip-tiny.safetensors", loader=load_clip, shipped=True)
def clip_tiny(img_size: int = 64, patch_size: int = 8, drop_path_rate: float = 0.0, **kwargs) -> CLIPBackbone:
    """The miniature's CLIP: the same open_clip tower with QuickGELU, 6 blocks of width 128, 4 heads; pretrained
    image-text contrastively (``fishertune tiny pretrain clip-tiny``, :mod:`fishertune.pretrain.clip`)."""
    shape = {"width": 128, "layers": 6, "heads": 4, **kwargs}  # a test may build other shapes
    return clip_vit(img_size, patch_size, quick_gelu=True, drop_path_rate=drop_path_rate, **shape)
