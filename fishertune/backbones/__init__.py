"""Vision foundation model backbones: one module per family, all behind :class:`Backbone`."""

from fishertune.backbones.base import QKV, Backbone, default_out_indices
from fishertune.backbones.registry import BACKBONES, BackboneSpec, build_backbone, register_backbone
from fishertune.backbones import dinov2  # noqa: F401  (registers its variants)

__all__ = ["QKV", "Backbone", "BACKBONES", "BackboneSpec", "build_backbone", "default_out_indices", "register_backbone"]
