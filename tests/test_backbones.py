"""The DINOv2 family: features, q/k/v addressing, sizes, and loading the official checkpoint format."""

import pickle

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from fishertune.backbones import BACKBONES, build_backbone, default_out_indices
from fishertune.backbones.dinov2 import load_dinov2
from fishertune.errors import UserError


SHAPE = {"embed_dim": 64, "depth": 4}  # the small shape these checkpoint tests are written for
def test_tiny_features_are_four_levels_at_strides_4_to_32_of_the_patch16_grid():
    b = build_backbone("dinov2-tiny", pretrained=False, **SHAPE, seed=0, img_size=64)
    feats = b.forward_features(torch.randn(2, 3, 64, 64))
    grid = 64 // b.patch_size
    assert [f.shape[-1] for f in feats] == [grid * 4, grid * 2, grid, grid // 2]
    assert all(f.shape[:2] == (2, b.embed_dim) for f in feats)
    assert b.out_indices == (0, 1, 2, 3)


def test_build_is_deterministic_for_a_seed():
    a, b, c = (build_backbone("dinov2-tiny", pretrained=False, **SHAPE, seed=s) for s in (1, 1, 2))
    for (n, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


def test_qkv_rows_address_query_key_value():
    b = build_backbone("dinov2-tiny", pretrained=False, **SHAPE, seed=0)
    slots = b.qkv()
    assert len(slots) == b.num_layers
    slot = slots[1]
    w = getattr(slot.module, slot.weight)
    assert w.shape[0] == 3 * slot.dim
    # perturbing the key rows changes attention, perturbing nothing else of the block
    with torch.no_grad():
        w[slot.rows("k")] = 0.0
    assert torch.count_nonzero(w[slot.rows("k")]) == 0 and torch.count_nonzero(w[slot.rows("q")]) > 0


def test_full_size_dinov2_l_at_512_patch16_has_the_papers_parameter_count():
    with torch.device("meta"):
        b = build_backbone("dinov2-l", pretrained=False)
    n = sum(p.numel() for p in b.parameters())
    assert b.patch_size == 16 and b.num_layers == 24 and b.out_indices == (7, 11, 15, 23)
    assert n / 1e6 == pytest.approx(304.20, abs=0.005)  # the paper's "Full" count


def _official_format_tiny(depth=4, dim=64, grid=6):
    """A checkpoint laid out like dinov2_vitl14_pretrain.pth, at tiny width: patch 14, mask_token."""
    torch.manual_seed(3)
    src = VisionTransformer(img_size=14 * grid, patch_size=14, embed_dim=dim, depth=depth, num_heads=4,
                            num_classes=0, global_pool="", init_values=1e-5)
    state = dict(src.state_dict())
    state["mask_token"] = torch.zeros(1, dim)
    return src, state


def test_official_dinov2_checkpoint_loads_with_patch_resampled_to_16(tmp_path):
    src, state = _official_format_tiny()
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(state, path)
    # native patch 14: every tensor arrives unchanged
    native = build_backbone("dinov2-tiny", pretrained=False, **SHAPE, seed=0, img_size=84, patch_size=14)
    load_dinov2(native, path)
    for (n, p), q in zip(native.vit.named_parameters(), src.parameters()):
        assert torch.equal(p, q), n
    # Rein's setting: patch 16 at 64 px: kernel resampled, 6x6 position grid resized to 4x4
    rein = build_backbone("dinov2-tiny", pretrained=False, **SHAPE, seed=0, img_size=64, patch_size=16)
    load_dinov2(rein, path)
    assert rein.vit.patch_embed.proj.weight.shape[-1] == 16
    assert rein.vit.pos_embed.shape[1] == 1 + 4 * 4
    assert torch.equal(rein.vit.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_missing_key_is_one_line_naming_file_and_key(tmp_path):
    _, state = _official_format_tiny()
    del state["blocks.2.attn.qkv.weight"]
    path = tmp_path / "truncated.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"truncated\.pth.*missing: vit\.blocks\.2\.attn\.qkv\.weight|truncated\.pth.*1 missing: blocks\.2\.attn\.qkv\.weight"):
        load_dinov2(build_backbone("dinov2-tiny", pretrained=False, **SHAPE, seed=0, img_size=84, patch_size=14), path)


def test_wrong_family_checkpoint_is_refused(tmp_path):
    _, state = _official_format_tiny(depth=5)  # one block too many for the model
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match="unexpected: blocks.4"):
        load_dinov2(build_backbone("dinov2-tiny", pretrained=False, **SHAPE, seed=0, img_size=84, patch_size=14), path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_truncated_file_and_pickled_code_are_refused(tmp_path):
    _, state = _official_format_tiny()
    good = tmp_path / "good.pth"
    torch.save(state, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="cannot be read"):
        load_dinov2(build_backbone("dinov2-tiny", pretrained=False, **SHAPE, seed=0, img_size=84, patch_size=14), cut)

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(UserError, match="other than tensors|cannot be read"):
        load_dinov2(build_backbone("dinov2-tiny", pretrained=False, **SHAPE, seed=0), evil)


def test_missing_weights_say_where_they_were_looked_for(monkeypatch, tmp_path):
    monkeypatch.delenv("FISHERTUNE_WEIGHTS", raising=False)
    with pytest.raises(UserError, match="FISHERTUNE_WEIGHTS"):
        build_backbone("dinov2-l")
    monkeypatch.setenv("FISHERTUNE_WEIGHTS", str(tmp_path))
    with pytest.raises(UserError, match=str(tmp_path / "dinov2_vitl14_pretrain.pth")):
        build_backbone("dinov2-l")


# --- the interface contract, for every family's tiny variant ------------------------------------------------

TINY = [n for n in BACKBONES.names() if n.endswith("-tiny")]


def test_every_family_has_a_tiny_variant_and_a_full_size_one_with_official_weights():
    families = {BACKBONES.get(n).family for n in TINY}
    assert families == {"clip", "mae", "sam", "eva02", "dinov2"}
    for family in families:
        assert any(s.family == family and s.weights and s.loader for s in map(BACKBONES.get, BACKBONES.names()))


@pytest.mark.parametrize("name", TINY)
def test_tiny_backbone_honours_the_interface(name):
    b = build_backbone(name, pretrained=False, seed=0, img_size=64)
    assert b.family == BACKBONES.get(name).family
    assert len(b.blocks) == b.num_layers and b.out_indices == default_out_indices(b.num_layers)
    x = torch.randn(2, 3, 64, 64, requires_grad=False)
    feats = b.forward_features(x)
    g = 64 // b.patch_size
    assert [tuple(f.shape) for f in feats] == [(2, b.embed_dim, int(g * s), int(g * s)) for s in (4, 2, 1, 0.5)]
    # every block up to the deepest feature level shapes the features: all its parameters get gradients
    sum(f.square().mean() for f in feats).backward()
    deepest = max(b.out_indices)
    for i, block in enumerate(b.blocks):
        for n, p in block.named_parameters():
            if i <= deepest:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} block {i} {n}"
    # q, k and v of every attention are addressable and each changes the features
    slots = b.qkv()
    assert [s.block for s in slots] == list(range(b.num_layers))
    for which in "qkv":
        c = build_backbone(name, pretrained=False, seed=0, img_size=64)
        slot = c.qkv()[0]
        with torch.no_grad():
            w = getattr(slot.module, slot.weight)
            assert w.shape[0] == 3 * slot.dim
            w[slot.rows(which)] += 0.5 * torch.randn_like(w[slot.rows(which)])
            moved = c.forward_features(x)
        assert not torch.allclose(moved[2], feats[2].detach()), f"{name}: perturbing {which} changed nothing"


@pytest.mark.parametrize("name", TINY)
def test_tiny_backbone_runs_at_another_size_and_native_patching(name):
    b = build_backbone(name, pretrained=False, seed=0, img_size=32, patch_size=4)
    feats = b.forward_features(torch.randn(1, 3, 32, 32))
    assert feats[2].shape[-2:] == (8, 8) and b.patch_size == 4


@pytest.mark.parametrize(
    "name, native, millions",
    [
        # the architectures' own sizes at their native resolution, built on the meta device; the
        # difference to the 512/16 counts of `fishertune params` is the position grid (and SAM's neck)
        ("dinov2-l", dict(img_size=518, patch_size=14), 304.37),  # 37x37 grid, layer scale, no mask token
        ("clip-l", dict(img_size=224, patch_size=14), 303.18),  # 303.97 published, less proj 0.79 and ln_post
        ("mae-l", dict(img_size=224, patch_size=16), 303.30),
        ("mae-h", dict(img_size=224, patch_size=14), 630.76),
        ("sam-h", dict(img_size=1024, neck=True), 637.03),  # SAM's image encoder as released, neck included
        ("eva02-l", dict(img_size=224, patch_size=14), 303.27),  # timm's eva02_large_patch14_224 less its final norm
    ],
)
def test_full_size_backbones_at_native_resolution_have_the_architectures_sizes(name, native, millions):
    with torch.device("meta"):
        b = build_backbone(name, pretrained=False, **native)
    assert sum(p.numel() for p in b.parameters()) / 1e6 == pytest.approx(millions, abs=0.005)
