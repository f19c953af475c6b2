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
    weights: str | None = None  # official file name (None: random init only)
    loader: Callable[[Backbone, Path], None] | None = None
    shipped: bool = False  # the file ships inside the package (the tiny foundation models), not in $FISHERTUNE_WEIGHTS


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def register_backbone(name: str, family: str, weights: str | None = None, loader=None, shipped: bool = False):
    """Decorator registering a variant function under ``name``; a ``shipped`` variant's ``weights`` file
    lies in ``fishertune/backbones/tiny/`` (see :mod:`fishertune.pretrain`)."""

    def wrap(fn):
        BACKBONES.register(name, BackboneSpec(name, family, fn, weights, loader, shipped))
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
    """Build ``name``; load its checkpoint (official, or the shipped tiny model) when ``pretrained`` is true.

    Random initialisation (``pretrained=False``, or what a checkpoint leaves untouched) is drawn from
    ``seed`` so that two builds are identical.
    """
    spec = BACKBONES.get(name, where)
    path = weights_path(spec, weights) if pretrained else None
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.fn(**kwargs)
    else:
        model = spec.fn(**kwargs)
    if path is not None:
        spec.loader(model, path)
    return model


def weights_path(spec: BackboneSpec, explicit: str | os.PathLike | None = None) -> Path | None:
    """The checkpoint a pretrained build of ``spec`` reads (None when the variant has none)."""
    if not spec.weights:
        return None
    return resolve_weights(spec.weights, explicit, spec.name, shipped=spec.shipped)
