"""The SAM family: segment-anything's own encoder, the official whole-model file layout, resizing, sizes."""

import pickle
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.image_encoder import Block, add_decomposed_rel_pos, get_rel_pos
from timm.layers import DropPath

from fishertune.backbones import Backbone, build_backbone
from fishertune.backbones.sam import load_sam
from fishertune.errors import UserError

DIM, DEPTH, HEADS, PATCH, WINDOW, GLOBAL = 64, 4, 4, 8, 3, (1, 3)
SHAPE = {"embed_dim": 64, "depth": 4, "global_attn_indexes": (1, 3), "out_chans": 32}  # the small shape these tests are written for
NATIVE = 128  # the tiny "official" model's pretraining size: a 16x16 grid (SAM-H: 1024 -> 64x64)


def _upstream_sam(img_size=NATIVE, seed=7) -> Sam:
    """A whole tiny SAM from segment-anything's classes, configured as build_sam.py does (eps 1e-6,
    rel pos, windows, global blocks), with the zero-initialised position grid and tables randomised."""
    torch.manual_seed(seed)
    grid = img_size // PATCH
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=GLOBAL, window_size=WINDOW, out_chans=32,
        ),
        prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=32, iou_head_depth=2, iou_head_hidden_dim=16,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2)),
    ).eval()
    with torch.no_grad():
        enc = sam.image_encoder
        enc.pos_embed.normal_(std=0.5)
        for blk in enc.blocks:
            blk.attn.rel_pos_h.normal_(std=0.5)
            blk.attn.rel_pos_w.normal_(std=0.5)
    return sam


def _official_file(tmp_path, sam, name="sam_vit_h_4b8939.pth"):
    """As the release: torch.save of the whole Sam's state_dict."""
    path = tmp_path / name
    torch.save(sam.state_dict(), path)
    return path


def _block_outputs(encoder, x):
    outs = []
    hooks = [blk.register_forward_hook(lambda m, i, o: outs.append(o)) for blk in encoder.blocks]
    with torch.no_grad():
        encoder(x)
    for h in hooks:
        h.remove()
    return outs


def _tiny(**kwargs):
    return build_backbone("sam-tiny", pretrained=False, **SHAPE, seed=0, **kwargs).eval()


def test_tiny_features_are_four_levels_and_exercise_padded_and_global_attention():
    b = build_backbone("sam-tiny", pretrained=False, **SHAPE, seed=0)
    assert [blk.window_size for blk in b.blocks] == [3, 0, 3, 0]  # 8x8 grid is padded to 9x9 for 3x3 windows
    assert all(isinstance(blk, Block) for blk in b.blocks) and b.out_indices == (0, 1, 2, 3)
    feats = b.forward_features(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, DIM, 32, 32), (2, DIM, 16, 16), (2, DIM, 8, 8), (2, DIM, 4, 4)]
    # another input size: the position grid is resized on the fly, the global tables by get_rel_pos
    feats = b.forward_features(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats] == [(32, 48), (16, 24), (8, 12), (4, 6)]


def test_qkv_rows_are_the_query_key_value_that_segment_anythings_attention_uses():
    b = _tiny()
    slots = b.qkv()
    assert len(slots) == DEPTH and all(s.dim == DIM and s.bias == "bias" for s in slots)
    slot = slots[1]  # a global block: 8x8 grid, tables of 2*8-1 rows
    attn = b.blocks[1].attn
    assert slot.module is attn.qkv
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
        x = torch.randn(2, 8, 8, DIM)
        w, bias = getattr(slot.module, slot.weight), getattr(slot.module, slot.bias)

        def heads(which):  # (B * heads, tokens, head_dim), as segment-anything lays them out
            t = x.reshape(2, 64, DIM) @ w[slot.rows(which)].T + bias[slot.rows(which)]
            return t.reshape(2, 64, HEADS, DIM // HEADS).transpose(1, 2).reshape(2 * HEADS, 64, -1)

        q, k, v = heads("q"), heads("k"), heads("v")
        logits = (q * (DIM // HEADS) ** -0.5) @ k.transpose(-2, -1)
        logits = add_decomposed_rel_pos(logits, q, attn.rel_pos_h, attn.rel_pos_w, (8, 8), (8, 8))
        out = (logits.softmax(-1) @ v).reshape(2, HEADS, 8, 8, -1).permute(0, 2, 3, 1, 4).reshape(2, 8, 8, DIM)
        torch.testing.assert_close(attn.proj(out), attn(x))
        # and the order matters: with q and k rows swapped the attention differs
        q_rows = w[slot.rows("q")].clone()
        w[slot.rows("q")] = w[slot.rows("k")]
        w[slot.rows("k")] = q_rows
        assert not torch.allclose(attn.proj(out), attn(x), atol=1e-3)


def test_native_size_features_equal_segment_anythings_block_outputs(tmp_path):
    up = _upstream_sam()
    path = _official_file(tmp_path, up)
    ours = _tiny(img_size=NATIVE, attention="explicit")  # bitwise: segment-anything's own attention
    load_sam(ours, path)
    up_enc = dict(up.image_encoder.named_parameters())
    mine = dict(ours.encoder.named_parameters())
    assert set(mine) == {k for k in up_enc if not k.startswith("neck.")}  # the neck was dropped by name
    for name, p in mine.items():
        assert torch.equal(p, up_enc[name]), name
    x = torch.randn(2, 3, NATIVE, NATIVE)
    ref = _block_outputs(up.image_encoder, x)  # (B, 16, 16, C); the windowed blocks pad 16 -> 18
    with torch.no_grad():
        feats = ours.forward_features(x)
    expect = Backbone.multiscale([ref[i].permute(0, 3, 1, 2) for i in ours.out_indices])
    assert feats[2].shape == (2, DIM, 16, 16)
    for f, e in zip(feats, expect):
        torch.testing.assert_close(f, e, rtol=0, atol=0)


def test_half_resolution_resizes_the_position_grid_and_the_global_rel_pos_tables(tmp_path):
    up = _upstream_sam()
    path = _official_file(tmp_path, up)
    enc = up.image_encoder
    ours = _tiny(img_size=NATIVE // 2)  # 8x8 grid; rel-pos tables sized for it
    load_sam(ours, path)
    # position grid 16x16 -> 8x8 as an NHWC map, bicubic + antialias
    expect_pos = F.interpolate(enc.pos_embed.detach().permute(0, 3, 1, 2), size=(8, 8), mode="bicubic",
                               antialias=True, align_corners=False).permute(0, 2, 3, 1)
    assert ours.encoder.pos_embed.shape == (1, 8, 8, DIM)
    torch.testing.assert_close(ours.encoder.pos_embed.detach(), expect_pos)
    for i, (mine, theirs) in enumerate(zip(ours.blocks, enc.blocks)):
        for axis in "hw":
            table, orig = getattr(mine.attn, f"rel_pos_{axis}"), getattr(theirs.attn, f"rel_pos_{axis}")
            if i in GLOBAL:  # 2*16-1 -> 2*8-1, linear along the table
                assert orig.shape == (31, DIM // HEADS) and table.shape == (15, DIM // HEADS)
                expect = F.interpolate(orig.detach().T[None], size=15, mode="linear")[0].T
                torch.testing.assert_close(table.detach(), expect)
                # what segment-anything's own get_rel_pos would gather from the 31-row table on an 8 grid
                idx = torch.arange(8)[:, None] - torch.arange(8)[None, :] + 7
                torch.testing.assert_close(table.detach()[idx], get_rel_pos(8, 8, orig.detach()))
            else:  # the 3x3 windows are the same at any input size
                assert torch.equal(table, orig) and table.shape == (5, DIM // HEADS)
    # exactness: upstream's encoder with only its position grid replaced (its 31-row tables interpolated
    # on the fly by get_rel_pos) gives our features
    with torch.no_grad():
        enc.pos_embed = torch.nn.Parameter(ours.encoder.pos_embed.detach().clone())
        x = torch.randn(2, 3, 64, 64)
        ref = _block_outputs(enc, x)
        feats = ours.forward_features(x)
    torch.testing.assert_close(feats[2], ref[ours.out_indices[2]].permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)

    # rel_pos_grid=16 keeps the official 31-row tables (as sam-h keeps 127): same outputs
    kept = _tiny(img_size=NATIVE // 2, rel_pos_grid=NATIVE // PATCH)
    load_sam(kept, path)
    assert torch.equal(kept.blocks[1].attn.rel_pos_h, enc.blocks[1].attn.rel_pos_h)
    with torch.no_grad():
        for f, g in zip(kept.forward_features(x), feats):
            torch.testing.assert_close(f, g, rtol=1e-6, atol=1e-6)


def test_neck_is_kept_on_request_and_then_the_encoder_output_is_sams(tmp_path):
    up = _upstream_sam()
    path = _official_file(tmp_path, up)
    ours = _tiny(img_size=NATIVE, neck=True, attention="explicit")
    load_sam(ours, path)
    x = torch.randn(1, 3, NATIVE, NATIVE)
    with torch.no_grad():
        torch.testing.assert_close(ours.encoder(x), up.image_encoder(x), rtol=0, atol=0)
    assert ours.encoder(x).shape == (1, 32, 16, 16)


@pytest.mark.parametrize(
    "layout, suffix",
    [("whole", ".safetensors"), ("encoder with prefix", ".pth"), ("encoder", ".safetensors")],
)
def test_safetensors_and_encoder_only_exports_load(tmp_path, layout, suffix):
    from safetensors.torch import save_file

    up = _upstream_sam()
    state = up.state_dict()
    if layout == "encoder":
        state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    elif layout == "encoder with prefix":
        state = {k: v for k, v in state.items() if k.startswith("image_encoder.")}
    path = tmp_path / f"sam_vit_h{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    ours = _tiny(img_size=NATIVE)
    load_sam(ours, path)
    assert torch.equal(ours.encoder.blocks[3].attn.rel_pos_w, up.image_encoder.blocks[3].attn.rel_pos_w)
    assert torch.equal(ours.encoder.pos_embed, up.image_encoder.pos_embed)


def test_a_dinov2_checkpoint_is_refused_with_one_line(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    dino = VisionTransformer(img_size=128, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                             num_classes=0, global_pool="", init_values=1e-5)
    state = dict(dino.state_dict(), mask_token=torch.zeros(1, DIM))
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(state, path)
    expect = r"dinov2_vitl14_pretrain\.pth does not fit .*missing: blocks\.0\.attn\.rel_pos_h.*unexpected: blocks"
    with pytest.raises(UserError, match=expect) as err:
        load_sam(_tiny(img_size=NATIVE), path)
    assert "\n" not in str(err.value) and "blocks.0.ls1.gamma" in str(err.value)


def test_a_missing_encoder_key_is_named(tmp_path):
    state = _upstream_sam().state_dict()
    del state["image_encoder.blocks.2.attn.qkv.weight"]
    path = tmp_path / "sam_vit_h_4b8939.pth"
    torch.save(state, path)
    expect = r"sam_vit_h_4b8939\.pth does not fit .*1 missing: blocks\.2\.attn\.qkv\.weight"
    with pytest.raises(UserError, match=expect):
        load_sam(_tiny(img_size=NATIVE), path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_truncated_file_and_pickled_code_are_refused_without_running_it(tmp_path, capsys):
    path = _official_file(tmp_path, _upstream_sam())
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match=r"cut\.pth cannot be read"):
        load_sam(_tiny(img_size=NATIVE), cut)

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"image_encoder.pos_embed": Payload()}))
    with pytest.raises(UserError, match=r"evil\.pth"):
        load_sam(_tiny(img_size=NATIVE), evil)
    assert "code ran" not in capsys.readouterr().out


def test_drop_path_is_per_block_per_branch_and_keeps_segment_anythings_forward():
    b = build_backbone("sam-tiny", pretrained=False, **SHAPE, seed=0, drop_path_rate=0.3, attention="explicit")
    rates = [getattr(blk.drop_path, "drop_prob", 0.0) for blk in b.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])  # linear from 0, as Rein's CLIP
    # no parameter or key added: the state_dict is segment-anything's own encoder's (neck removed)
    up = ImageEncoderViT(img_size=64, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                         use_rel_pos=True, global_attn_indexes=GLOBAL, window_size=WINDOW)
    assert {k: v.shape for k, v in b.encoder.state_dict().items()} == {
        k: v.shape for k, v in up.state_dict().items() if not k.startswith("neck.")}
    blk = b.blocks[2]  # windowed, padded 8 -> 9
    x = torch.randn(4, 8, 8, DIM)
    with torch.no_grad():
        ref = Block.forward(blk, x)
        blk.train()
        blk.drop_path = DropPath(0.0)  # the drop-path code path with nothing dropped is upstream's forward
        torch.testing.assert_close(blk(x), ref, rtol=0, atol=0)
        blk.drop_path = DropPath(1.0)  # both branches dropped: the block passes its input through
        assert torch.equal(blk(x), x)
        blk.drop_path = DropPath(0.5)
        torch.manual_seed(0)
        out = blk(x)
        assert not torch.allclose(out, ref)
        blk.eval()  # eval: no dropping
        torch.testing.assert_close(blk(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, count",
    [
        # patch kernel 16*16*3*1280 + 1280 = 984,320; positions 32*32*1280 = 1,310,720; 32 blocks of
        # 19,677,440 (2 LayerNorms 5,120 + qkv 4,919,040 + proj 1,639,680 + MLP 13,113,600) = 629,678,080;
        # relative positions: 28 windowed blocks 2*27*80 = 4,320 each (120,960) and 4 global blocks keeping
        # the official 2*127*80 = 20,320 each (81,280). Total 632,175,360 = the paper's 632.18M "Full".
        ({}, 632_175_360),
        # the global tables resized to the 32x32 grid (2*63*80 each): 40,960 fewer = 632.13M
        ({"rel_pos_grid": None}, 632_134_400),
        # SAM's native setting with the neck: 64x64 positions (+3,932,160) and the neck (+918,528:
        # 1x1 conv 1280*256, 3x3 conv 256*256*9, two LayerNorm2d 2*256 each) = 637,026,048, the official
        # encoder (checked against segment-anything's ImageEncoderViT as build_sam_vit_h configures it)
        ({"img_size": 1024, "neck": True}, 637_026_048),
    ],
)
def test_full_size_counts(kwargs, count):
    with torch.device("meta"):
        b = build_backbone("sam-h", pretrained=False, **kwargs)
        if kwargs.get("neck"):
            official = ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=1280, depth=32, num_heads=16,
                                       qkv_bias=True, use_rel_pos=True, global_attn_indexes=(7, 15, 23, 31),
                                       window_size=14, out_chans=256)
            assert sum(p.numel() for p in official.parameters()) == count
    assert sum(p.numel() for p in b.parameters()) == count
    assert b.out_indices == (7, 15, 23, 31) and b.patch_size == 16 and b.embed_dim == 1280
    assert [i for i, blk in enumerate(b.blocks) if blk.window_size == 0] == [7, 15, 23, 31]
    assert b.blocks[7].attn.rel_pos_h.shape[0] == (63 if kwargs.get("rel_pos_grid", 64) is None else 127)
    assert b.blocks[0].attn.rel_pos_h.shape == (27, 80)


def test_sam_h_names_its_official_file_when_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("FISHERTUNE_WEIGHTS", str(tmp_path))
    with pytest.raises(UserError, match=r"sam_vit_h_4b8939\.pth"):
        build_backbone("sam-h")


def test_sdpa_attention_the_default_equals_segment_anythings_own_up_to_rounding():
    x = torch.randn(2, 3, 64, 64)
    sdpa, explicit = _tiny(), _tiny(attention="explicit")
    assert all(blk.sdpa for blk in sdpa.blocks) and not any(blk.sdpa for blk in explicit.blocks)
    explicit.load_state_dict(sdpa.state_dict())
    with torch.no_grad():
        for f, g in zip(sdpa.forward_features(x), explicit.forward_features(x)):
            torch.testing.assert_close(f, g, rtol=1e-5, atol=1e-5)
            assert not torch.equal(f, g) or f.abs().max() == 0  # really another computation
    # and in training, with drop path, the same random draws give the same outputs
    sdpa_t = build_backbone("sam-tiny", pretrained=False, **SHAPE, seed=0, drop_path_rate=0.3).train()
    explicit_t = build_backbone("sam-tiny", pretrained=False, **SHAPE, seed=0, drop_path_rate=0.3, attention="explicit").train()
    torch.manual_seed(3)
    a = sdpa_t.forward_features(x)
    torch.manual_seed(3)
    b = explicit_t.forward_features(x)
    for f, g in zip(a, b):
        torch.testing.assert_close(f, g, rtol=1e-5, atol=1e-5)
