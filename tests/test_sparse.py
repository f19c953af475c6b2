"""Sparse-update machinery: budgets, global top-k, and SparseAdamW against torch's AdamW."""

import copy
import io

import pytest
import torch
from torch import nn

from fishertune.backbones import build_backbone
from fishertune.engine.optim import build_optimizer, param_groups
from fishertune.errors import UserError
from fishertune.fisher import SparseAdamW, block_parameters, budget_elements, state_bytes, topk_mask


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 5))


def _groups(model, wd, indices=None):
    groups = [g for g in param_groups(model, wd) if g["params"]]
    if indices is not None:
        for g in groups:
            g["indices"] = [indices.get(id(p)) for p in g["params"]]
    return groups


def _set_grads(models, step):
    gen = torch.Generator().manual_seed(100 + step)
    for ps in zip(*(m.parameters() for m in models)):
        g = torch.randn(ps[0].shape, generator=gen)
        for p in ps:
            p.grad = g.clone()


def _random_indices(model, fraction, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for p in model.parameters():
        k = max(1, int(fraction * p.numel()))
        out[id(p)] = torch.sort(torch.randperm(p.numel(), generator=gen)[:k]).values
    return out


@pytest.mark.parametrize("foreach", [False, True])
def test_dense_groups_match_torch_adamw(foreach):
    ref, mine = _model(), _model()
    opt_ref = torch.optim.AdamW(_groups(ref, 0.05), lr=1e-2, foreach=foreach)
    opt = SparseAdamW(_groups(mine, 0.05), lr=1e-2, foreach=foreach)
    sched_ref = torch.optim.lr_scheduler.LambdaLR(opt_ref, lambda it: 0.9 ** it)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.9 ** it)
    for step in range(5):
        _set_grads([ref, mine], step)
        opt_ref.step(), opt.step()
        sched_ref.step(), sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.9 ** 5)
    for a, b in zip(ref.parameters(), mine.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ref.parameters(), mine.parameters()):
        assert torch.equal(opt_ref.state[a]["exp_avg_sq"], opt.state[b]["exp_avg_sq"])


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_indexed_update_matches_masked_dense_and_leaves_the_rest(wd, foreach):
    ref, mine = _model(), _model()
    start = copy.deepcopy(mine)
    idx = _random_indices(mine, 0.2)
    by_name = {n: idx[id(p)] for n, p in mine.named_parameters()}
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=wd)
    opt = SparseAdamW([{"params": list(mine.parameters()), "indices": [idx[id(p)] for p in mine.parameters()]}],
                      lr=1e-2, weight_decay=wd, foreach=foreach)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1 - it / 10)
    sched_ref = torch.optim.lr_scheduler.LambdaLR(opt_ref, lambda it: 1 - it / 10)
    for step in range(4):
        _set_grads([ref, mine], step)
        for (n, p) in ref.named_parameters():  # the reference sees the gradient masked
            mask = torch.zeros(p.numel(), dtype=torch.bool)
            mask[by_name[n]] = True
            p.grad = p.grad * mask.view(p.shape)
        opt_ref.step(), opt.step()
        sched_ref.step(), sched.step()
    for (n, a), b, s in zip(ref.named_parameters(), mine.parameters(), start.parameters()):
        sel = by_name[n]
        torch.testing.assert_close(b.view(-1)[sel], a.view(-1)[sel], rtol=1e-6, atol=1e-8)
        assert not torch.equal(b.view(-1)[sel], s.view(-1)[sel])  # the selected elements did move
        rest = torch.ones(b.numel(), dtype=torch.bool)
        rest[sel] = False
        assert torch.equal(b.view(-1)[rest], s.view(-1)[rest])  # bit-identical, weight decay or not
        assert opt.state[b]["exp_avg"].shape == (sel.numel(),)
        torch.testing.assert_close(opt.state[b]["exp_avg"], opt_ref.state[a]["exp_avg"].view(-1)[sel])


def test_state_dict_round_trip_continues_identically():
    a, b = _model(), _model()
    idx = _random_indices(a, 0.3, seed=1)
    opt_a = SparseAdamW(_groups(a, 0.05, idx), lr=1e-2)
    for step in range(3):
        _set_grads([a], step)
        opt_a.step()
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "optim": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    b.load_state_dict(ckpt["model"])
    other = _random_indices(b, 0.1, seed=2)  # built with another mask: loading must restore the saved one
    opt_b = SparseAdamW(_groups(b, 0.05, other), lr=1e-2)
    opt_b.load_state_dict(ckpt["optim"])
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
        for ia, ib in zip(ga["indices"], gb["indices"]):
            assert torch.equal(ia, ib)
    for step in range(3, 6):
        _set_grads([a, b], step)
        opt_a.step(), opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
        assert torch.equal(opt_a.state[pa]["exp_avg"], opt_b.state[pb]["exp_avg"])


def test_bad_indices_are_refused():
    p = nn.Parameter(torch.zeros(10))
    for bad in (torch.tensor([3, 1]), torch.tensor([1, 1]), torch.tensor([10]), torch.tensor([0.5])):
        with pytest.raises(ValueError):
            SparseAdamW([{"params": [p], "indices": [bad]}])


def test_state_of_a_5_percent_mask_is_small():
    backbone = build_backbone("dinov2-tiny", pretrained=False, seed=0)
    dense_model = copy.deepcopy(backbone)
    dense = torch.optim.AdamW(dense_model.parameters(), lr=1e-3)
    for p in dense_model.parameters():
        p.grad = torch.ones_like(p)
    dense.step()
    k = budget_elements(backbone, 0.05)
    params = block_parameters(backbone, prefix="")
    gen = torch.Generator().manual_seed(0)
    mask = topk_mask({n: torch.rand(p.shape, generator=gen) for n, p in params.items()}, k)
    opt = SparseAdamW([{"params": list(params.values()), "indices": [mask[n] for n in params]}], lr=1e-3)
    for p in params.values():
        p.grad = torch.ones_like(p)
    opt.step()
    assert sum(opt.state[p]["exp_avg"].numel() for p in params.values()) == k
    assert 0 < state_bytes(opt) <= 0.15 * state_bytes(dense)
    assert state_bytes(dense) >= 8 * sum(p.numel() for p in backbone.parameters())


def test_topk_mask_keeps_exactly_k_with_a_global_threshold():
    gen = torch.Generator().manual_seed(0)
    scores = {
        "a": torch.randn(40, 30, generator=gen),
        "b": torch.randn(500, generator=gen).round(),  # many ties
        "c": -torch.rand(3, 7, generator=gen),
        "d": torch.tensor([0.0, -0.0, 0.0, 1e-40, -1e-40]),
        "e": torch.zeros(0),
    }
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    offsets, at = {}, 0
    for n, s in scores.items():
        offsets[n], at = at, at + s.numel()
    for k in (0, 1, 7, 300, 777, 1000, flat.numel() - 1, flat.numel()):
        mask = topk_mask(scores, k)
        assert set(mask) == set(scores)
        assert sum(m.numel() for m in mask.values()) == k
        kept = torch.zeros(flat.numel(), dtype=torch.bool)
        for n, m in mask.items():
            assert m.dtype == torch.int64
            assert bool((m[1:] > m[:-1]).all())  # sorted, unique
            kept[offsets[n] + m] = True
        if 0 < k < flat.numel():
            assert flat[kept].min() >= flat[~kept].max()
        # ties: the earliest positions in candidate order win (a stable descending sort)
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        expect = torch.zeros_like(kept)
        expect[order] = True
        assert torch.equal(kept, expect)
    with pytest.raises(ValueError):
        topk_mask({"x": torch.tensor([1.0, float("nan")])}, 1)
    with pytest.raises(ValueError):
        topk_mask(scores, flat.numel() + 1)


@pytest.mark.parametrize("name", ["dinov2-l", "clip-l", "mae-l", "eva02-l"])
def test_budget_on_vit_l_is_15_21m(name):
    with torch.device("meta"):
        backbone = build_backbone(name, pretrained=False)
    k = budget_elements(backbone, 0.05)
    total = sum(p.numel() for p in backbone.parameters())
    assert k == round(0.05 * total)
    assert abs(k / 1e6 - 15.21) <= 0.01
    assert k <= sum(p.numel() for p in backbone.blocks.parameters())


def test_budget_errors():
    backbone = build_backbone("dinov2-tiny", pretrained=False, seed=0)
    with pytest.raises(UserError, match=r"field 'budget': 1.5 \(150%\).*\(0, 1\]"):
        budget_elements(backbone, 1.5, where="field 'budget'")
    with pytest.raises(UserError, match=r"must be in \(0, 1\]"):
        budget_elements(backbone, 0)
    with pytest.raises(UserError, match="more than the .* in its transformer blocks"):
        budget_elements(backbone, 1.0)  # the whole backbone: more than the blocks hold
    blocks = sum(p.numel() for p in backbone.blocks.parameters())
    assert budget_elements(backbone, 0.5) == round(0.5 * sum(p.numel() for p in backbone.parameters())) < blocks


def test_block_parameters_are_named_as_in_the_segmentor():
    from fishertune.heads import build_head
    from fishertune.segmentor import Segmentor

    for name in ("dinov2-tiny", "clip-tiny"):
        seg = Segmentor(build_backbone(name, pretrained=False, seed=0), build_head("light", 128, 19, channels=32))
        params = block_parameters(seg.backbone)
        named = dict(seg.named_parameters())
        assert params and all(named[n] is p for n, p in params.items())
        assert {id(p) for p in params.values()} == {id(p) for p in seg.backbone.blocks.parameters()}


def test_build_optimizer_with_sparse_indices():
    model = _model()
    assert type(build_optimizer(model, lr=1e-3, weight_decay=0.05)) is torch.optim.AdamW
    assert type(build_optimizer(model, lr=1e-3, weight_decay=0.05, sparse={})) is torch.optim.AdamW
    idx = torch.tensor([0, 5, 7])
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, sparse={"0.weight": idx})
    assert isinstance(opt, SparseAdamW)
    dense = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in dense.param_groups]
    for g, d in zip(opt.param_groups, dense.param_groups):
        assert [id(p) for p in g["params"]] == [id(p) for p in d["params"]]
        for p, i in zip(g["params"], g["indices"]):
            assert (torch.equal(i.long(), idx) and i.dtype == torch.int32) if p is model[0].weight else (i is None)
    with pytest.raises(ValueError, match="not trainable"):
        build_optimizer(model, lr=1e-3, weight_decay=0.05, sparse={"nope.weight": idx})


def test_grow_keeps_the_moments_of_elements_already_training():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5))
    twin = torch.nn.Parameter(w.detach().clone())
    small, large = torch.tensor([1, 4, 9]), torch.tensor([0, 1, 4, 9, 20, 29])
    grown = SparseAdamW([{"params": [w], "indices": [small]}], lr=0.1, weight_decay=0.05)
    fixed = SparseAdamW([{"params": [twin], "indices": [small]}], lr=0.1, weight_decay=0.05)
    grads = [torch.randn(6, 5) for _ in range(6)]
    for step, g in enumerate(grads):
        if step == 3:
            before = w.detach().clone()
            grown.grow({w: large})
            assert grown.state[w]["exp_avg"].shape == (6,)
        w.grad, twin.grad = g.clone(), g.clone()
        grown.step()
        fixed.step()
        if step == 3:  # the new elements moved on their first step, the others stayed put
            moved = (w.detach() != before).flatten().nonzero().flatten()
            assert torch.equal(moved, large)
    flat_w, flat_t = w.detach().flatten(), twin.detach().flatten()
    assert torch.equal(flat_w[small], flat_t[small])  # same trajectory as never growing
    assert not torch.equal(flat_w[large], flat_t[large])
    with pytest.raises(ValueError, match="contain the current"):
        grown.grow({w: torch.tensor([0, 1])})
