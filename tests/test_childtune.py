"""ChildTuning-D: the Fisher mask is the top-k of the squared batch gradients, and only it trains."""

import pytest
import torch

from baselines.childtune import ChildTune  # importing registers "childtune"
from fishertune.backbones import build_backbone
from fishertune.engine.optim import build_optimizer
from fishertune.errors import UserError
from fishertune.fisher import SparseAdamW, block_parameters, budget_elements
from fishertune.heads import build_head
from fishertune.segmentor import Segmentor
from fishertune.tuning import MethodContext, build_method

IMAGES = 5  # batches of 2, 2 and 1 (the last cut to the remainder)


def _segmentor():
    torch.manual_seed(0)
    return Segmentor(build_backbone("dinov2-tiny", pretrained=False, seed=0), build_head("light", 128, 19, channels=32))


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, 64, 64, generator=gen), torch.randint(0, 19, (2, 64, 64), generator=gen))
            for _ in range(4)]


def _context(batches, source_images=IMAGES):
    def source_batches(n):
        return (batches[i % len(batches)] for i in range(n))

    return MethodContext(device=torch.device("cpu"), seed=0, source_batches=source_batches,
                         source_images=source_images)


def _reference_scores(seg, batches, images, max_grad_norm):
    """ChildTuning's calculate_fisher, written out: per batch, clip each parameter, square, average."""
    params = block_parameters(seg.backbone)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    seen = n_batches = 0
    clipped = False
    seg.train()
    for x, y in batches:
        x, y = x[: images - seen], y[: images - seen]
        seg.zero_grad(set_to_none=True)
        seg.loss(x, y).backward()
        for n, p in params.items():
            g = p.grad.clone()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(p, max_grad_norm)
                clipped |= not torch.equal(g, p.grad)
            acc[n] += p.grad ** 2
        n_batches += 1
        seen += x.shape[0]
        if seen >= images:
            break
    seg.zero_grad(set_to_none=True)
    assert n_batches == 3
    return {n: a / n_batches for n, a in acc.items()}, clipped


@pytest.mark.parametrize("max_grad_norm", [None, 1e-8])  # tiny models' gradients are far below 1.0
def test_mask_is_topk_of_squared_gradients_and_only_it_trains(max_grad_norm):
    seg, batches = _segmentor(), _batches()
    m = build_method("childtune", {"max_grad_norm": max_grad_norm})
    assert isinstance(m, ChildTune)
    ctx = _context(batches)
    m.apply(seg, ctx)
    seg.head.requires_grad_(True)
    k = budget_elements(seg.backbone, 0.05)
    assert m.trainable_backbone_params(seg) == k  # known before the mask exists
    with pytest.raises(RuntimeError, match="before_training"):
        m.sparse_indices(seg)

    torch.manual_seed(5)  # the same dropout / drop-path draws in both passes
    ref, clipped = _reference_scores(seg, batches, IMAGES, max_grad_norm)
    assert clipped == (max_grad_norm is not None)
    torch.manual_seed(5)
    m.before_training(seg, ctx)
    assert seg.training and all(p.grad is None for p in seg.parameters())
    assert all(p.requires_grad for p in seg.head.parameters())

    mask = m.sparse_indices(seg)
    params = block_parameters(seg.backbone)
    assert set(mask) == set(params)
    assert sum(i.numel() for i in mask.values()) == k == m.trainable_backbone_params(seg)
    # the reference top-k (stable sort: ties to the earlier element, as topk_mask breaks them)
    names = list(params)
    flat = torch.cat([ref[n].reshape(-1) for n in names])
    kth = torch.sort(flat, descending=True).values[k - 1]
    assert kth > 0  # every selected element had a non-zero gradient (so Adam moves it below)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    got = torch.zeros_like(chosen)
    at = 0
    for n in names:
        got[at + mask[n]] = True
        at += params[n].numel()
    differ = chosen != got
    # the method's float32 sums may differ from the reference in the last bits: only elements at the
    # threshold itself may then swap
    assert int(differ.sum()) <= 4
    assert torch.allclose(flat[differ], kth.expand(int(differ.sum())), rtol=1e-5, atol=0)

    # train: exactly the selected elements of the backbone change, the head trains
    before = {n: p.detach().clone() for n, p in seg.named_parameters()}
    opt = build_optimizer(seg, lr=1e-3, weight_decay=0.05, sparse=m.sparse_indices(seg))
    assert isinstance(opt, SparseAdamW)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        seg.loss(*batches[0]).backward()
        opt.step()
    changed = 0
    for n, p in seg.backbone.named_parameters(prefix="backbone"):
        moved = (p.detach() != before[n]).view(-1)
        if n in mask:
            selected = torch.zeros_like(moved)
            selected[mask[n]] = True
            assert torch.equal(moved, selected), n  # all selected moved, nothing else did
            assert opt.state[p]["exp_avg"].shape == (mask[n].numel(),)
        else:
            assert not moved.any(), n
        changed += int(moved.sum())
    assert changed == k
    assert all(not torch.equal(p, before[f"head.{n}"]) for n, p in seg.head.named_parameters() if p.ndim > 1)


def test_images_and_one_pass():
    batches = _batches()

    def source_batches(n):
        return iter(batches[:n])

    # (images, source_images, batches the pass reads): one pass = ceil(images / 2), the last one cut
    for images, source_images, consumed in ((None, 3, [2, 1]), (2, 100, [2]), (None, 4, [2, 2]), (3, None, [2, 1])):
        seg = _segmentor()
        m = build_method("childtune", {} if images is None else {"images": images})
        ctx = MethodContext(device=torch.device("cpu"), seed=0, source_batches=source_batches,
                            source_images=source_images)
        m.apply(seg, ctx)
        seen, loss = [], seg.loss
        seg.loss = lambda x, y: (seen.append(x.shape[0]), loss(x, y))[1]
        m.before_training(seg, ctx)
        assert seen == consumed


def test_errors():
    seg, batches = _segmentor(), _batches()
    m = build_method("childtune")
    m.apply(seg, MethodContext(device=torch.device("cpu"), seed=0))
    with pytest.raises(RuntimeError, match="source_batches"):
        m.before_training(seg, MethodContext(device=torch.device("cpu"), seed=0))
    with pytest.raises(RuntimeError, match="source_images"):
        m.before_training(seg, _context(batches, source_images=None))
    with pytest.raises(UserError, match="budget"):
        build_method("childtune", {"budget": 1.5})
    with pytest.raises(UserError, match="budget"):
        build_method("childtune", {"budget": 0.0})
    with pytest.raises(UserError, match="'budget'.*transformer blocks"):  # more than the blocks hold
        build_method("childtune", {"budget": 1.0}).apply(_segmentor(), MethodContext(torch.device("cpu"), 0))


def test_params_on_vit_l_without_data():
    from fishertune.report.params import parameter_rows

    (row,) = parameter_rows(backbones=["dinov2-l"], methods=["childtune"], head="light", head_config={})
    assert abs(row["backbone_trainable"] / 1e6 - 15.21) <= 0.01
    assert row["backbone_trainable"] == round(0.05 * row["backbone_total"])


def test_train_loop_updates_only_the_mask(synth_root):
    from fishertune.data import TrainTransform, build_dataset
    from fishertune.engine.train import source_batches, train

    gtav = build_dataset("gtav", synth_root / "gtav", "train")
    transform = TrainTransform(crop_size=64, short_edge_range=(64, 96), max_long_edge=192)
    seg = _segmentor()
    m = build_method("childtune")
    ctx = MethodContext(device=torch.device("cpu"), seed=0, source_images=len(gtav),
                        source_batches=lambda n: source_batches(gtav, transform, 1, 4, 0, 0, n))
    m.apply(seg, ctx)
    seg.head.requires_grad_(True)
    m.before_training(seg, ctx)
    mask = m.sparse_indices(seg)
    before = {n: p.detach().clone() for n, p in seg.backbone.named_parameters(prefix="backbone")}
    train(seg, m, gtav, transform, iterations=2, batch_size=2, lr=1e-3, weight_decay=0.05, poly_power=0.9, warmup=0,
          seed=0, device=torch.device("cpu"))
    moved_selected = 0
    for n, p in seg.backbone.named_parameters(prefix="backbone"):
        moved = (p.detach() != before[n]).view(-1)
        if n in mask:
            outside = moved.clone()
            outside[mask[n]] = False
            assert not outside.any(), n
            moved_selected += int(moved.sum())
        else:
            assert not moved.any(), n
    assert moved_selected > 0.9 * m.trainable_backbone_params(seg)
