"""Vision foundation model backbones: one module per family, all behind :class:`Backbone`."""

from fishertune.backbones.base import QKV, Backbone, default_out_indices
from fishertune.backbones.registry import BACKBONES, BackboneSpec, build_backbone, register_backbone

# importing a family's module registers its variants
from fishertune.backbones import clip, dinov2, eva02, mae, sam  # noqa: F401,E402

__all__ = ["QKV", "Backbone", "BACKBONES", "BackboneSpec", "build_backbone", "default_out_indices", "register_backbone"]
