"""VPT, Rein and VQT: the backbone's token extension on every family, checked against direct computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from fishertune.backbones import BACKBONES, build_backbone
from fishertune.errors import UserError
from fishertune.heads import build_head
from fishertune.report.params import parameter_rows
from fishertune.segmentor import Segmentor
from fishertune.tuning import MethodContext, build_method

TINY = [n for n in BACKBONES.names() if n.endswith("-tiny")]
CTX = MethodContext(device=torch.device("cpu"), seed=0)


def _segmentor(name: str, head: str = "mask2former-tiny") -> Segmentor:
    torch.manual_seed(0)
    bb = build_backbone(name, pretrained=False, seed=0)
    kwargs = {"channels": 32} if head == "light" else {}
    return Segmentor(bb, build_head(head, bb.embed_dim, 19, **kwargs)).eval()


def _features(seg, x):
    with torch.no_grad():
        return seg.backbone.forward_features(x)


def _max_rel(a_list, b_list):
    return max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(a_list, b_list))


# ------------------------------------------------------------------ VPT
def test_vpt_on_a_timm_vit_equals_prompts_inserted_by_hand():
    seg = _segmentor("mae-tiny")
    build_method("vpt", {"prompts": 5}).apply(seg, CTX)
    bb, x = seg.backbone, torch.randn(2, 3, 64, 64)
    prompts = bb.token_extension.prompt_tokens
    vit = bb.vit
    with torch.no_grad():
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        maps = []
        for i, blk in enumerate(vit.blocks):  # VPT-deep: [cls, P_i, patches] in, prompts dropped after
            t = blk(torch.cat([t[:, :1], prompts[i].expand(2, -1, -1), t[:, 1:]], dim=1))
            t = torch.cat([t[:, :1], t[:, 6:]], dim=1)
            if i in bb.out_indices:
                maps.append(t[:, 1:].transpose(1, 2).reshape(2, bb.embed_dim, 8, 8))
    ours = _features(seg, x)
    for a, b in zip(bb.multiscale(maps), ours):
        torch.testing.assert_close(a, b)


def test_vpt_on_eva02_gives_prompts_no_rotary_position_like_the_class_token():
    # timm's EVA attention skips rope on its first `num_prefix_tokens` tokens: treating class token and
    # prompts as prefix tokens that way must equal our identity rotation for the prompts
    seg = _segmentor("eva02-tiny")
    build_method("vpt", {"prompts": 3}).apply(seg, CTX)
    bb, x = seg.backbone, torch.randn(2, 3, 64, 64)
    prompts, eva = bb.token_extension.prompt_tokens, bb.eva
    with torch.no_grad():
        t, rope = eva._pos_embed(eva.patch_embed(x))
        t = eva.norm_pre(t)
        for i, blk in enumerate(eva.blocks):
            blk.attn.num_prefix_tokens = 4
            t = blk(torch.cat([t[:, :1], prompts[i].expand(2, -1, -1), t[:, 1:]], dim=1), rope=rope)
            blk.attn.num_prefix_tokens = 1
            t = torch.cat([t[:, :1], t[:, 4:]], dim=1)
    last = _features(seg, x)[-1]  # last level: block 3 at half resolution
    expected = F.interpolate(t[:, 1:].transpose(1, 2).reshape(2, bb.embed_dim, 8, 8), scale_factor=0.5,
                             mode="bilinear", align_corners=False)
    torch.testing.assert_close(last, expected)


def _sam_sequence_block(bb):
    """A global-attention SAM block without relative positions: a sequence block on a (B, 1, L, C) map."""
    blk = next(b for b in bb.blocks if b.window_size == 0)
    blk.attn.use_rel_pos = False
    return blk


def test_sam_prompts_are_the_keys_and_values_of_inserted_tokens():
    # on a 1 x L token row SAM's block is a plain sequence block, so inserting prompts is possible there
    # and must give the patch tokens what forward_extended gives them with prompts as keys/values only
    bb = build_backbone("sam-tiny", pretrained=False, seed=0).eval()
    blk = _sam_sequence_block(bb)
    x, prompts = torch.randn(2, 1, 16, bb.embed_dim), torch.randn(2, 5, bb.embed_dim)
    with torch.no_grad():
        inserted = blk(torch.cat([prompts.unsqueeze(1), x], dim=2))[:, :, 5:]
        ours, _ = blk.forward_extended(x, prompts, None)
    torch.testing.assert_close(ours, inserted)


def test_sam_queries_read_every_token_and_change_none():
    bb = build_backbone("sam-tiny", pretrained=False, seed=0).eval()
    blk = _sam_sequence_block(bb)
    x, queries = torch.randn(2, 1, 16, bb.embed_dim), torch.randn(2, 3, bb.embed_dim)
    with torch.no_grad():
        joint = blk(torch.cat([x, queries.unsqueeze(1)], dim=2))  # queries' outputs equal in both
        ours, out = blk.forward_extended(x, None, queries)
        alone = blk(x)
    torch.testing.assert_close(out, joint[:, 0, 16:])
    torch.testing.assert_close(ours, alone)


def test_sam_extended_path_without_extra_tokens_equals_segment_anything():
    # the SDPA path with SAM's decomposed bias as mask, on windowed and global blocks (padding 8 -> 9)
    bb = build_backbone("sam-tiny", pretrained=False, seed=0).eval()
    x = torch.randn(2, 8, 8, bb.embed_dim)
    with torch.no_grad():
        for blk in bb.blocks:
            torch.testing.assert_close(blk.forward_extended(x, None, None)[0], blk(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", TINY)
def test_vpt_changes_features_and_trains_only_its_prompts(backbone):
    seg = _segmentor(backbone)
    with torch.no_grad():  # DINOv2's layer scale (1e-5 at init) would hide any attention change
        for name, p in seg.backbone.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(1.0)
    x = torch.randn(2, 3, 64, 64)
    frozen = _features(seg, x)
    build_method("vpt", {"prompts": 7}).apply(seg, CTX)
    assert [n for n, p in seg.backbone.named_parameters() if p.requires_grad] == ["token_extension.prompt_tokens"]
    assert seg.backbone.token_extension.prompt_tokens.shape == (seg.backbone.num_layers, 7, seg.backbone.embed_dim)
    assert _max_rel(frozen, _features(seg, x)) > 1e-4
    assert [f.shape for f in frozen] == [f.shape for f in _features(seg, x)]  # prompts never reach the head


# ------------------------------------------------------------------ VQT
@pytest.mark.parametrize("backbone", TINY)
def test_vqt_leaves_the_features_unchanged_and_feeds_per_image_queries(backbone):
    seg = _segmentor(backbone)
    x = torch.randn(2, 3, 64, 64)
    frozen = _features(seg, x)
    build_method("vqt").apply(seg, CTX)
    assert _max_rel(frozen, _features(seg, x)) < 1e-5  # equal up to the masked attention's rounding
    ext = seg.backbone.token_extension
    assert ext.query_tokens.shape == (seg.backbone.num_layers, seg.head.num_queries, seg.backbone.embed_dim)
    with torch.no_grad():
        feat, embed = seg.head.queries(2)
    assert embed.shape == (2, seg.head.num_queries, seg.head.channels)
    assert not torch.allclose(embed[0], embed[1])  # the queries summarise each image
    assert not hasattr(seg.head, "query_embed") and not hasattr(seg.head, "query_feat")
    seg.train()
    seg.loss(x, torch.randint(0, 19, (2, 64, 64))).backward()
    assert ext.query_tokens.grad is not None and ext.query_tokens.grad.abs().sum(dim=(1, 2)).gt(0).all()


def test_vqt_query_outputs_are_the_blocks_outputs_for_appended_tokens():
    # on a timm ViT: append the queries to the sequence without any mask; their outputs are the same
    # (a block's query outputs do not depend on whether others read them), layer by layer
    seg = _segmentor("dinov2-tiny")
    build_method("vqt").apply(seg, CTX)
    bb, x = seg.backbone, torch.randn(2, 3, 64, 64)
    ext, vit = bb.token_extension, bb.vit
    with torch.no_grad():
        bb.forward_features(x)
        ours = dict(ext._outputs)
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for i, blk in enumerate(vit.blocks):
            q = ext.query_tokens[i].expand(2, -1, -1)
            joint = blk(torch.cat([t, q], dim=1))
            torch.testing.assert_close(ours[i], joint[:, t.shape[1]:], rtol=1e-5, atol=1e-5)
            t = blk(t)


# ------------------------------------------------------------------ Rein
def _rein_reference(feats, a, b, token2feat, delta_f, scale):
    """Rein's forward_delta_feat + forward, transcribed (feats N x B x C, as their code lays it out)."""
    tokens = a @ b
    attn = torch.einsum("nbc,mc->nbm", feats, tokens) * feats.shape[-1] ** -0.5
    attn = F.softmax(attn, dim=-1)
    delta = torch.einsum("nbm,mc->nbc", attn[:, :, 1:], token2feat(tokens[1:, :]))
    return feats + scale * delta_f(delta + feats)


def test_rein_refinement_matches_reins_equations():
    seg = _segmentor("dinov2-tiny")
    build_method("rein").apply(seg, CTX)
    ext = seg.backbone.token_extension
    with torch.no_grad():
        ext.scale.fill_(0.3)
        f = torch.randn(2, 16, seg.backbone.embed_dim)
        ours = ext.refine(2, f)
        ref = _rein_reference(f.transpose(0, 1), ext.tokens_a[2], ext.tokens_b[2], ext.mlp_token2feat,
                              ext.mlp_delta_f, ext.scale).transpose(0, 1)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("backbone", TINY)
def test_rein_starts_near_the_frozen_model_and_refines_every_block(backbone):
    seg = _segmentor(backbone)
    x = torch.randn(2, 3, 64, 64)
    frozen = _features(seg, x)
    build_method("rein").apply(seg, CTX)
    ext = seg.backbone.token_extension
    assert float(ext.scale.detach()) == pytest.approx(1e-3)
    assert ext.tokens_a.shape == (seg.backbone.num_layers, seg.head.num_queries, 16)
    assert 0 < _max_rel(frozen, _features(seg, x)) < 2e-2  # small scale: close to, not equal to frozen
    with torch.no_grad():
        ext.scale.zero_()
    assert _max_rel(frozen, _features(seg, x)) < 1e-6
    calls = []
    refine = ext.refine
    ext.refine = lambda i, p: calls.append((i, p.shape[1])) or refine(i, p)
    _features(seg, x)
    grid = 64 // seg.backbone.patch_size
    assert calls == [(i, grid * grid) for i in range(seg.backbone.num_layers)]  # class token left out


def test_rein_queries_are_the_merged_tokens():
    seg = _segmentor("clip-tiny")
    build_method("rein").apply(seg, CTX)
    ext = seg.backbone.token_extension
    with torch.no_grad():
        feat, embed = seg.head.queries(3)
        t = ext.link.transform(ext.tokens_a @ ext.tokens_b).permute(1, 2, 0)  # Rein's return_auto
        L = t.shape[-1]
        pooled = torch.cat([F.max_pool1d(t, L), F.avg_pool1d(t, L), t[:, :, -1:]], dim=-1)
        expected = ext.link.merge(pooled.flatten(-2, -1))
    torch.testing.assert_close(embed[1], expected)
    torch.testing.assert_close(feat, seg.head.query_provider.querys2feat(embed))
    c = seg.head.channels
    assert sum(p.numel() for p in seg.head.query_provider.parameters()) == c * c + c  # querys2feat only


# ------------------------------------------------------------------ shared
@pytest.mark.parametrize("method", ["rein", "vqt"])
def test_query_linked_methods_need_a_query_head_and_matching_tokens(method):
    with pytest.raises(UserError, match="no query hook"):
        build_method(method).apply(_segmentor("dinov2-tiny", head="light"), CTX)
    with pytest.raises(UserError, match="must equal the head's num_queries"):
        build_method(method, {"tokens": 7}).apply(_segmentor("dinov2-tiny"), CTX)


def test_two_token_methods_cannot_be_stacked():
    seg = _segmentor("mae-tiny")
    build_method("vpt").apply(seg, CTX)
    with pytest.raises(ValueError, match="already has a token extension"):
        build_method("rein").apply(seg, CTX)


def test_full_size_counts():
    rows = {(r["backbone"], r["method"]): r for r in parameter_rows(["dinov2-l", "sam-h"], ["vpt", "rein", "vqt"])}
    layers, dim = 24, 1024
    assert rows["dinov2-l", "vpt"]["backbone_trainable"] == layers * 150 * dim == 3_686_400  # the paper's 3.69M
    link = (dim * 256 + 256) + (3 * 256 * 256 + 256)  # transform + merge to the 256-wide queries
    rein = layers * 100 * 16 + layers * 16 * dim + 2 * (dim * dim + dim) + 1 + link
    assert rows["dinov2-l", "rein"]["backbone_trainable"] == rein == 2_990_081  # the paper's 2.99M
    assert rows["dinov2-l", "vqt"]["backbone_trainable"] == layers * 100 * dim + link == 2_916_864
    assert rows["sam-h", "vpt"]["backbone_trainable"] == 32 * 150 * 1280
    assert math.isclose(rows["sam-h", "rein"]["backbone_trainable"],
                        32 * 100 * 16 + 32 * 16 * 1280 + 2 * (1280**2 + 1280) + 1 + 1280 * 256 + 256 + 3 * 256**2 + 256)
