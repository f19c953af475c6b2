"""Backbone registry: one short function per variant (timm style) plus its weights file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fishertune.backbones.base import Backbone
from fishertune.backbones.weights import resolve_weights
from fishertune.registry import Registry


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one variant: ``fn(**kwargs)``, its family, and its official weights (if any)."""

    name: str
    family: str
    fn: Callable[..., Backbone]
    weights: str | None = None  # official file name; None for the tiny variants (random init)
    loader: Callable[[Backbone, Path], None] | None = None


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def register_backbone(name: str, family: str, weights: str | None = None, loader=None):
    """Decorator registering a variant function under ``name``."""

    def wrap(fn):
        BACKBONES.register(name, BackboneSpec(name, family, fn, weights, loader))
        return fn

    return wrap


def build_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    seed: int | None = None,
    where: str = "",
    **kwargs,
) -> Backbone:
    """Build ``name``; load its official checkpoint when it has one and ``pretrained`` is true.

    Random initialisation (tiny variants, or ``pretrained=False``) is drawn from ``seed`` so that two
    builds are identical.
    """
    spec = BACKBONES.get(name, where)
    path = resolve_weights(spec.weights, weights, name) if (spec.weights and pretrained) else None
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.fn(**kwargs)
    else:
        model = spec.fn(**kwargs)
    if path is not None:
        spec.loader(model, path)
    return model
