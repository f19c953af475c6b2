"""Decode heads: Mask2Former as Rein configures it (later), a light head for quick runs, and a linear probe."""

from fishertune.heads.base import HEADS, DecodeHead, build_head, check_head
from fishertune.heads import light  # noqa: F401  (registers "light")
from fishertune.heads import linear  # noqa: F401  (registers "linear", the linear probe)
from fishertune.heads import mask2former  # noqa: F401  (registers "mask2former", "mask2former-tiny")

__all__ = ["HEADS", "DecodeHead", "build_head", "check_head"]
