"""Element selectors for FisherTune and its ablation (issue 7 items 3 and 6): which k elements of the
backbone's blocks train, all with the same budget k.

Selectors (:data:`SELECTORS`, the rows of the paper's selector ablation):

* ``random``: k elements uniformly at random among all candidates (every parameter inside
  ``backbone.blocks``, :func:`~fishertune.fisher.sparse.block_parameters`);
* ``random_q`` / ``random_k`` / ``random_v``: k elements uniformly at random among the query (key,
  value) elements of every block's attention (:func:`qkv_elements`): the q (k, v) rows of the fused
  projection weight, all columns, plus the matching part of its bias; EVA-02 keeps its q and v biases
  in separate parameters (``attn.q_bias``, ``attn.v_bias``), which count for q and v; its key has no
  bias. A budget larger than that pool (about a third of the attention weights, ~25% of a block) is
  a :class:`~fishertune.errors.UserError`;
* ``fim``: top-k of the Fisher estimate F(x) (``estimate.fisher``);
* ``delta_fim``: top-k of the slide's Delta F = |F(x) - F(x')| / (min(F(x), F(x')) + eps)
  (``estimate.delta(eps)``), needs an estimate made with a domain shift;
* ``dr_fim``: top-k of DR-FIM (``estimate.drf(eps)``: the direct or the variational formula, as the
  estimate was made), needs an estimate made with a domain shift.

Top-k selection is :func:`~fishertune.fisher.sparse.topk_mask` over the candidates' scores (ties and
memory as documented there). Every selector returns one sorted, unique int64 tensor of flat element
indices per candidate name, in candidate order, empty where a parameter has no selected element (the
form :func:`topk_mask` returns and :class:`~fishertune.fisher.sparse.SparseAdamW` takes).

Random sampling (:func:`random_elements`) without a permutation of the whole pool: the k elements are
first split among the tensors by a multivariate hypergeometric draw (how many of k uniformly drawn
elements fall into each tensor), done as a balanced binary tree of univariate hypergeometric draws
(``numpy.random.Generator.hypergeometric``: at each node, how many of the node's elements fall into
its left half), then each tensor's count is drawn uniformly without replacement inside that tensor:
by rejection (draw with replacement, keep distinct values, repeat until enough, then drop a uniform
random surplus) when the count is at most a quarter of the tensor, else by ``Generator.choice``
(a permutation of that one tensor). The result is a uniform k-subset of the union (the split has the
law of a uniform subset's per-tensor counts, and each tensor's part is uniform given its count).
Temporary memory is O(k) plus at most a few times the largest single tensor's size in int64, never
O(candidates); ~1.1 x k int64 values for a 5% budget. Randomness: a numpy ``Generator`` (PCG64)
seeded with one 62-bit integer drawn from the torch ``generator`` passed in (the global torch RNG
when None), so the selection is a function of the torch generator's state (and of numpy's
generator algorithms, which numpy keeps stable across releases in practice but does not promise).
The hypergeometric draws limit each node of the tree to fewer than 10**9 elements per side, i.e.
pools up to ~2 x 10**9 elements (ViT-H's blocks: 0.63 x 10**9).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import nn

from fishertune.errors import UserError
from fishertune.fisher.sparse import block_parameters, topk_mask

__all__ = ["SELECTORS", "qkv_elements", "random_elements", "select"]

SELECTORS = ("random", "random_q", "random_k", "random_v", "fim", "delta_fim", "dr_fim")
RANDOM_WITHIN = {"random_q": "q", "random_k": "k", "random_v": "v"}

Indices = dict[str, torch.Tensor]
_HYPERGEOMETRIC_MAX = 10 ** 9  # numpy's limit on ngood and nbad


# --------------------------------------------------------------------------------------------- q / k / v
def _parent_of(root: nn.Module, module: nn.Module) -> nn.Module | None:
    for m in root.modules():
        if any(child is module for child in m.children()):
            return m
    return None


def qkv_elements(backbone: nn.Module, which: Literal["q", "k", "v"], prefix: str = "backbone") -> Indices:
    """Flat element indices of the query (``"q"``), key or value part of every block's attention.

    For each :class:`~fishertune.backbones.base.QKV` of ``backbone.qkv()``: the rows ``QKV.rows(which)``
    of the fused weight (all columns: flat indices ``rows.start * in .. rows.stop * in``), the same
    rows of the fused bias if there is one, and, where the fused projection has no bias, a separate
    ``{which}_bias`` parameter on the module holding it or on its parent (EVA-02's ``attn.q_bias`` /
    ``attn.v_bias``; its key bias is a buffer, not a parameter, so the key has none). Tensors are
    mapped to names by identity with :func:`~fishertune.fisher.sparse.block_parameters` (same
    ``prefix``), never by their names. Returns name -> sorted int64 indices (CPU) for the parameters
    holding such elements, in candidate order.
    """
    if which not in ("q", "k", "v"):
        raise ValueError(f"which must be 'q', 'k' or 'v', got {which!r}")
    candidates = block_parameters(backbone, prefix)
    names = {id(p): n for n, p in candidates.items()}
    parts: dict[str, list[torch.Tensor]] = {}

    def add(t: torch.Tensor, idx: torch.Tensor, what: str) -> None:
        name = names.get(id(t))
        if name is None:
            raise ValueError(f"the {what} is not a parameter inside backbone.blocks")
        parts.setdefault(name, []).append(idx)

    for q in backbone.qkv():
        w = getattr(q.module, q.weight)
        rows = q.rows(which)
        if w.ndim != 2 or w.shape[0] != 3 * q.dim:
            raise ValueError(f"block {q.block}: fused q/k/v weight of shape {tuple(w.shape)}, expected (3 x {q.dim}, in)")
        cols = w.shape[1]
        add(w, torch.arange(rows.start * cols, rows.stop * cols), f"block {q.block}'s q/k/v weight")
        if q.bias is not None:
            b = getattr(q.module, q.bias)
            if b is not None:
                add(b, torch.arange(rows.start, rows.stop), f"block {q.block}'s q/k/v bias")
        else:
            parent = _parent_of(backbone.blocks[q.block], q.module)
            for holder in (q.module, parent):
                b = getattr(holder, f"{which}_bias", None) if holder is not None else None
                if isinstance(b, nn.Parameter):
                    if b.numel() != q.dim:
                        raise ValueError(f"block {q.block}: {which}_bias has {b.numel()} elements, expected {q.dim}")
                    add(b, torch.arange(q.dim), f"block {q.block}'s {which}_bias")
                    break
    out = {}
    for name in candidates:
        if name in parts:
            idx = parts[name][0] if len(parts[name]) == 1 else torch.cat(parts[name])
            if len(parts[name]) > 1:  # two QKVs naming one tensor: merge (sorted, unique)
                idx = torch.sort(idx).values
                idx = idx[torch.cat([idx.new_ones(1, dtype=torch.bool), idx[1:] != idx[:-1]])]
            out[name] = idx
    return out


# --------------------------------------------------------------------------------------------- random
def _numpy_rng(generator: torch.Generator | None) -> np.random.Generator:
    device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=device))
    return np.random.default_rng(seed)


def _split(rng: np.random.Generator, sizes: list[int], k: int) -> list[int]:
    """Multivariate hypergeometric counts (sum k) over ``sizes``, by a balanced tree of hypergeometrics."""
    if len(sizes) == 1:
        return [k]
    if k == 0:
        return [0] * len(sizes)
    total = sum(sizes)
    if k == total:
        return list(sizes)
    # split where the cumulative size crosses half the total (keeps both sides < 10**9 for pools < 2e9)
    acc, cut = 0, 1
    for i, s in enumerate(sizes[:-1]):
        acc += s
        cut = i + 1
        if acc * 2 >= total:
            break
    left = sum(sizes[:cut])
    right = total - left
    if left >= _HYPERGEOMETRIC_MAX or right >= _HYPERGEOMETRIC_MAX:
        raise ValueError(f"random selection supports pools of < 2 x 10**9 elements with no tensor of >= 10**9; "
                         f"got {total:,}")
    if left == 0:
        m = 0
    elif right == 0:
        m = k
    else:
        m = int(rng.hypergeometric(left, right, k))
    return _split(rng, sizes[:cut], m) + _split(rng, sizes[cut:], k - m)


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sort + neighbour compare: numpy 2's hash-based ``np.unique`` is ~5x slower here)."""
    a = np.sort(a)
    if a.size:
        a = a[np.concatenate(([True], a[1:] != a[:-1]))]
    return a


def _sample(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """m sorted distinct values drawn uniformly from range(n)."""
    if m == 0:
        return np.empty(0, dtype=np.int64)
    if m == n:
        return np.arange(n, dtype=np.int64)
    if 4 * m > n:
        return np.sort(rng.choice(n, size=m, replace=False, shuffle=False)).astype(np.int64, copy=False)
    draws = int(math.ceil(-1.05 * n * math.log1p(-m / n))) + 16  # ~ the expected draws for m distinct values
    got = _sorted_unique(rng.integers(0, n, size=draws, dtype=np.int64))
    while got.size < m:  # rare: top up, each new draw being new with probability 1 - got.size / n
        draws = int(math.ceil(1.1 * (m - got.size) / (1 - got.size / n))) + 16
        got = _sorted_unique(np.concatenate([got, rng.integers(0, n, size=draws, dtype=np.int64)]))
    if got.size > m:  # drop a uniform surplus (the distinct set is a uniform subset given its size)
        got = got[np.sort(rng.choice(got.size, size=m, replace=False, shuffle=False))]
    return got


def random_elements(candidates: dict[str, torch.Tensor], k: int, generator: torch.Generator | None = None,
                    within: Indices | None = None, *, selector: str = "random") -> Indices:
    """k elements uniformly at random without replacement among all elements of ``candidates``, or
    among the elements listed in ``within`` (name -> flat indices; names must be candidates).

    Returns name -> sorted unique int64 flat indices for every candidate (empty where none was drawn),
    on the parameter's device (CPU for meta parameters). Deterministic given the generator's state;
    see the module docstring for the method and its memory. ``selector`` names the selector in the
    error for a budget larger than the pool (a :class:`UserError`).
    """
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    k = int(k)
    if within is not None:
        unknown = [n for n in within if n not in candidates]
        if unknown:
            raise ValueError(f"'within' names parameters that are not candidates: {unknown[:3]}")
        pools = {}
        for name, idx in within.items():
            idx = idx.detach().to("cpu", torch.int64).reshape(-1)
            n = candidates[name].numel()
            if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= n or not bool((idx[1:] > idx[:-1]).all())):
                raise ValueError(f"'within' indices of {name!r} must be sorted, unique and in [0, {n})")
            pools[name] = idx
        sizes = {name: pools[name].numel() if name in pools else 0 for name in candidates}
    else:
        pools = None
        sizes = {name: p.numel() for name, p in candidates.items()}
    pool = sum(sizes.values())
    if k > pool:
        where = "its pool" if within is not None else "the candidates"
        raise UserError(f"selector {selector!r}: a budget of {k:,} elements is more than the {pool:,} elements of "
                        f"{where}; lower the budget to at most {pool:,} elements")
    rng = _numpy_rng(generator)
    names = list(candidates)
    counts = _split(rng, [sizes[n] for n in names], k) if names else []
    out = {}
    for name, m in zip(names, counts):
        p = candidates[name]
        device = torch.device("cpu") if p.device.type == "meta" else p.device
        pos = torch.from_numpy(_sample(rng, sizes[name], m))
        if pools is not None and m:
            pos = pools[name][pos]  # positions in the pool -> flat indices (pool sorted, so still sorted)
        out[name] = pos.to(device)
    return out


# --------------------------------------------------------------------------------------------- select
def _scores(selector: str, estimate, eps: float) -> dict[str, torch.Tensor]:
    if estimate is None:
        raise UserError(f"selector {selector!r} ranks elements by a Fisher estimate, but none was given; "
                        f"estimate the Fisher first (or use one of the random selectors)")
    if selector == "fim":
        return estimate.fisher
    shifted = estimate.fisher_shift is not None
    if selector == "dr_fim":
        shifted = shifted and estimate.eps_mu is not None and estimate.eps_sigma is not None
        if estimate.estimator == "variational":
            shifted = shifted and estimate.precision is not None and estimate.precision_shift is not None
    if not shifted:
        raise UserError(f"selector {selector!r} needs a Fisher estimate on a domain-shifted view x' as well as on x "
                        f"(F(x') and the shift sizes eps_mu, eps_sigma), but this estimate was made without a shift; "
                        f"estimate it with a shift")
    return estimate.delta(eps) if selector == "delta_fim" else estimate.drf(eps)


def select(selector: str, backbone: nn.Module, k: int, estimate=None, eps: float = 1e-8,
           generator: torch.Generator | None = None, prefix: str = "backbone") -> Indices:
    """The k elements ``selector`` picks among the candidates (``block_parameters(backbone, prefix)``).

    ``estimate``: a :class:`~fishertune.fisher.estimate.FisherEstimate` covering every candidate (by
    name, same shapes), needed by ``fim``, ``delta_fim`` and ``dr_fim`` (the latter two: made with a
    shift); ``eps`` is the denominators' epsilon of Delta F and DR-FIM. ``generator`` drives the random
    selectors. Returns name -> sorted unique int64 flat indices for every candidate, in candidate order.
    """
    if selector not in SELECTORS:
        raise UserError(f"unknown selector {selector!r}; known selectors: {', '.join(SELECTORS)}")
    candidates = block_parameters(backbone, prefix)
    if selector == "random":
        return random_elements(candidates, k, generator, selector=selector)
    if selector in RANDOM_WITHIN:
        within = qkv_elements(backbone, RANDOM_WITHIN[selector], prefix)
        return random_elements(candidates, k, generator, within, selector=selector)
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    total = sum(p.numel() for p in candidates.values())
    if k > total:
        raise UserError(f"selector {selector!r}: a budget of {k:,} elements is more than the {total:,} candidate "
                        f"elements of the backbone's blocks; lower the budget")
    scores = _scores(selector, estimate, eps)
    missing = [n for n in candidates if n not in scores]
    if missing:
        raise UserError(f"selector {selector!r}: the Fisher estimate does not cover {len(missing)} of the "
                        f"{len(candidates)} candidate parameters (e.g. {missing[0]!r}); it was made for another "
                        f"backbone or prefix: estimate it again")
    for name, p in candidates.items():
        if tuple(scores[name].shape) != tuple(p.shape):
            raise UserError(f"selector {selector!r}: the Fisher estimate of {name!r} has shape "
                            f"{tuple(scores[name].shape)}, the parameter {tuple(p.shape)}; estimate it again")
    return topk_mask({name: scores[name] for name in candidates}, int(k))
