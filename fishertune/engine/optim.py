"""AdamW with Rein's parameter groups, and the poly learning-rate schedule.

Rein (mmseg ``paramwise_cfg``): weight decay 0.05 except on normalisation layers, position/level/query
embeddings, learnable tokens and scales, which get none. Biases decay (mmseg's default). A protocol may
train the backbone's own weights (those it had before a method added any) at a fraction of the rate
(``train.backbone_lr_mult``: 1 in the paper's protocol; the miniature's is below 1, see
``benchmarks/mini/protocol.yaml``), as DETR and Mask2Former do with their ImageNet backbones. The
schedule is mmseg's ``PolyLR(power=0.9, eta_min=0)`` over the run's iterations, no warm-up unless
asked for (linear, from 1e-6 of the base rate). Methods that train chosen elements only (sparse
indices) get :class:`~fishertune.fisher.sparse.SparseAdamW` with the same groups.
"""

from __future__ import annotations

from typing import Collection

import torch
from torch import nn

from fishertune.fisher.sparse import SparseAdamW

#: substrings of parameter names that never decay (Rein's custom_keys, plus timm's names for them)
NO_DECAY_KEYS = ("norm", "pos_embed", "cls_token", "reg_token", "mask_token", "level_embed", "query_embed",
                 "query_feat", "tokens", "scale", "gamma")


def _no_decay_names(model: nn.Module) -> set[str]:
    names = set()
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm)
    for mod_name, module in model.named_modules():
        if isinstance(module, norm_types):
            names.update(f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters(recurse=False))
    for name, _ in model.named_parameters():
        if any(key in name for key in NO_DECAY_KEYS):
            names.add(name)
    return names


def param_groups(model: nn.Module, weight_decay: float, scaled: Collection[nn.Parameter] = (),
                 lr_mult: float = 1.0) -> list[dict]:
    """Groups of trainable parameters: with and without weight decay, and, when ``lr_mult`` is not 1, the
    parameters in ``scaled`` (the backbone's own weights) apart with that learning-rate multiplier."""
    no_decay = _no_decay_names(model)
    slow = {id(p) for p in scaled} if lr_mult != 1.0 else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(d, s): [] for s in (False, True) for d in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[(name not in no_decay, id(p) in slow)].append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_mult": lr_mult if slow_ else 1.0}
            for (decay, slow_), params in groups.items() if params or not slow_]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
                    sparse: dict[str, torch.Tensor] | None = None, scaled: Collection[nn.Parameter] = (),
                    lr_mult: float = 1.0) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (fused on CUDA); the parameters in ``scaled`` train at ``lr * lr_mult``.

    ``sparse`` maps parameter names (as in ``model.named_parameters()``) to the flat element indices at
    which they train (a method's ``sparse_indices``); with any entry the optimizer is a
    :class:`~fishertune.fisher.sparse.SparseAdamW` with the same groups, whose state exists only for
    those elements. Every name must be a trainable parameter of ``model``.
    """
    groups = [g for g in param_groups(model, weight_decay, scaled, lr_mult) if g["params"]]
    for g in groups:
        g["lr"] = lr * g.pop("lr_mult")
    fused = all(p.is_cuda for g in groups for p in g["params"])
    if not sparse:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    name_of = {id(p): name for name, p in model.named_parameters()}
    trainable = {name_of[id(p)] for g in groups for p in g["params"]}
    unknown = sorted(set(sparse) - trainable)
    if unknown:
        raise ValueError(f"sparse indices for {len(unknown)} names that are not trainable parameters of the model, "
                         f"e.g. {unknown[0]!r}")
    for g in groups:
        g["indices"] = [sparse.get(name_of[id(p)]) for p in g["params"]]
    return SparseAdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def poly_factor(iteration: int, total: int, power: float = 0.9, warmup: int = 0) -> float:
    """Learning-rate multiplier at ``iteration`` (0-based) of ``total``.

    Without warm-up: poly decay over the whole run (Rein's 512 configs). With ``warmup`` iterations:
    a linear ramp from 1e-6 to 1 over them, then poly decay over the remaining ``total - warmup``
    (Rein's 1024 configs: mmengine ``LinearLR(start_factor=1e-6, end=warmup)`` followed by
    ``PolyLR(begin=warmup, end=total)``).
    """
    if warmup and iteration < warmup:
        return 1e-6 + (1.0 - 1e-6) * iteration / warmup
    span = total - warmup
    return (1.0 - min(iteration - warmup, span) / span) ** power


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, power: float, warmup: int = 0):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: poly_factor(it, total, power, warmup))
