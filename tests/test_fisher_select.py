"""Selectors of the FisherTune ablation (random, random within q/k/v, FIM, Delta-FIM, DR-FIM) and the
selection heat map (issue 7 items 3, 6 and 7)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fishertune.backbones.registry import build_backbone
from fishertune.errors import UserError
from fishertune.fisher.estimate import FisherEstimate
from fishertune.fisher.plot import (DPI, GROUPS, element_groups, figure_size, group_counts, plot_selection,
                                    selection_fractions)
from fishertune.fisher.select import SELECTORS, qkv_elements, random_elements, select
from fishertune.fisher.sparse import block_parameters, topk_mask

FAMILIES = ("clip", "mae", "sam", "eva02", "dinov2")


pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny passes (conftest.py)


#: the small shape HAND_COUNTS is written for (width 64, 4 blocks; the shipped tiny models are larger)
SMALL = {"clip": {"width": 64, "layers": 4}, "sam": {"embed_dim": 64, "depth": 4, "global_attn_indexes": (1, 3),
                                                    "out_chans": 32}}


@pytest.fixture(scope="module")
def backbones():
    return {f: build_backbone(f"{f}-tiny", pretrained=False, seed=0, **SMALL.get(f, {"embed_dim": 64, "depth": 4}))
            for f in FAMILIES}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_indices(out: dict, candidates: dict, k: int) -> None:
    assert list(out) == list(candidates)
    assert sum(v.numel() for v in out.values()) == k
    for name, idx in out.items():
        assert idx.dtype == torch.int64 and idx.ndim == 1
        if idx.numel():
            assert bool((idx[1:] > idx[:-1]).all()), f"{name}: not sorted and unique"
            assert 0 <= int(idx[0]) and int(idx[-1]) < candidates[name].numel()


# --------------------------------------------------------------------------------------------- q / k / v
def _expected_qkv_zeros(backbone, which: str, family: str) -> dict[str, torch.Tensor]:
    """Boolean masks of the q/k/v elements built independently: QKV rows, fused bias rows, and EVA-02's
    q_bias / v_bias found by *name* (the implementation finds them by identity)."""
    candidates = block_parameters(backbone)
    names = {id(p): n for n, p in candidates.items()}
    masks = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in candidates.items()}
    for q in backbone.qkv():
        masks[names[id(getattr(q.module, q.weight))]][q.rows(which)] = True
        if q.bias is not None:
            masks[names[id(getattr(q.module, q.bias))]][q.rows(which)] = True
    if family == "eva02" and which in "qv":
        for n in candidates:
            if n.endswith(f".attn.{which}_bias"):
                masks[n][:] = True
    return masks


@pytest.mark.parametrize("family", FAMILIES)
def test_qkv_elements_are_exactly_the_rows(backbones, family):
    b = backbones[family]
    candidates = block_parameters(b)
    dim = b.embed_dim
    sets = {}
    for which in "qkv":
        got = qkv_elements(b, which)
        copies = {n: torch.ones_like(p, dtype=torch.float32) for n, p in candidates.items()}
        for n, idx in got.items():
            assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all())
            copies[n].view(-1)[idx] = 0
        expected = _expected_qkv_zeros(b, which, family)
        for n in candidates:
            assert torch.equal(copies[n] == 0, expected[n]), f"{family} {which}: {n}"
        # per block: dim x in weight elements, plus dim bias elements (EVA-02's key has no bias)
        has_bias = not (family == "eva02" and which == "k")
        per_block = {}
        for n, idx in got.items():
            block = next(i for i, blk in enumerate(b.blocks) if any(p is candidates[n] for p in blk.parameters()))
            per_block[block] = per_block.get(block, 0) + idx.numel()
        assert per_block == {i: dim * dim + (dim if has_bias else 0) for i in range(b.num_layers)}
        sets[which] = {n: set(idx.tolist()) for n, idx in got.items()}
    for n in candidates:
        q, k, v = (sets[w].get(n, set()) for w in "qkv")
        assert not (q & k) and not (q & v) and not (k & v), n


def test_qkv_elements_rejects_a_bad_part(backbones):
    with pytest.raises(ValueError, match="'q', 'k' or 'v'"):
        qkv_elements(backbones["mae"], "o")


# --------------------------------------------------------------------------------------------- random
def _toy(sizes=(7, 300, 1000, 20_000)) -> dict[str, nn.Parameter]:
    return {f"t{i}": nn.Parameter(torch.zeros(n)) for i, n in enumerate(sizes)}


@pytest.mark.parametrize("k", [0, 1, 500, 10_000, 21_306, 21_307])
def test_random_exact_unique_sorted_in_range(k):
    candidates = _toy()
    _check_indices(random_elements(candidates, k, _gen(0)), candidates, k)


def test_random_deterministic_and_seed_dependent():
    candidates = _toy()
    a = random_elements(candidates, 5000, _gen(1))
    b = random_elements(candidates, 5000, _gen(1))
    c = random_elements(candidates, 5000, _gen(2))
    assert all(torch.equal(a[n], b[n]) for n in candidates)
    assert not all(torch.equal(a[n], c[n]) for n in candidates)
    g = _gen(1)  # the generator's state advances: a second draw from it differs
    first, second = random_elements(candidates, 5000, g), random_elements(candidates, 5000, g)
    assert not all(torch.equal(first[n], second[n]) for n in candidates)


def test_random_within_pool():
    candidates = _toy()
    within = {"t1": torch.tensor([3, 7, 9]), "t3": torch.arange(0, 20_000, 10)}
    out = random_elements(candidates, 3 + 2000, _gen(0), within)  # the whole pool
    assert torch.equal(out["t1"], within["t1"]) and torch.equal(out["t3"], within["t3"])
    assert out["t0"].numel() == out["t2"].numel() == 0
    out = random_elements(candidates, 100, _gen(0), within)
    _check_indices(out, candidates, 100)
    assert set(out["t3"].tolist()) <= set(within["t3"].tolist()) and set(out["t1"].tolist()) <= {3, 7, 9}
    with pytest.raises(ValueError, match="not candidates"):
        random_elements(candidates, 1, _gen(0), {"nope": torch.tensor([0])})
    with pytest.raises(ValueError, match="sorted, unique"):
        random_elements(candidates, 1, _gen(0), {"t1": torch.tensor([5, 3])})


@pytest.mark.parametrize("k", [60, 700])  # within-tensor rejection path (m <= n/4) and permutation path
def test_random_is_uniform_per_element(k):
    """Per-element hit counts over R draws: the chi-square statistic over N elements (sum fixed: N - 1
    degrees of freedom, sd sqrt(2(N-1))) divided by N - 1 must be within 1 +- 6 sqrt(2 / (N - 1))
    (~0.27 for N = 1000); a sampler favouring one tensor or one end of a tensor is off by far more."""
    candidates = _toy((300, 700))
    n, r = 1000, 400
    hits = torch.zeros(n)
    for seed in range(r):
        out = random_elements(candidates, k, _gen(seed))
        hits[out["t0"]] += 1
        hits[300 + out["t1"]] += 1
    p = k / n
    chi2 = float(((hits - r * p) ** 2).sum() / (r * p * (1 - p)))
    assert abs(chi2 / (n - 1) - 1) < 6 * math.sqrt(2 / (n - 1)), chi2
    # tensor split: counts in t0 are hypergeometric(N=1000, K=300, k); their mean within 5 standard errors
    counts = []
    for seed in range(r):
        counts.append(random_elements(candidates, k, _gen(10_000 + seed))["t0"].numel())
    mean, var = k * 0.3, k * 0.3 * 0.7 * (n - k) / (n - 1)
    assert abs(np.mean(counts) - mean) < 5 * math.sqrt(var / r)
    assert 0.6 * var < np.var(counts) < 1.5 * var


def test_random_large_tensor_and_meta():
    candidates = {"a": nn.Parameter(torch.empty(2_000_000, device="meta")), "b": nn.Parameter(torch.empty(3, 5))}
    out = random_elements(candidates, 100_000, _gen(0))
    _check_indices(out, candidates, 100_000)
    assert out["a"].device.type == "cpu"
    # about 5% of each half of the big tensor
    first = int((out["a"] < 1_000_000).sum())
    assert abs(first - 50_000) < 5 * math.sqrt(100_000 * 0.25)


@pytest.mark.parametrize("which", "qkv")
def test_random_within_qkv_selectors(backbones, which):
    b = backbones["eva02"]
    pool = qkv_elements(b, which)
    out = select(f"random_{which}", b, 1000, generator=_gen(3))
    _check_indices(out, block_parameters(b), 1000)
    for n, idx in out.items():
        assert set(idx.tolist()) <= set(pool.get(n, torch.empty(0)).tolist()), n
    again = select(f"random_{which}", b, 1000, generator=_gen(3))
    assert all(torch.equal(out[n], again[n]) for n in out)


def test_random_over_budget_is_a_user_error(backbones):
    b = backbones["mae"]
    pool = sum(v.numel() for v in qkv_elements(b, "q").values())
    k = round(1.5 * pool)
    with pytest.raises(UserError, match=rf"'random_q'.*{k:,}.*{pool:,}"):
        select("random_q", b, k, generator=_gen(0))
    total = sum(p.numel() for p in block_parameters(b).values())
    with pytest.raises(UserError, match=rf"'random'.*{total + 1:,}.*{total:,}"):
        select("random", b, total + 1, generator=_gen(0))
    with pytest.raises(ValueError, match="non-negative integer"):
        select("random", b, -1)


# --------------------------------------------------------------------------------------------- top-k
def _estimate(backbone, variational: bool = False) -> FisherEstimate:
    g = _gen(7)
    params = block_parameters(backbone)
    f = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
    fs = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
    f["backbone.not_a_candidate"] = torch.rand(3, generator=g)  # extra names are ignored
    fs["backbone.not_a_candidate"] = torch.rand(3, generator=g)
    if not variational:
        return FisherEstimate(fisher=f, fisher_shift=fs, eps_mu=0.3, eps_sigma=0.2)
    lam = {n: 1e4 + 1e3 * v for n, v in f.items()}
    lam_s = {n: 1e4 + 1e3 * v for n, v in fs.items()}
    return FisherEstimate(fisher=f, fisher_shift=fs, precision=lam, precision_shift=lam_s, estimator="variational",
                          eps_mu=0.3, eps_sigma=0.2, config={"gamma": 1e-2, "tau": 1e-2})


@pytest.mark.parametrize("variational", [False, True])
def test_score_selectors_are_topk_of_their_scores(backbones, variational):
    b = backbones["dinov2"]
    params = block_parameters(b)
    est = _estimate(b, variational)
    k, eps = 5000, 1e-3
    masks = {}
    for selector, scores in (("fim", est.fisher), ("delta_fim", est.delta(eps)), ("dr_fim", est.drf(eps))):
        masks[selector] = select(selector, b, k, est, eps=eps)
        want = topk_mask({n: scores[n] for n in params}, k)
        assert list(masks[selector]) == list(params)
        assert all(torch.equal(masks[selector][n], want[n]) for n in params), selector
        _check_indices(masks[selector], params, k)

    def same(a, c):
        return all(torch.equal(masks[a][n], masks[c][n]) for n in params)

    assert not same("fim", "delta_fim") and not same("fim", "dr_fim") and not same("delta_fim", "dr_fim")


def test_selector_errors(backbones):
    b = backbones["mae"]
    with pytest.raises(UserError, match="unknown selector 'fisher'.*random, random_q.*dr_fim"):
        select("fisher", b, 10)
    for selector in ("fim", "delta_fim", "dr_fim"):
        with pytest.raises(UserError, match=f"'{selector}'.*none was given"):
            select(selector, b, 10)
    est = _estimate(b)
    unshifted = FisherEstimate(fisher=est.fisher)
    assert sum(v.numel() for v in select("fim", b, 10, unshifted).values()) == 10
    for selector in ("delta_fim", "dr_fim"):
        with pytest.raises(UserError, match=f"'{selector}'.*shift"):
            select(selector, b, 10, unshifted)
    no_sizes = FisherEstimate(fisher=est.fisher, fisher_shift=est.fisher_shift)  # shifted, but no eps_mu/sigma
    with pytest.raises(UserError, match="'dr_fim'.*shift"):
        select("dr_fim", b, 10, no_sizes)
    partial = FisherEstimate(fisher=dict(list(est.fisher.items())[1:]))
    with pytest.raises(UserError, match="does not cover 1 of"):
        select("fim", b, 10, partial)
    name = next(iter(block_parameters(b)))
    wrong = FisherEstimate(fisher={**est.fisher, name: torch.rand(2)})
    with pytest.raises(UserError, match="shape"):
        select("fim", b, 10, wrong)
    total = sum(p.numel() for p in block_parameters(b).values())
    with pytest.raises(UserError, match=f"{total + 1:,}"):
        select("fim", b, total + 1, est)
    assert SELECTORS == ("random", "random_q", "random_k", "random_v", "fim", "delta_fim", "dr_fim")


# --------------------------------------------------------------------------------------------- fractions
def _hand(family: str, block: int) -> list[int]:
    return [c[block] if isinstance(c, tuple) else c for c in HAND_COUNTS[family]]


HAND_COUNTS = {  # per block, from the tiny variants' shapes (dim 64, MLP 256; EVA-02 SwiGLU 2 x 170)
    "mae": [4160, 4160, 4160, 4160, 16640, 16448, 256],  # other: norm1, norm2 (weight + bias)
    "clip": [4160, 4160, 4160, 4160, 16640, 16448, 256],  # other: ln_1, ln_2
    "dinov2": [4160, 4160, 4160, 4160, 16640, 16448, 384],  # other: + ls1.gamma, ls2.gamma
    # other: + rel_pos_h, rel_pos_w: 5 x 16 each in the windowed blocks 0 and 2, 15 x 16 in the global 1 and 3
    "sam": [4160, 4160, 4160, 4160, 16640, 16448, (416, 736, 416, 736)],
    "eva02": [4160, 4096, 4160, 4160, 22100, 10944, 596],  # k: no bias; other: + mlp.norm (2 x 170)
}


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_partition_the_candidates(backbones, family):
    b = backbones[family]
    counts = group_counts(b)
    assert list(counts.columns) == list(GROUPS) and list(counts.index) == list(range(b.num_layers))
    for i, blk in enumerate(b.blocks):
        assert counts.loc[i].tolist() == _hand(family, i), (family, i)
        assert int(counts.loc[i].sum()) == sum(p.numel() for p in blk.parameters())
    params = block_parameters(b)
    for name, (block, group) in element_groups(b).items():  # one group per element, every element counted
        assert any(p is params[name] for p in b.blocks[block].parameters())
        if isinstance(group, torch.Tensor):
            assert group.shape == (params[name].numel(),)
            assert int(group.min()) >= 0 and int(group.max()) < len(GROUPS)
        else:
            assert 0 <= group < len(GROUPS)


@pytest.mark.parametrize("family", FAMILIES)
def test_fractions_of_hand_made_selections(backbones, family):
    b = backbones[family]
    params = block_parameters(b)
    block1 = {id(p) for p in b.blocks[1].parameters()}
    q1 = {n: idx for n, idx in qkv_elements(b, "q").items() if id(params[n]) in block1}
    frac = selection_fractions(b, q1)
    want = np.zeros((b.num_layers, len(GROUPS)))
    want[1, 0] = 1.0
    np.testing.assert_array_equal(frac.to_numpy(), want)

    # 10 elements of block 2's attention output weight and 3 of block 0's first norm
    proj = next(n for n, p in params.items() if id(p) in {id(q) for q in b.blocks[2].parameters()}
                and (".attn.proj.weight" in n or ".attn.out_proj.weight" in n))
    norm = next(n for n, p in params.items() if id(p) in {id(q) for q in b.blocks[0].parameters()}
                and (".norm1.weight" in n or ".ln_1.weight" in n))
    frac = selection_fractions(b, {proj: torch.arange(10), norm: torch.tensor([0, 5, 9])})
    want = np.zeros((b.num_layers, len(GROUPS)))
    want[2, GROUPS.index("attn proj")] = 10 / _hand(family, 2)[3]
    want[0, GROUPS.index("other")] = 3 / _hand(family, 0)[6]
    np.testing.assert_allclose(frac.to_numpy(), want, rtol=0, atol=1e-15)

    everything = {n: torch.arange(p.numel()) for n, p in params.items()}
    assert (selection_fractions(b, everything).to_numpy() == 1.0).all()
    assert (selection_fractions(b, {}).to_numpy() == 0.0).all()
    with pytest.raises(ValueError, match="not candidates"):
        selection_fractions(b, {"nope": torch.tensor([0])})


def test_fractions_of_a_random_selection_add_up(backbones):
    b = backbones["sam"]
    k = 20_000
    out = select("random", b, k, generator=_gen(0))
    frac = selection_fractions(b, out)
    assert round(float((frac * group_counts(b)).to_numpy().sum())) == k
    # uniform: each group's fraction near k / candidates (binomial sd ~ sqrt(p / n) <= 0.011 for n >= 256)
    p = k / sum(v.numel() for v in block_parameters(b).values())
    assert np.abs(frac.to_numpy() - p).max() < 0.08


# --------------------------------------------------------------------------------------------- plot
def test_plot_selection_png_and_pdf(backbones, tmp_path):
    import matplotlib.image as mpimg

    b = backbones["eva02"]
    frac = selection_fractions(b, select("random_v", b, 3000, generator=_gen(0)))
    frac.iloc[2, 1] = float("nan")  # a group a block lacks: drawn grey
    out = tmp_path / "sub" / "heat.png"
    out.parent.mkdir()
    (out.parent / "heat.png").write_bytes(b"old")  # replaced
    plot_selection(frac, out, "eva02-tiny random_v")
    img = mpimg.imread(out)
    w, h = figure_size(*frac.shape)
    assert img.shape[:2] == (round(h * DPI), round(w * DPI))
    assert float(img[..., :3].std()) > 0.05  # not blank
    assert sorted(p.name for p in out.parent.iterdir()) == ["heat.png"]  # no temporary file left
    pdf = tmp_path / "heat.pdf"
    plot_selection(frac, pdf, "pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.pdf", "sub"]
    with pytest.raises(ValueError, match=r"\.png or \.pdf"):
        plot_selection(frac, tmp_path / "heat.jpg", "x")


def test_plot_selection_failure_leaves_no_temp(backbones, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    frac = selection_fractions(backbones["mae"], {})
    out = tmp_path / "heat.png"
    out.write_bytes(b"old")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_selection(frac, out, "x")
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["heat.png"]
