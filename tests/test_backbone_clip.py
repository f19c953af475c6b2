"""The CLIP family: features, q/k/v addressing, drop path, sizes, the TorchScript reader, and loading
OpenAI's (TorchScript) and open_clip's (state dict) checkpoint formats against open_clip's own tower."""

import copy
import os
import pickle
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fishertune.backbones import BACKBONES, build_backbone
from fishertune.backbones.clip import clip_vit, load_clip
from fishertune.backbones.torchscript import is_torchscript_archive, read_torchscript_state_dict
from fishertune.backbones.weights import read_state_dict
from fishertune.errors import UserError

# the official-format tiny model: OpenAI's ViT-L/14 layout at width 64, 4 blocks, patch 14, 4x4 grid
NATIVE_IMG, NATIVE_PATCH = 56, 14


SHAPE = {"width": 64, "layers": 4}  # the small shape these checkpoint tests are written for
def _upstream_clip(quick_gelu: bool, layers: int = 4) -> nn.Module:
    """An independent open_clip ``CLIP`` (image and text towers): its keys are OpenAI's layout."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(3)
    model = CLIP(embed_dim=32, quick_gelu=quick_gelu,
                 vision_cfg=CLIPVisionCfg(layers=layers, width=64, head_width=16, patch_size=NATIVE_PATCH,
                                          image_size=NATIVE_IMG),
                 text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1))
    with torch.no_grad():  # no zero biases or unit norms: a swapped or skipped tensor must show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.half().float()  # fp16-representable, as OpenAI's release is fp16
    return model.eval()


def _jit_save(model: nn.Module, path, how: str = "trace", half: bool = True):
    """Write ``model`` as a TorchScript archive: traced on (image, text) as OpenAI did, or scripted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = copy.deepcopy(model)
        if how == "trace":
            example = (torch.randn(1, 3, NATIVE_IMG, NATIVE_IMG), torch.randint(0, 50, (1, 8)))
            module = torch.jit.trace(model, example, check_trace=False)
        else:
            module = torch.jit.script(model)
        if half:
            module = module.half()
        torch.jit.save(module, str(path))
    return path


def _jit_load_state_dict(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu").state_dict()


@pytest.fixture(scope="module")
def openai_clip():
    return _upstream_clip(quick_gelu=True)


@pytest.fixture(scope="module")
def openai_file(openai_clip, tmp_path_factory):
    """A tiny ``ViT-L-14.pt``: a traced fp16 TorchScript archive of a QuickGELU CLIP."""
    return _jit_save(openai_clip, tmp_path_factory.mktemp("openai") / "ViT-L-14.pt")


def _native_backbone(quick_gelu: bool = True, layers: int = 4):
    return clip_vit(NATIVE_IMG, NATIVE_PATCH, width=64, layers=layers, heads=4, quick_gelu=quick_gelu)


# ---- the tiny variant -------------------------------------------------------------------------------

def test_tiny_features_are_four_levels_at_strides_4_to_32_of_the_patch_grid():
    b = build_backbone("clip-tiny", pretrained=False, **SHAPE, seed=0)
    assert (b.family, b.embed_dim, b.patch_size, b.num_layers, b.out_indices) == ("clip", 64, 8, 4, (0, 1, 2, 3))
    feats = b.forward_features(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 32, 32), (2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4)]
    # another input size: the position grid is resized on the fly
    assert feats[2].shape[-2:] == (8, 8) and b.forward_features(torch.randn(1, 3, 96, 80))[2].shape[-2:] == (12, 10)
    # no final norm, no projection (Rein's get_embeddings=False)
    assert not [k for k in b.state_dict() if "ln_post" in k or k.endswith(".proj")]


def test_build_is_deterministic_for_a_seed():
    a, b, c = (build_backbone("clip-tiny", pretrained=False, **SHAPE, seed=s) for s in (1, 1, 2))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


def test_qkv_rows_reproduce_the_librarys_attention():
    b = build_backbone("clip-tiny", pretrained=False, **SHAPE, seed=0).eval()
    slots = b.qkv()
    assert [s.block for s in slots] == [0, 1, 2, 3] and all(s.module is blk.attn for s, blk in zip(slots, b.blocks))
    slot = slots[2]
    w, bias = getattr(slot.module, slot.weight), getattr(slot.module, slot.bias)
    assert w.shape == (3 * 64, 64) and bias.shape == (3 * 64,)
    with torch.no_grad():
        bias.normal_()  # open_clip initialises it to zero
        x = torch.randn(2, 5, 64)  # batch-first, as open_clip's blocks run
        q, k, v = (F.linear(x, w[slot.rows(r)], bias[slot.rows(r)]).view(2, 5, 4, 16).transpose(1, 2) for r in "qkv")
        attn = torch.softmax(q @ k.transpose(-1, -2) / 16 ** 0.5, dim=-1)
        ours = slot.module.out_proj((attn @ v).transpose(1, 2).reshape(2, 5, 64))
        theirs = slot.module(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_attention_takes_the_fused_paths(monkeypatch):
    b = build_backbone("clip-tiny", pretrained=False, **SHAPE, seed=0)
    calls = {"sdpa": 0, "native": 0}
    sdpa, native = F.scaled_dot_product_attention, torch._native_multi_head_attention

    def count(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(F, "scaled_dot_product_attention", count("sdpa", sdpa))
    monkeypatch.setattr(torch, "_native_multi_head_attention", count("native", native))
    b.train()
    b.forward_features(torch.randn(2, 3, 64, 64))[0].sum().backward()
    assert calls == {"sdpa": 4, "native": 0}  # training: scaled_dot_product_attention in every block
    b.eval()
    with torch.no_grad():
        b.forward_features(torch.randn(2, 3, 64, 64))
    assert calls == {"sdpa": 4, "native": 4}  # inference: PyTorch's native fused attention


def test_drop_path_rises_linearly_to_reins_rate_on_both_residual_branches():
    b = build_backbone("clip-tiny", pretrained=False, **SHAPE, seed=0, drop_path_rate=0.3)
    assert isinstance(b.blocks[0].ls_1, nn.Identity)  # linspace(0, 0.3, 4)[0] == 0
    assert [blk.ls_1.drop_prob for blk in list(b.blocks)[1:]] == pytest.approx([0.1, 0.2, 0.3])
    assert [blk.ls_2.drop_prob for blk in list(b.blocks)[1:]] == pytest.approx([0.1, 0.2, 0.3])
    assert not any("ls_" in k for k in b.state_dict())  # no parameters added
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        b.train()
        torch.manual_seed(0)
        one = b.forward_features(x)[2]
        two = b.forward_features(x)[2]
        b.eval()
        three, four = b.forward_features(x)[2], b.forward_features(x)[2]
    assert not torch.equal(one, two) and torch.equal(three, four)


def test_full_size_clip_l_at_512_patch16_parameter_count():
    with torch.device("meta"):
        b = build_backbone("clip-l", pretrained=False)
        o = build_backbone("clip-l-openclip", pretrained=False)
        native = build_backbone("clip-l", pretrained=False, img_size=224, patch_size=14)
    # conv1 1024*3*16*16 = 786,432 (no bias) + class embedding 1,024 + positions (32*32+1)*1024 = 1,049,600
    # + ln_pre 2,048 + 24 blocks * 12,596,224 (ln_1 2,048; in_proj 3*1024*1024+3*1024 = 3,148,800;
    # out_proj 1,049,600; ln_2 2,048; c_fc 1024*4096+4096 = 4,198,400; c_proj 4096*1024+1024 = 4,195,328)
    # = 304,148,480; no ln_post/proj. (The paper prints 304.20M for every ViT-L row, DINOv2's count.)
    for m in (b, o):
        assert sum(p.numel() for p in m.parameters()) == 304_148_480
        assert (m.patch_size, m.num_layers, m.embed_dim, m.out_indices) == (16, 24, 1024, (7, 11, 15, 23))
        assert m.blocks[-1].ls_1.drop_prob == pytest.approx(0.1)
    assert type(b.blocks[0].mlp.gelu).__name__ == "QuickGELU" and isinstance(o.blocks[0].mlp.gelu, nn.GELU)
    # native shapes are the official file's: positions 257x1024, kernel 1024x3x14x14
    assert native.visual.positional_embedding.shape == (257, 1024)
    assert native.visual.conv1.weight.shape == (1024, 3, 14, 14) and native.visual.conv1.bias is None
    assert BACKBONES.get("clip-l").weights == "ViT-L-14.pt"
    assert BACKBONES.get("clip-l").loader is load_clip is BACKBONES.get("clip-l-openclip").loader


# ---- the TorchScript reader -------------------------------------------------------------------------

@pytest.mark.parametrize("how,half", [("trace", True), ("script", False), ("script", True)])
def test_torchscript_reader_returns_exactly_what_jit_load_does(tmp_path, how, half):
    model = _upstream_clip(quick_gelu=True, layers=2)
    path = _jit_save(model, tmp_path / "model.pt", how=how, half=half)
    assert is_torchscript_archive(path)
    ours = read_torchscript_state_dict(path)
    reference = _jit_load_state_dict(path)  # in the test only: this compiles the archive's code
    assert list(ours) == list(reference)
    for k, v in reference.items():
        assert ours[k].dtype == v.dtype == (torch.float16 if half else torch.float32) or not v.is_floating_point(), k
        assert torch.equal(ours[k], v), k
    # read_state_dict dispatches to it (torch.load would refuse a TorchScript archive)
    assert list(read_state_dict(path)) == list(reference)


def _replace_data_pkl(good, bad, data: bytes):
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, data if item.filename.endswith("/data.pkl") else src.read(item))


@pytest.mark.parametrize("target", ["print", "system"])
def test_archive_whose_pickle_calls_code_is_refused_without_running_it(openai_file, tmp_path, capsys, target):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            if target == "print":
                return (print, ("code ran",))
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    _replace_data_pkl(openai_file, evil, pickle.dumps({"visual": Payload()}, protocol=2))
    assert is_torchscript_archive(evil)
    refused = r"evil\.pt carries objects other than tensors .*references (__builtin__\.print|posix\.system)"
    with pytest.raises(UserError, match=refused):
        load_clip(build_backbone("clip-tiny", pretrained=False, **SHAPE, seed=0), evil)
    assert not marker.exists() and "code ran" not in capsys.readouterr().out


def test_damaged_archives_are_one_line_errors(openai_file, tmp_path):
    data = openai_file.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cut\.pt cannot be read .*truncated"):
        load_clip(build_backbone("clip-tiny", pretrained=False, **SHAPE, seed=0), cut)
    # a storage record missing from an otherwise intact archive
    holed = tmp_path / "holed.pt"
    with zipfile.ZipFile(openai_file) as src, zipfile.ZipFile(holed, "w") as dst:
        for item in src.infolist():
            if not item.filename.endswith("/data/3"):
                dst.writestr(item, src.read(item))
    with pytest.raises(UserError, match=r"holed\.pt cannot be read \(storage \S+/data/3 is missing\)"):
        load_clip(build_backbone("clip-tiny", pretrained=False, **SHAPE, seed=0), holed)


# ---- loading the official formats --------------------------------------------------------------------

def test_openai_archive_loads_unchanged_at_native_patch_and_resampled_at_16(openai_clip, openai_file, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load must not be used: it runs the archive's code")

    monkeypatch.setattr(torch.jit, "load", refuse)
    src = openai_clip.visual.state_dict()
    native = build_backbone("clip-tiny", pretrained=False, **SHAPE, seed=0, img_size=NATIVE_IMG, patch_size=NATIVE_PATCH)
    load_clip(native, openai_file)
    ours = native.state_dict()
    assert set(ours) == {k for k in (f"visual.{n}" for n in src) if not k.startswith(("visual.proj", "visual.ln_post"))}
    for k, v in ours.items():
        assert v.dtype == torch.float32 and torch.equal(v, src[k[len("visual."):]]), k
    # Rein's setting: patch 16, here at 128 px: kernel 14 -> 16, the 4x4 position grid -> 8x8, class position kept
    from timm.layers import resample_patch_embed

    rein = build_backbone("clip-tiny", pretrained=False, **SHAPE, seed=0, img_size=128, patch_size=16)
    load_clip(rein, openai_file)
    v = rein.visual
    assert v.conv1.weight.shape == (64, 3, 16, 16) and v.positional_embedding.shape == (1 + 8 * 8, 64)
    torch.testing.assert_close(v.conv1.weight, resample_patch_embed(src["conv1.weight"], [16, 16]))
    assert torch.equal(v.positional_embedding[0], src["positional_embedding"][0])
    grid = src["positional_embedding"][1:].view(1, 4, 4, 64).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(8, 8), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(64, 64)
    torch.testing.assert_close(v.positional_embedding[1:], resized)  # row-major grid, bicubic
    assert torch.equal(v.transformer.resblocks[3].attn.in_proj_weight,
                       src["transformer.resblocks.3.attn.in_proj_weight"])


@pytest.mark.parametrize("fmt", ["openai-torchscript", "open_clip.bin", "open_clip.safetensors"])
def test_loaded_backbone_reproduces_open_clips_own_intermediate_outputs(openai_clip, openai_file, tmp_path, fmt):
    if fmt == "openai-torchscript":
        upstream, path, quick_gelu = openai_clip, openai_file, True
    else:
        upstream, quick_gelu = _upstream_clip(quick_gelu=False), False
        path = tmp_path / ("open_clip_pytorch_model.bin" if fmt.endswith("bin") else "open_clip_model.safetensors")
        if fmt.endswith("bin"):
            torch.save(upstream.state_dict(), path)
        else:
            from safetensors.torch import save_file

            save_file(upstream.state_dict(), str(path))
    b = _native_backbone(quick_gelu=quick_gelu).eval()
    load_clip(b, path)
    x = torch.randn(2, 3, NATIVE_IMG, NATIVE_IMG)
    captured = []
    hooks = [blk.register_forward_hook(lambda mod, args, out: captured.append(out))
             for blk in upstream.visual.transformer.resblocks]
    try:
        with torch.no_grad():
            upstream.visual(x)
    finally:
        for h in hooks:
            h.remove()
    assert upstream.visual.transformer.batch_first
    reference = [t[:, 1:].transpose(1, 2).reshape(2, 64, 4, 4) for t in captured]  # drop the class token
    with torch.no_grad():
        feats = b.forward_features(x)
        b.multiscale = lambda maps: maps  # all four levels before the rescaling
        raw = b.forward_features(x)
    torch.testing.assert_close(feats[2], reference[2])  # the stride-1x level is not rescaled
    for ours, theirs in zip(raw, reference):
        torch.testing.assert_close(ours, theirs)
    # the activation matters: the same weights in a tower with the other activation give other features
    other = _native_backbone(quick_gelu=not quick_gelu).eval()
    load_clip(other, path)
    with torch.no_grad():
        assert not torch.allclose(other.forward_features(x)[2], reference[2], atol=1e-4)


# ---- refusals -------------------------------------------------------------------------------------------

def test_checkpoint_of_another_family_is_refused(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    dinov2 = VisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=4, num_heads=4, num_classes=0)
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(dinov2.state_dict(), path)
    with pytest.raises(UserError, match=r"dinov2_vitl14_pretrain\.pth has no `visual\.\*` keys"):
        load_clip(build_backbone("clip-tiny", pretrained=False, **SHAPE, seed=0), path)


def test_wrong_depth_missing_key_and_unknown_key_are_one_line_errors(openai_file, tmp_path):
    deeper = tmp_path / "deeper.pt"
    _jit_save(_upstream_clip(quick_gelu=True, layers=5), deeper)
    with pytest.raises(UserError, match=r"deeper\.pt does not fit CLIPBackbone: 12 unexpected: "
                                        r"visual\.transformer\.resblocks\.4"):
        load_clip(_native_backbone(), deeper)
    state = read_state_dict(openai_file)
    del state["visual.transformer.resblocks.2.mlp.c_fc.bias"]
    state["visual.attnpool.k_proj.weight"] = torch.zeros(1)  # e.g. OpenAI's ResNet towers
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"edited\.pth .*1 missing: visual\.transformer\.resblocks\.2\.mlp\.c_fc\.bias; "
                                        r"1 unexpected: visual\.attnpool\.k_proj\.weight"):
        load_clip(_native_backbone(), path)
    # the text tower, proj and ln_post alone are not reported
    del state["visual.attnpool.k_proj.weight"]
    state["visual.transformer.resblocks.2.mlp.c_fc.bias"] = torch.zeros(256)
    torch.save(state, path)
    load_clip(_native_backbone(), path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_carrying_code_is_refused(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "open_clip_pytorch_model.bin"
    with open(evil, "wb") as f:
        pickle.dump({"visual.conv1.weight": Payload()}, f)
    with pytest.raises(UserError, match="other than tensors|cannot be read"):
        load_clip(build_backbone("clip-tiny", pretrained=False, **SHAPE, seed=0), evil)
    assert "code ran" not in capsys.readouterr().out
