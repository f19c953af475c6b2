"""Decode heads: Mask2Former as Rein configures it (later), and a light head for quick runs."""

from fishertune.heads.base import HEADS, DecodeHead, build_head, check_head
from fishertune.heads import light  # noqa: F401  (registers "light")
from fishertune.heads import mask2former  # noqa: F401  (registers "mask2former", "mask2former-tiny")

__all__ = ["HEADS", "DecodeHead", "build_head", "check_head"]
