"""The EVA-02 family: features, q/k/v addressing, rotary grid, size, and loading EVA-02's release format.

The checkpoints here are written in the layout of EVA-02's MIM release (``eva02_L_pt_m38m_p14.pt``):
separate ``q_proj/k_proj/v_proj`` weights, ``q_bias``/``v_bias``, SwiGLU ``w1/w2/ffn_ln/w3``, the final
``norm``, ``mask_token``, ``lm_head`` and the rope tables at top level and under every block, nested under
``module``. They are made from an independent timm ``Eva`` built with separate projections
(``qkv_fused=False``, as timm's own ``eva02_large_patch14_224``), whose tensors are renamed key by key back
to the official names, so the files do not come from our module. The reference outputs come from a second
such timm model loaded from the same file with timm's own converter (``checkpoint_filter_fn``).
"""

import math
import pickle

import pytest
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.eva import Eva, checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer

from fishertune.backbones import build_backbone
from fishertune.backbones.base import Backbone
from fishertune.backbones.eva02 import load_eva02
from fishertune.errors import UserError

DIM, DEPTH, HEADS, GRID = 64, 4, 4, 6  # tiny width; the official file's 14-px grid is GRID x GRID
SHAPE = {"embed_dim": 64, "depth": 4}  # the small shape these checkpoint tests are written for
HEAD_DIM = DIM // HEADS


def _timm_eva_unfused(img_size=14 * GRID, patch_size=14, depth=DEPTH, seed=3, **kw) -> Eva:
    """timm's EVA02 MIM architecture (the options of ``eva02_large_patch14_224``) at tiny width, with
    separate q/k/v projections like the release; every tensor randomised (biases and norms included)."""
    torch.manual_seed(seed)
    args = dict(img_size=img_size, patch_size=patch_size, embed_dim=DIM, depth=depth, num_heads=HEADS,
                qkv_fused=False, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True,
                ref_feat_shape=(16, 16), num_classes=0, global_pool="")
    model = Eva(**{**args, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _official_rope(ft: int, pt: int = 16, head_dim: int = HEAD_DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-02's ``VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=pt, ft_seq_len=ft)`` tables,
    written out from its definition (Rein's ``intp_freq=True``): positions ``arange(ft) / ft * pt``,
    frequencies ``10000 ** -(arange(0, d, 2) / d)``, each repeated twice (interleaved), h then w."""
    d = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    t = torch.arange(ft) / ft * pt
    f = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # (ft, d)
    f = torch.cat([f[:, None, :].expand(ft, ft, d), f[None, :, :].expand(ft, ft, d)], dim=-1)
    f = f.reshape(ft * ft, 2 * d)
    return f.cos(), f.sin()


def _official_state(model: Eva, predict_dim: int = 2 * DIM) -> dict[str, torch.Tensor]:
    """``model``'s tensors under the key names of EVA-02's MIM release, plus its pretraining-only keys."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    used = set()

    def take(key):
        used.add(key)
        return sd[key]

    grid = model.patch_embed.grid_size[0]
    cos, sin = _official_rope(grid)
    out = {
        "cls_token": take("cls_token"),
        "pos_embed": take("pos_embed"),
        "mask_token": torch.randn(1, 1, DIM),
        "patch_embed.proj.weight": take("patch_embed.proj.weight"),
        "patch_embed.proj.bias": take("patch_embed.proj.bias"),
    }
    for i in range(len(model.blocks)):
        t, o = f"blocks.{i}.", f"blocks.{i}."
        for part in ("norm1", "attn.proj", "norm2"):
            out[o + part + ".weight"] = take(t + part + ".weight")
            out[o + part + ".bias"] = take(t + part + ".bias")
        out[o + "attn.q_proj.weight"] = take(t + "attn.q_proj.weight")
        out[o + "attn.k_proj.weight"] = take(t + "attn.k_proj.weight")
        out[o + "attn.v_proj.weight"] = take(t + "attn.v_proj.weight")
        out[o + "attn.q_bias"] = take(t + "attn.q_proj.bias")
        out[o + "attn.v_bias"] = take(t + "attn.v_proj.bias")
        for official, ours in (("w1", "fc1_g"), ("w2", "fc1_x"), ("ffn_ln", "norm"), ("w3", "fc2")):
            out[o + f"mlp.{official}.weight"] = take(t + f"mlp.{ours}.weight")
            out[o + f"mlp.{official}.bias"] = take(t + f"mlp.{ours}.bias")
        out[o + "attn.rope.freqs_cos"], out[o + "attn.rope.freqs_sin"] = cos.clone(), sin.clone()
    out["norm.weight"], out["norm.bias"] = take("norm.weight"), take("norm.bias")
    out["lm_head.weight"], out["lm_head.bias"] = torch.randn(predict_dim, DIM), torch.randn(predict_dim)
    out["rope.freqs_cos"], out["rope.freqs_sin"] = cos, sin
    assert used == set(sd), set(sd) - used  # every tensor of the source model is in the file
    return out


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(source model, official-layout state, path of the file as released: ``{"module": state}``)."""
    src = _timm_eva_unfused()
    state = _official_state(src)
    path = tmp_path_factory.mktemp("eva02") / "eva02_L_pt_m38m_p14.pt"
    torch.save({"module": state}, path)
    return src, state, path


def _native(**kw) -> Backbone:
    return build_backbone("eva02-tiny", pretrained=False, **SHAPE, seed=0, img_size=14 * GRID, patch_size=14, **kw).eval()


def test_tiny_features_are_four_levels_at_strides_4_to_32_of_the_patch_grid():
    b = build_backbone("eva02-tiny", pretrained=False, **SHAPE, seed=0)
    feats = b.forward_features(torch.randn(2, 3, 64, 64))
    grid = 64 // b.patch_size
    assert b.patch_size == 8 and b.family == "eva02" and b.out_indices == (0, 1, 2, 3)
    assert [tuple(f.shape) for f in feats] == [(2, DIM, grid * s, grid * s) for s in (4, 2, 1, 0.5)]
    assert len(b.blocks) == DEPTH and b.blocks is b.eva.blocks


def test_build_is_deterministic_for_a_seed():
    a, b, c = (build_backbone("eva02-tiny", pretrained=False, **SHAPE, seed=s) for s in (1, 1, 2))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


def test_checkpoint_loads_at_native_patch_14_with_qkv_fused_and_every_tensor_unchanged(official):
    _, state, path = official
    b = _native()
    load_eva02(b, path)
    slots = b.qkv()
    assert len(slots) == DEPTH
    for i, slot in enumerate(slots):
        w = getattr(slot.module, slot.weight)
        assert slot.module is b.blocks[i].attn.qkv and slot.bias is None and w.shape == (3 * DIM, DIM)
        for which in "qkv":  # the rows of the fused weight are the release's separate projections
            assert torch.equal(w[slot.rows(which)], state[f"blocks.{i}.attn.{which}_proj.weight"]), (i, which)
        attn = b.blocks[i].attn
        assert torch.equal(attn.q_bias, state[f"blocks.{i}.attn.q_bias"])
        assert torch.equal(attn.v_bias, state[f"blocks.{i}.attn.v_bias"])
        assert torch.count_nonzero(attn.k_bias) == 0  # EVA's key has no bias
        mlp = b.blocks[i].mlp
        assert torch.equal(mlp.fc1_g.weight, state[f"blocks.{i}.mlp.w1.weight"])  # gate: silu(w1 x) * w2 x
        assert torch.equal(mlp.fc1_x.weight, state[f"blocks.{i}.mlp.w2.weight"])
        assert torch.equal(mlp.norm.bias, state[f"blocks.{i}.mlp.ffn_ln.bias"])
    assert torch.equal(b.eva.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    assert torch.equal(b.eva.pos_embed, state["pos_embed"])
    assert torch.equal(b.eva.cls_token, state["cls_token"])


def test_features_equal_timm_evas_own_block_outputs_at_native_patch_14(official):
    """Our fused model vs an unfused timm Eva loaded from the same file by timm's own converter."""
    _, state, path = official
    ref = _timm_eva_unfused(seed=11, global_pool="avg")  # 'avg' gives timm's MIM filter a fc_norm to put norm.* in
    ref.load_state_dict(checkpoint_filter_fn({"module": state}, ref), strict=True)
    ours = _native()
    load_eva02(ours, path)
    x = torch.randn(2, 3, 14 * GRID, 14 * GRID)
    with torch.no_grad():
        want = ref.forward_intermediates(x, indices=list(range(DEPTH)), norm=False, intermediates_only=True)
        got = ours.forward_features(x)
    assert want[2].shape == (2, DIM, GRID, GRID)
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-5)  # the stride-1x map: block 2's output
    for g, w in zip(got, Backbone.multiscale(want)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(want[2], want[1], atol=1e-2)  # the blocks do change the tokens


def test_rotary_table_is_evas_16x16_grid_interpolated_to_the_runs_grid(official):
    _, _, path = official
    for img, patch in ((14 * GRID, 14), (64, 16), (64, 8)):
        b = build_backbone("eva02-tiny", pretrained=False, **SHAPE, seed=0, img_size=img, patch_size=patch)
        grid = img // patch
        _, rope = b.eva._pos_embed(b.eva.patch_embed(torch.zeros(1, 3, img, img)))
        sin, cos = rope.tensor_split(2, dim=-1)  # timm's table: cat([sin, cos])
        want_cos, want_sin = _official_rope(grid)
        torch.testing.assert_close(cos, want_cos, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sin, want_sin, rtol=1e-5, atol=1e-5)


def test_reins_setting_patch_16_resamples_kernel_and_position_grid(official):
    _, state, path = official
    b = build_backbone("eva02-tiny", pretrained=False, **SHAPE, seed=0, img_size=64, patch_size=16).eval()
    load_eva02(b, path)
    kernel = resample_patch_embed(state["patch_embed.proj.weight"], [16, 16], interpolation="bicubic", antialias=True)
    pos = resample_abs_pos_embed(state["pos_embed"], new_size=[4, 4], old_size=[GRID, GRID], num_prefix_tokens=1,
                                 interpolation="bicubic", antialias=True)
    assert b.eva.patch_embed.proj.weight.shape == (DIM, 3, 16, 16) and b.eva.pos_embed.shape == (1, 1 + 16, DIM)
    torch.testing.assert_close(b.eva.patch_embed.proj.weight, kernel, rtol=0, atol=0)
    torch.testing.assert_close(b.eva.pos_embed, pos, rtol=0, atol=0)
    assert torch.equal(b.eva.pos_embed[:, 0], state["pos_embed"][:, 0])  # the class token's entry is kept
    assert torch.equal(b.blocks[3].attn.qkv.weight[DIM : 2 * DIM], state["blocks.3.attn.k_proj.weight"])
    assert [f.shape[-1] for f in b.forward_features(torch.randn(1, 3, 64, 64))] == [16, 8, 4, 2]


def test_p14to16_file_with_16px_kernel_and_resized_grid_loads_unchanged(official, tmp_path):
    """``eva02_L_pt_m38m_p14to16.pt`` (Rein's converter): kernel and grid already fit patch 16."""
    _, state, _ = official
    conv = dict(state)
    conv["patch_embed.proj.weight"] = torch.nn.functional.interpolate(
        state["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False)
    conv["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=[4, 4], num_prefix_tokens=1)
    path = tmp_path / "eva02_L_pt_m38m_p14to16.pt"
    torch.save({"model": conv}, path)
    b = build_backbone("eva02-tiny", pretrained=False, **SHAPE, seed=0, img_size=64, patch_size=16)
    load_eva02(b, path)
    assert torch.equal(b.eva.patch_embed.proj.weight, conv["patch_embed.proj.weight"])
    assert torch.equal(b.eva.pos_embed, conv["pos_embed"])


def test_safetensors_export_loads(official, tmp_path):
    from safetensors.torch import save_file

    _, state, _ = official
    path = tmp_path / "eva02_L_pt_m38m_p14.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    b = _native()
    load_eva02(b, path)
    assert torch.equal(b.blocks[1].attn.qkv.weight[2 * DIM :], state["blocks.1.attn.v_proj.weight"])
    assert torch.equal(b.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.w3.weight"])


def test_qkv_module_is_called_and_its_key_rows_are_the_keys(official):
    _, _, path = official
    b = _native()
    load_eva02(b, path)
    slot = b.qkv()[1]
    calls = []
    handle = slot.module.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    x = torch.randn(1, 3, 14 * GRID, 14 * GRID)
    with torch.no_grad():
        before = b.forward_features(x)
    handle.remove()
    assert calls == [(1, 1 + GRID * GRID, 3 * DIM)]  # a wrapper or hook on attn.qkv takes effect
    # zero keys (EVA has no key bias): every query attends uniformly, so attention is the same for all tokens
    attn = b.blocks[1].attn
    with torch.no_grad():
        getattr(slot.module, slot.weight)[slot.rows("k")] = 0.0
        tokens = torch.randn(1, 1 + GRID * GRID, DIM)
        rope = b.eva.rope.get_embed(shape=(GRID, GRID))
        out = attn(tokens, rope=rope)
        after = b.forward_features(x)
    torch.testing.assert_close(out, out[:, :1].expand_as(out), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before[3], after[3])


def test_full_size_eva02_l_at_512_patch16_parameter_count():
    with torch.device("meta"):
        b = build_backbone("eva02-l", pretrained=False)
    n = sum(p.numel() for p in b.parameters())
    assert b.patch_size == 16 and b.num_layers == 24 and b.embed_dim == 1024 and b.out_indices == (7, 11, 15, 23)
    hidden = int(1024 * 4 * 2 / 3)  # 2730
    block = (2 * 2 * 1024  # norm1, norm2
             + 3 * 1024 * 1024 + 2 * 1024  # fused qkv weight, q_bias, v_bias (no k bias)
             + 1024 * 1024 + 1024  # attn.proj
             + 2 * (1024 * hidden + hidden) + 2 * hidden + hidden * 1024 + 1024)  # w1, w2, ffn_ln, w3
    stem = 3 * 16 * 16 * 1024 + 1024 + 1024 + (1 + 32 * 32) * 1024  # 16x16 kernel+bias, class token, 32x32+1 positions
    # 304,237,504 = 304.24M: the backbone Rein trains (no final norm, no MIM head, no mask token; the rotary
    # tables are buffers). The "about 304.3M"; the paper prints 304.20 for every row.
    assert n == 24 * block + stem == 304_237_504


def test_missing_projection_is_one_line_naming_file_and_key(official, tmp_path):
    _, state, _ = official
    cut = {k: v for k, v in state.items() if k != "blocks.2.attn.k_proj.weight"}
    path = tmp_path / "truncated.pt"
    torch.save({"module": cut}, path)
    with pytest.raises(UserError, match=r"truncated\.pt.*1 missing: blocks\.2\.attn\.qkv\.weight.*unexpected: "
                                        r"blocks\.2\.attn\.q_proj\.weight"):
        load_eva02(_native(), path)


def test_other_family_and_eva_clip_checkpoints_are_refused(official, tmp_path):
    torch.manual_seed(0)
    dino = VisionTransformer(img_size=14 * GRID, patch_size=14, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                             num_classes=0, global_pool="", init_values=1e-5)
    dino_state = dict(dino.state_dict(), mask_token=torch.zeros(1, DIM))  # dinov2_vitl14_pretrain.pth layout
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(dino_state, path)
    with pytest.raises(UserError, match=r"dinov2_vitl14_pretrain\.pth does not fit Eva: .*missing: .*unexpected: "):
        load_eva02(_native(), path)
    # an EVA-CLIP vision tower has a LayerNorm inside attention (inner_attn_ln) that EVA-02's MIM model lacks
    _, state, _ = official
    clip_like = dict(state, **{"blocks.0.attn.inner_attn_ln.weight": torch.ones(DIM),
                               "blocks.0.attn.inner_attn_ln.bias": torch.zeros(DIM)})
    path = tmp_path / "eva_clip.pt"
    torch.save(clip_like, path)
    with pytest.raises(UserError, match=r"eva_clip\.pt.*2 unexpected: blocks\.0\.attn\.inner_attn_ln"):
        load_eva02(_native(), path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_truncated_file_and_pickled_code_are_refused_without_running_it(official, tmp_path, capsys):
    _, _, good = official
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match=r"cut\.pt cannot be read"):
        load_eva02(_native(), cut)

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"module": Payload()}, f)
    with pytest.raises(UserError, match="other than tensors|cannot be read"):
        load_eva02(_native(), evil)
    assert "code ran" not in capsys.readouterr().out


def test_missing_weights_say_where_they_were_looked_for(monkeypatch, tmp_path):
    monkeypatch.delenv("FISHERTUNE_WEIGHTS", raising=False)
    with pytest.raises(UserError, match="FISHERTUNE_WEIGHTS"):
        build_backbone("eva02-l")
    monkeypatch.setenv("FISHERTUNE_WEIGHTS", str(tmp_path))
    with pytest.raises(UserError, match=str(tmp_path / "eva02_L_pt_m38m_p14.pt")):
        build_backbone("eva02-l")


def test_rope_reference_formula_matches_evas_definition_at_the_pretraining_grid():
    # sanity of the test's own formula: at ft == pt it is the plain (uninterpolated) table, whose first
    # position is the identity rotation and whose w-half of the second row advances by the base frequencies
    cos, sin = _official_rope(16)
    assert torch.equal(cos[0], torch.ones(HEAD_DIM)) and torch.equal(sin[0], torch.zeros(HEAD_DIM))
    d = HEAD_DIM // 2
    base = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    torch.testing.assert_close(sin[1, d:], torch.sin(base).repeat_interleave(2))
    assert math.isclose(float(cos[1, 0]), 1.0)  # row 1 is (h=0, w=1): the h-half has not turned
