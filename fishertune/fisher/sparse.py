"""Sparse tuning: element budgets, a global top-k selection, and AdamW on the selected elements only.

Shared by every method that trains a fixed subset of the backbone's elements (ChildTuning-D,
FisherTune and its ablation selectors).

Candidates and budget. The candidate elements are every parameter inside ``backbone.blocks`` (the
transformer blocks; the patch embedding, position embedding, tokens and final norm are not
candidates). The budget is a fraction of the *whole* backbone's parameter count: k =
round(fraction x total). This is our reading of the FisherTune paper, whose "5%" row reports 15.21M
on ViT-L, i.e. 5% of the printed 304.2M backbone total (5% of the blocks alone would be 15.12M),
while the elements are chosen among the blocks' parameters.

Selection (:func:`topk_mask`). One global threshold over all candidate tensors keeps exactly k
elements: every kept score is >= every dropped score. Scores are compared as float32. Ties at the
threshold are broken deterministically by candidate order (the dict's order) and then by flat index,
lower first. The threshold is found by a two-pass radix select on the float32 bit patterns (a
65,536-bin histogram of the high 16 bits, then of the low 16 bits inside the chosen bin), so no
concatenated copy of all scores is ever made: temporary memory is a few times the largest single
tensor (int32/int64 keys of one parameter), not of the 300M candidates. NaN scores are an error.

:func:`topk_mask` gives int64 indices, sorted and unique, one tensor per selected parameter.
:class:`SparseAdamW` keeps them as int32 (any parameter below 2^31 elements), 4 bytes per selected
element, counted by :func:`state_bytes`, and widens them per step for ``index_select``/``index_copy_``
(which need long indices): a selected element costs 12 bytes of state against 8 for a dense one.

Updates (:class:`SparseAdamW`). AdamW with the formulas of ``torch.optim.AdamW`` (it calls the same
functional ``torch.optim.adam.adam`` with decoupled weight decay): for a parameter with indices,
the gradient is gathered at those elements, the moments have shape (k,), the step (weight decay
included) is computed on the gathered values and written back at those elements only, so unselected
elements stay bit-identical. Parameters without indices are updated exactly as by torch's AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.adam import adam as _adam

from fishertune.errors import UserError

__all__ = ["SparseAdamW", "adamw_state_bytes", "block_parameters", "budget_elements", "budget_spread", "state_bytes",
           "topk_mask"]


def block_parameters(backbone: nn.Module, prefix: str = "backbone") -> dict[str, nn.Parameter]:
    """Every parameter inside ``backbone.blocks``, named as in the segmentor's ``named_parameters()``.

    ``backbone.blocks`` is often an alias of a module registered under another name (timm's
    ``vit.blocks``, open_clip's ``visual.transformer.resblocks``), so the names are the backbone's own
    registered names with ``prefix`` (the backbone's attribute in the segmentor) in front, e.g.
    ``backbone.vit.blocks.0.attn.qkv.weight``.
    """
    ids = {id(p) for p in backbone.blocks.parameters()}
    dot = f"{prefix}." if prefix else ""
    return {f"{dot}{name}": p for name, p in backbone.named_parameters() if id(p) in ids}


def budget_elements(backbone: nn.Module, fraction: float, where: str = "budget") -> int:
    """k = round(fraction x the backbone's total parameter count); a user error if out of range.

    ``where`` names the field in the message (e.g. ``method 'childtune' config field 'budget'``).
    Works on the meta device (only ``numel`` is read).
    """
    total = sum(p.numel() for p in backbone.parameters())
    candidates = sum(p.numel() for p in block_parameters(backbone).values())
    if not 0 < fraction <= 1:
        raise UserError(f"{where}: {fraction} ({100 * fraction:g}%) must be in (0, 1], the fraction of the "
                        f"backbone's {total:,} parameters to train (0.05 = 5%)")
    k = round(fraction * total)
    if k < 1:
        raise UserError(f"{where}: {fraction} of the backbone's {total:,} parameters selects no element; "
                        f"use at least {1 / total:.3g}")
    if k > candidates:
        raise UserError(f"{where}: {fraction} ({100 * fraction:g}%) of the backbone's {total:,} parameters is "
                        f"{k:,} elements, more than the {candidates:,} in its transformer blocks; use at most "
                        f"{candidates / total:.4f}")
    return k


def budget_spread(backbone: nn.Module, k: int) -> dict[str, int]:
    """``k`` elements spread over the blocks' parameters in proportion to their sizes (named as by
    :func:`block_parameters`): a mask's size per tensor without scores, for closed-form counts."""
    params = block_parameters(backbone)
    n = sum(p.numel() for p in params.values())
    out, seen, taken = {}, 0, 0
    for name, p in params.items():
        seen += p.numel()
        upto = round(k * seen / n)
        out[name] = upto - taken
        taken = upto
    return out


def adamw_state_bytes(params: Iterable[tuple[str, torch.Tensor]], selected: dict[str, int] | None = None) -> int:
    """The bytes :class:`SparseAdamW` (or ``torch.optim.AdamW``) keeps for the trained ``(name, parameter)``
    pairs, in closed form: per tensor a float32 step; per trained element two moments of the parameter's
    dtype; for a masked parameter (``selected[name]`` elements) those only, plus an int32 index each.
    Reads only sizes and dtypes (works on meta and fake tensors); :func:`state_bytes` counts a real optimizer."""
    selected = selected or {}
    total = 0
    for name, p in params:
        k = selected.get(name, p.numel())
        total += 4 + 2 * k * p.element_size() + (4 * k if name in selected else 0)
    return total


def _keys(score: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered as the float32 values (-0.0 and 0.0 equal), flattened."""
    s = score.detach().reshape(-1).to(torch.float32) + 0.0  # + 0.0 turns -0.0 into 0.0
    bits = s.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude bits, so order is signed int order


def _find_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Highest bin b with (count above b) < k <= (count above b) + hist[b]; returns (b, count above b)."""
    above = torch.cumsum(hist.flip(0), 0).flip(0) - hist  # elements in bins strictly higher
    b = int(torch.nonzero((above < k) & (above + hist >= k)).max())
    return b, int(above[b])


def topk_mask(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The k highest-scoring elements over all ``scores`` tensors, as sorted int64 flat indices per name.

    Names with no selected element map to empty tensors. See the module docstring for ties and
    memory. Indices are on each score tensor's device.
    """
    total = sum(s.numel() for s in scores.values())
    if not 0 <= k <= total:
        raise ValueError(f"cannot keep {k} of {total} elements")
    for name, s in scores.items():
        if s.is_floating_point() and bool(torch.isnan(s).any()):
            raise ValueError(f"score of {name!r} has NaN values")
    empty = {name: torch.empty(0, dtype=torch.int64, device=s.device) for name, s in scores.items()}
    if k == 0:
        return empty
    if k == total:
        return {name: torch.arange(s.numel(), device=s.device) for name, s in scores.items()}
    # pass 1: histogram of the high 16 bits of the (unsigned-ordered) keys
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for s in scores.values():
        hi = (_keys(s) >> 16) + 32768  # signed high half -> 0..65535 in order
        hist += torch.bincount(hi, minlength=1 << 16).cpu()
    b_hi, above_hi = _find_bin(hist, k)
    # pass 2: histogram of the low 16 bits inside that bin
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for s in scores.values():
        key = _keys(s)
        lo = key[(key >> 16) + 32768 == b_hi] & 0xFFFF
        hist += torch.bincount(lo, minlength=1 << 16).cpu()
    b_lo, above_lo = _find_bin(hist, k - above_hi)
    threshold = ((b_hi - 32768) << 16) | b_lo  # the k-th largest key, as a signed int32 value
    ties = k - above_hi - above_lo  # elements equal to the threshold that are kept
    # pass 3: everything above the threshold, plus the first `ties` equal ones in candidate order
    out = {}
    for name, s in scores.items():
        key = _keys(s)
        keep = torch.nonzero(key > threshold).view(-1)
        if ties > 0:
            eq = torch.nonzero(key == threshold).view(-1)[:ties]
            ties -= eq.numel()
            if eq.numel():
                keep = torch.sort(torch.cat([keep, eq])).values
        out[name] = keep if keep.numel() else empty[name]
    got = sum(v.numel() for v in out.values())
    if got != k:  # pragma: no cover - a bug, not bad input
        raise AssertionError(f"topk_mask kept {got} elements instead of {k}")
    return out


def _check_indices(p: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor | None:
    if idx is None:
        return None
    if not isinstance(idx, torch.Tensor) or idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.ndim != 1:
        raise ValueError(f"indices must be 1-D integer tensors, got {getattr(idx, 'dtype', type(idx))} "
                         f"of shape {tuple(getattr(idx, 'shape', ()))}")
    if not p.is_contiguous():
        raise ValueError("a parameter with indices must be contiguous")
    # kept as int32 where the parameter allows (8 -> 4 bytes per selected element of optimizer state);
    # widened to int64 for the gather/scatter of each step, which need long indices
    idx = idx.to(device=p.device, dtype=torch.int32 if p.numel() < 2**31 else torch.int64)
    if idx.numel() and idx.device.type != "meta":
        if int(idx[0]) < 0 or int(idx[-1]) >= p.numel() or not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(f"indices must be sorted, unique and in [0, {p.numel()}) for a parameter of "
                             f"shape {tuple(p.shape)}")
    return idx


class SparseAdamW(torch.optim.Optimizer):
    """AdamW where a param group may carry ``indices``: one int tensor per param (or None: dense).

    An indexed parameter trains only at its flat element indices, with moments of shape (k,); see the
    module docstring. ``state_dict()`` keeps the indices in its param groups, so a checkpoint holds the
    mask with the sparse state, and ``load_state_dict`` restores both. Works with any
    ``torch.optim.lr_scheduler`` (the rate is the group's ``lr``).

    ``foreach``/``fused`` as in ``torch.optim.AdamW`` (default: foreach on CUDA, single-tensor on the
    CPU; fused needs every parameter on CUDA). Not supported: amsgrad, maximize, sparse gradients.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, foreach: bool | None = None,
                 fused: bool | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid SparseAdamW settings lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        if fused and foreach:
            raise ValueError("fused and foreach cannot both be True")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        indices = param_group.get("indices")
        indices = [None] * len(params) if indices is None else list(indices)
        if len(indices) != len(params):
            raise ValueError(f"a param group has {len(params)} params but {len(indices)} indices")
        param_group["params"] = params
        param_group["indices"] = [_check_indices(p, i) for p, i in zip(params, indices)]
        if param_group.get("fused", self.defaults["fused"]) and not all(p.is_cuda for p in params):
            raise ValueError("fused=True needs every parameter on CUDA")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["indices"] = [_check_indices(p, i) for p, i in zip(group["params"], group["indices"])]
            for p, idx in zip(group["params"], group["indices"]):
                st = self.state.get(p)
                want = p.numel() if idx is None else idx.numel()
                if st and st["exp_avg"].numel() != want:
                    raise ValueError(f"optimizer state of {st['exp_avg'].numel()} elements for a parameter "
                                     f"training {want}")

    @torch.no_grad()
    def grow(self, indices: dict[torch.Tensor, torch.Tensor]) -> None:
        """Train more elements from now on: ``indices`` maps an indexed parameter to its new indices, a
        superset of its current ones. The moments of the elements already training are kept; new
        elements start with zero moments and the parameter's step count, so Adam's bias correction,
        already near 1, does not damp their first updates as it would a fresh start's."""
        where = {id(p): (g, i) for g in self.param_groups for i, p in enumerate(g["params"])}
        for p, new in indices.items():
            if id(p) not in where or where[id(p)][0]["indices"][where[id(p)][1]] is None:
                raise ValueError("grow: not an indexed parameter of this optimizer")
            group, i = where[id(p)]
            old = group["indices"][i]
            new = _check_indices(p, new)
            pos = torch.searchsorted(new.long(), old.long())
            if old.numel() and (pos.max() >= new.numel() or not torch.equal(new.long()[pos], old.long())):
                raise ValueError("grow: the new indices must contain the current ones")
            state = self.state.get(p)
            if state:
                for key in ("exp_avg", "exp_avg_sq"):
                    grown = state[key].new_zeros(new.numel())
                    grown[pos] = state[key]
                    state[key] = grown
            group["indices"][i] = new

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            fused = bool(group["fused"])
            params, grads, exp_avgs, exp_avg_sqs, steps, scatter = [], [], [], [], [], []
            for p, idx in zip(group["params"], group["indices"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SparseAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    shape = p.shape if idx is None else (idx.numel(),)
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
                    state["exp_avg"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
                if idx is None:
                    params.append(p)
                    grads.append(p.grad)
                else:
                    flat, idx = p.view(-1), idx.long()
                    values = flat.index_select(0, idx)
                    params.append(values)
                    grads.append(p.grad.reshape(-1).index_select(0, idx))
                    scatter.append((flat, idx, values))
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            _adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=group["foreach"], fused=fused or None,
                  decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                  weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            for flat, idx, values in scatter:
                flat.index_copy_(0, idx, values)
        return loss


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps: its state and, for :class:`SparseAdamW`, the indices."""
    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for st in optimizer.state.values():
        for v in st.values():
            add(v)
    for group in optimizer.param_groups:
        for idx in group.get("indices") or ():
            add(idx)
    return total
