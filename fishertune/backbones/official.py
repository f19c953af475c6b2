"""Checkpoint files in each family's official layout, with random weights: for checks without the real files.

The real checkpoints cannot be downloaded everywhere the suite is checked (CI, a GPU node without
internet), yet the loaders, the pre-flight and the cost of a full-size cell should be exercised on files
laid out exactly as the releases are. These writers build each release's model from the *upstream*
code (never from this package's backbones, so a file cannot agree with a loader by construction), with
its random initialisation, and save it the way the release was saved:

* ``sam-h``: segment-anything's ``build_sam_vit_h()`` (image encoder, prompt encoder, mask decoder),
  ``torch.save(sam.state_dict())`` as ``sam_vit_h_4b8939.pth``;
* ``mae-l`` / ``mae-h``: MAE's encoder is timm's ``VisionTransformer`` (``models_vit``), saved as
  ``{"model": state_dict}`` (ViT-L/16 and ViT-H/14 at 224);
* ``dinov2-l``: timm's ``VisionTransformer`` at 518 with patch 14 and layer scale (facebookresearch/
  dinov2's hub model has the same keys) plus ``mask_token``, a plain state dict;
* ``eva02-l``: timm's ``Eva`` with EVA-02's MIM options and *separate* q/k/v projections, its tensors
  renamed key by key to the release's names (:func:`eva02_release_state`: ``q_proj/k_proj/v_proj``,
  ``q_bias``/``v_bias``, SwiGLU ``w1/w2/ffn_ln/w3``, the final ``norm``, ``mask_token``, ``lm_head`` and
  the rotary tables at top level and under every block), nested under ``module``;
* ``clip-l``: open_clip's ``CLIP`` ViT-L/14 (image and text towers, QuickGELU) traced on an image and a
  text and saved as a TorchScript archive in fp16, as OpenAI's ``ViT-L-14.pt`` (:func:`save_torchscript`);
* ``clip-l-openclip``: the same architecture with GELU as a safetensors state dict
  (``open_clip_model.safetensors``).

Full-size files are 0.6 to 2.5 GB (SAM-H's is the largest); writing one takes seconds to a minute and
a few GB of memory. Each writer also takes smaller sizes (same layout, smaller tensors), which the tests use.
"""

from __future__ import annotations

import copy
import warnings
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fishertune.backbones.registry import BACKBONES


def eva02_rope(ft: int, head_dim: int, pt: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-02's ``VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=pt, ft_seq_len=ft)`` tables (cos, sin),
    each ``(ft * ft, head_dim)``, written out from its definition (Rein's ``intp_freq=True``): positions
    ``arange(ft) / ft * pt``, frequencies ``10000 ** -(arange(0, d, 2) / d)``, each repeated twice
    (interleaved), h then w."""
    d = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    t = torch.arange(ft) / ft * pt
    f = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # (ft, d)
    f = torch.cat([f[:, None, :].expand(ft, ft, d), f[None, :, :].expand(ft, ft, d)], dim=-1)
    f = f.reshape(ft * ft, 2 * d)
    return f.cos(), f.sin()


def eva02_release_state(model: nn.Module, predict_dim: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a timm ``Eva`` built with separate projections (``qkv_fused=False``) under the key
    names of EVA-02's MIM release, plus its pretraining-only keys (``mask_token``, ``lm_head`` of width
    ``predict_dim``, default the model's, and the rotary tables). Every tensor of the model is used."""
    dim = model.embed_dim
    predict_dim = predict_dim or dim
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    used = set()

    def take(key):
        used.add(key)
        return sd[key]

    grid = model.patch_embed.grid_size[0]
    cos, sin = eva02_rope(grid, dim // model.blocks[0].attn.num_heads)
    out = {
        "cls_token": take("cls_token"),
        "pos_embed": take("pos_embed"),
        "mask_token": torch.randn(1, 1, dim),
        "patch_embed.proj.weight": take("patch_embed.proj.weight"),
        "patch_embed.proj.bias": take("patch_embed.proj.bias"),
    }
    for i in range(len(model.blocks)):
        b = f"blocks.{i}."
        for part in ("norm1", "attn.proj", "norm2"):
            out[b + part + ".weight"] = take(b + part + ".weight")
            out[b + part + ".bias"] = take(b + part + ".bias")
        for which in "qkv":
            out[b + f"attn.{which}_proj.weight"] = take(b + f"attn.{which}_proj.weight")
        out[b + "attn.q_bias"] = take(b + "attn.q_proj.bias")
        out[b + "attn.v_bias"] = take(b + "attn.v_proj.bias")
        for official, ours in (("w1", "fc1_g"), ("w2", "fc1_x"), ("ffn_ln", "norm"), ("w3", "fc2")):
            out[b + f"mlp.{official}.weight"] = take(b + f"mlp.{ours}.weight")
            out[b + f"mlp.{official}.bias"] = take(b + f"mlp.{ours}.bias")
        out[b + "attn.rope.freqs_cos"], out[b + "attn.rope.freqs_sin"] = cos.clone(), sin.clone()
    out["norm.weight"], out["norm.bias"] = take("norm.weight"), take("norm.bias")
    out["lm_head.weight"], out["lm_head.bias"] = torch.randn(predict_dim, dim), torch.randn(predict_dim)
    out["rope.freqs_cos"], out["rope.freqs_sin"] = cos, sin
    if used != set(sd):  # pragma: no cover - a timm change, not bad input
        raise AssertionError(f"tensors of the Eva model not in the release layout: {sorted(set(sd) - used)}")
    return out


def save_torchscript(model: nn.Module, path: Path, image_size: int, context_length: int, vocab_size: int,
                     how: str = "trace", half: bool = True) -> Path:
    """Write an open_clip ``CLIP`` as a TorchScript archive, traced on (image, text) as OpenAI did, or scripted;
    in fp16 (OpenAI's files are) unless ``half`` is false."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = copy.deepcopy(model).eval()
        if how == "trace":
            example = (torch.randn(1, 3, image_size, image_size), torch.randint(0, vocab_size, (1, context_length)))
            with torch.no_grad():
                module = torch.jit.trace(model, example, check_trace=False)
        else:
            module = torch.jit.script(model)
        if half:
            module = module.half()
        torch.jit.save(module, str(path))
    return Path(path)


# ------------------------------------------------------------------------------ one writer per release
# Each takes the architecture's sizes, the release's by default; smaller ones give files of the same layout.
def write_clip(path: Path, quick_gelu: bool = True, torchscript: bool = True, width: int = 1024, layers: int = 24,
               text_width: int = 768, text_layers: int = 12) -> Path:
    """open_clip's ViT-L/14 ``CLIP`` (OpenAI's configuration: 224 px, patch 14, heads of 64 channels, text of
    77 x 49,408 tokens): a traced fp16 TorchScript archive as OpenAI's ``ViT-L-14.pt`` (``torchscript``), else
    a safetensors state dict as open_clip's releases (with GELU, ``quick_gelu=False``)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(embed_dim=text_width, quick_gelu=quick_gelu,
                 vision_cfg=CLIPVisionCfg(layers=layers, width=width, head_width=64, patch_size=14, image_size=224),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=text_width, heads=text_width // 64,
                                      layers=text_layers))
    if torchscript:
        return save_torchscript(model, path, image_size=224, context_length=77, vocab_size=49408)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return Path(path)


def _vit(**arch) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(num_classes=0, global_pool="", **arch)


def write_mae(path: Path, patch_size: int = 16, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16) -> Path:
    """MAE's encoder (timm's ``VisionTransformer`` at 224, qkv bias) as ``{"model": state_dict}``."""
    vit = _vit(img_size=224, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
               qkv_bias=True)
    torch.save({"model": vit.state_dict()}, path)
    return Path(path)


def write_dinov2(path: Path, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16) -> Path:
    """DINOv2's ViT/14 at 518 (a 37x37 grid) with layer scale, plus ``mask_token``, as a plain state dict."""
    vit = _vit(img_size=518, patch_size=14, embed_dim=embed_dim, depth=depth, num_heads=num_heads, init_values=1e-5)
    torch.save({**vit.state_dict(), "mask_token": torch.zeros(1, embed_dim)}, path)
    return Path(path)


def write_eva02(path: Path, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16) -> Path:
    """EVA-02's MIM release (:func:`eva02_release_state` of timm's unfused ``Eva`` at 224/14) under ``module``."""
    from timm.models.eva import Eva

    eva = Eva(img_size=224, patch_size=14, embed_dim=embed_dim, depth=depth, num_heads=num_heads, qkv_fused=False,
              mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16),
              num_classes=0, global_pool="")
    torch.save({"module": eva02_release_state(eva)}, path)
    return Path(path)


def write_sam(path: Path, embed_dim: int = 1280, depth: int = 32, num_heads: int = 16,
              global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)) -> Path:
    """The whole ``Sam`` of segment-anything's builder (1024 px, 14x14 windows; ViT-H by default)."""
    from segment_anything.build_sam import _build_sam

    sam = _build_sam(encoder_embed_dim=embed_dim, encoder_depth=depth, encoder_num_heads=num_heads,
                     encoder_global_attn_indexes=list(global_attn_indexes))
    torch.save(sam.state_dict(), path)
    return Path(path)


#: registered full-size variant -> writer of its release's file
WRITERS: dict[str, Callable[[Path], Path]] = {
    "clip-l": write_clip,
    "clip-l-openclip": partial(write_clip, quick_gelu=False, torchscript=False),
    "mae-l": write_mae,
    "mae-h": partial(write_mae, patch_size=14, embed_dim=1280, depth=32),
    "sam-h": write_sam,
    "eva02-l": write_eva02,
    "dinov2-l": write_dinov2,
}


def write_official(name: str, folder: Path, seed: int = 0) -> Path:
    """Write the release file of the registered full-size backbone ``name`` with random weights (drawn from
    ``seed``) into ``folder`` under its official file name; returns its path."""
    spec = BACKBONES.get(name)
    if name not in WRITERS:
        raise ValueError(f"no official-layout writer for {name!r}; writers: {', '.join(WRITERS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / spec.weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        WRITERS[name](path)
    return path
