"""Mask2Former head: deformable attention, matcher, overfitting, the query hook, size, options."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fishertune.errors import UserError
from fishertune.heads import build_head, check_head
from fishertune.heads.mask2former import Mask2FormerHead, semantic_targets
from fishertune.heads.matcher import HungarianMatcher
from fishertune.heads.msdeform import ms_deform_attn_sample


# ------------------------------------------------------------------ deformable attention
def _bilinear_reference(img: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Value of ``img`` (D x H x W) at normalised (x, y) in [0, 1]: pixel centres at (i + 0.5) / size,
    bilinear between the four neighbouring centres, 0 for a neighbour outside the map."""
    _, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px.item()), math.floor(py.item())
    out = img.new_zeros(img.shape[0])
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        wx = 1 - (px - xi).abs()
        wy = 1 - (py - yi).abs()
        if 0 <= xi < w and 0 <= yi < h:
            out = out + wx * wy * img[:, yi, xi]
    return out


def _deform_reference(value, shapes, locations, weights):
    b, _, m, d = value.shape
    _, q, _, n_levels, n_points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    rows = []
    for bi in range(b):
        per_query = []
        for qi in range(q):
            heads = []
            for mi in range(m):
                acc = value.new_zeros(d)
                for li, (h, w) in enumerate(shapes):
                    img = value[bi, starts[li]:starts[li + 1], mi].T.reshape(d, h, w)
                    for pi in range(n_points):
                        x, y = locations[bi, qi, mi, li, pi]
                        acc = acc + weights[bi, qi, mi, li, pi] * _bilinear_reference(img, x, y)
                heads.append(acc)
            per_query.append(torch.cat(heads))
        rows.append(torch.stack(per_query))
    return torch.stack(rows)


def test_grid_sample_deformable_attention_equals_a_loop_reference_in_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (2, 3), (4, 2)]
    b, q, m, d, p = 2, 3, 2, 3, 2
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, m, d, generator=gen, dtype=torch.float64)
    # some points fall outside [0, 1] to exercise the zero padding
    locations = torch.rand(b, q, m, len(shapes), p, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(b, q, m, len(shapes), p, generator=gen, dtype=torch.float64)
    upstream = torch.randn(b, q, m * d, generator=gen, dtype=torch.float64)

    grads = []
    outs = []
    for fn in (ms_deform_attn_sample, _deform_reference):
        inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
        out = fn(inputs[0], shapes, inputs[1], inputs[2])
        (out * upstream).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in inputs])
    assert outs[0].shape == (b, q, m * d)
    assert (locations < 0).any() and (locations > 1).any()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-8, atol=1e-8)


# ------------------------------------------------------------------ matcher
@pytest.mark.parametrize("queries,gts,seed", [(5, 3, 0), (4, 4, 1), (3, 5, 2), (6, 2, 3)])
def test_hungarian_matcher_finds_the_brute_force_minimum(queries, gts, seed):
    torch.manual_seed(seed)
    k = 7
    cls_logits = torch.randn(queries, k + 1)
    mask_logits = torch.randn(queries, 6, 6) * 3
    gt_labels = torch.randperm(k)[:gts]
    gt_masks = torch.rand(gts, 12, 12) > 0.5
    matcher = HungarianMatcher(num_points=64)

    torch.manual_seed(100 + seed)
    rows, cols = matcher(cls_logits, mask_logits, gt_labels, gt_masks)
    torch.manual_seed(100 + seed)  # the same random points again
    cost = matcher.cost_matrix(cls_logits, mask_logits, gt_labels, gt_masks)

    assert len(rows) == len(cols) == min(queries, gts)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    found = cost[rows, cols].sum().item()
    if queries >= gts:
        best = min(sum(cost[perm[g], g].item() for g in range(gts))
                   for perm in itertools.permutations(range(queries), gts))
    else:
        best = min(sum(cost[qi, perm[qi]].item() for qi in range(queries))
                   for perm in itertools.permutations(range(gts), queries))
    assert found == pytest.approx(best, abs=1e-5)


def test_matching_cost_is_class_bce_and_dice_on_the_shared_points():
    torch.manual_seed(0)
    cls_logits = torch.randn(3, 5)
    mask_logits = torch.randn(3, 8, 8)
    gt_labels = torch.tensor([1, 3])
    gt_masks = torch.rand(2, 8, 8) > 0.5
    coords = torch.rand(1, 50, 2)
    cost = HungarianMatcher(2.0, 5.0, 3.0, num_points=50).cost_matrix(cls_logits, mask_logits, gt_labels, gt_masks, coords)
    grid = 2 * coords.view(1, 1, 50, 2) - 1
    for qi, gi in itertools.product(range(3), range(2)):
        p = F.grid_sample(mask_logits[qi][None, None], grid, align_corners=False).flatten()
        t = F.grid_sample(gt_masks[gi][None, None].float(), grid, align_corners=False).flatten()
        cls = -cls_logits[qi].softmax(-1)[gt_labels[gi]]
        bce = F.binary_cross_entropy_with_logits(p, t)
        s = p.sigmoid()
        dice = 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
        assert cost[qi, gi].item() == pytest.approx((2 * cls + 5 * bce + 3 * dice).item(), abs=1e-5)


def test_semantic_targets_are_one_mask_per_present_class_without_ignore():
    labels = torch.tensor([[[0, 0, 255], [4, 4, 255]], [[255, 255, 255], [255, 255, 255]]], dtype=torch.uint8)
    (c0, m0), (c1, m1) = semantic_targets(labels, 19)
    assert c0.tolist() == [0, 4] and m0.shape == (2, 2, 3)
    assert m0[0].tolist() == [[True, True, False], [False, False, False]]
    assert c1.numel() == 0 and m1.shape == (0, 2, 3)
    with pytest.raises(ValueError):
        semantic_targets(torch.full((1, 2, 2), 19), 19)


# ------------------------------------------------------------------ the head on the tiny backbone
def _tiny_batch(synth_root, n=2, size=64):
    from fishertune.data import build_dataset, to_tensor

    ds = build_dataset("gtav", synth_root / "gtav", "train")
    images, labels = [], []
    for i in range(n):
        item = ds[i]
        img = to_tensor(item["image"])[None]
        images.append(F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)[0])
        lab = torch.from_numpy(item["label"].copy())[None, None].float()
        labels.append(F.interpolate(lab, size=(size, size), mode="nearest")[0, 0].long())
    return torch.stack(images), torch.stack(labels)


def _tiny_segmentor(seed=0):
    from fishertune.backbones import build_backbone
    from fishertune.segmentor import Segmentor

    torch.manual_seed(seed)
    return Segmentor(build_backbone("dinov2-tiny", pretrained=False, seed=0), build_head("mask2former-tiny", 128, 19))


def test_tiny_head_overfits_one_small_batch(synth_root):
    """Measured (2 GTAV miniature images at 64x64, 15 and 17 classes, AdamW lr 1e-3, no decay):
    mIoU 0.14 after 25 steps, 0.67 after 100, 0.77 after 200; untrained ~0.0. Threshold 0.55."""
    from fishertune.engine.metrics import confusion_matrix, iou_per_class, mean_iou

    images, labels = _tiny_batch(synth_root)
    seg = _tiny_segmentor()

    def miou():
        with torch.no_grad():
            pred = seg(images).argmax(1)
        assert pred.shape == labels.shape
        return mean_iou(iou_per_class(confusion_matrix(pred, labels, 19)))

    before = miou()
    opt = torch.optim.AdamW(seg.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(200):
        losses = seg.losses(images, labels)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # deep supervision: 3 losses before the first layer and after each of the 3 decoder layers
    assert len(losses) == 12 and {"loss_cls", "loss_mask", "loss_dice", "d0.loss_cls", "d2.loss_dice"} <= set(losses)
    after = miou()
    assert before < 0.2
    assert after > 0.55, f"mIoU {after:.3f} after 200 steps"


def test_predict_is_class_probability_times_mask_probability():
    head = build_head("mask2former-tiny", 16, 5, channels=32, num_queries=4, num_heads=2)
    feats = [torch.randn(1, 16, 8 // 2 ** i * 2, 8 // 2 ** i * 2) for i in range(4)]
    all_cls, all_masks = head(feats)
    assert len(all_cls) == len(all_masks) == 4  # before the first layer + 3 decoder layers
    scores = head.predict(feats)
    assert scores.shape == (1, 5, 16, 16)
    expected = (all_cls[-1].softmax(-1)[0, :, :-1, None, None] * all_masks[-1].sigmoid()[0, :, None]).sum(0)
    torch.testing.assert_close(scores[0], expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the query hook
class _Provider(nn.Module):
    def __init__(self, queries=6, channels=32):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(queries, channels))
        self.to_feat = nn.Linear(channels, channels)

    def forward(self, batch_size):
        embed = self.tokens.unsqueeze(0).expand(batch_size, -1, -1)
        return self.to_feat(embed), embed


def test_query_provider_tensors_are_the_ones_used():
    torch.manual_seed(0)
    head = build_head("mask2former-tiny", 16, 5, channels=32, num_queries=4, num_heads=2, num_points=64)
    feats = [torch.randn(2, 16, 16 // 2 ** i, 16 // 2 ** i) for i in range(4)]
    labels = torch.randint(0, 5, (2, 32, 32))
    own = head.predict(feats)

    provider = _Provider()
    head.query_provider = provider
    assert any(name.startswith("query_provider.") for name, _ in head.named_parameters())
    all_cls, _ = head(feats)
    assert all_cls[0].shape == (2, 6, 6)  # the provider's 6 queries, not the head's 4
    first = head.predict(feats)
    assert not torch.allclose(first, own)
    with torch.no_grad():
        provider.tokens.add_(torch.randn_like(provider.tokens))
    assert not torch.allclose(head.predict(feats), first)

    sum(head.losses(feats, labels).values()).backward()
    assert provider.tokens.grad is not None and provider.tokens.grad.abs().sum() > 0
    assert provider.to_feat.weight.grad.abs().sum() > 0
    assert head.query_feat.weight.grad is None and head.query_embed.weight.grad is None

    head.query_provider = lambda b: (torch.zeros(b, 3, 31), torch.zeros(b, 3, 31))
    with pytest.raises(ValueError, match="query_provider"):
        head.predict(feats)
    head.query_provider = None
    assert not any(name.startswith("query_provider.") for name, _ in head.named_parameters())
    torch.testing.assert_close(head.predict(feats), own)
    head.query_provider = provider  # and back to a module after a plain callable
    torch.testing.assert_close(head.predict(feats), head.predict(feats))
    assert "query_provider" in dict(head.named_children())


# ------------------------------------------------------------------ size and options
def test_full_head_parameter_count_on_meta_device():
    """Rein's settings at in_channels 1024: 20,564,436 parameters (pixel decoder 6,100,672 of which
    encoder 4,393,152; transformer decoder 14,208,768; queries, level embedding, norms and the
    class/mask predictors the rest)."""
    with torch.device("meta"):
        head = build_head("mask2former", 1024, 19)
    assert all(p.is_meta for p in head.parameters())
    count = sum(p.numel() for p in head.parameters())
    assert count == 20_564_436
    assert sum(p.numel() for p in head.layers.parameters()) == 14_208_768
    assert sum(p.numel() for p in head.pixel_decoder.parameters()) == 6_100_672
    assert len(head.layers) == 9 and len(head.pixel_decoder.layers) == 6
    assert head.query_feat.weight.shape == (100, 256)


@pytest.mark.parametrize("name", ["mask2former", "mask2former-tiny"])
def test_check_head_rejects_unknown_options(name):
    with pytest.raises(UserError, match="no option 'num_querys'"):
        check_head(name, {"num_querys": 5})
    assert check_head(name, {"num_queries": 5, "decoder_layers": 2}) is not None
    assert issubclass(check_head(name, {}), Mask2FormerHead)
