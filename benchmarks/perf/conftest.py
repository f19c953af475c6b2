"""Data for the loading benchmarks: the miniature, and a few frames at the real data sets' sizes.

The full-size frames are drawn by the miniature's own scene generator and styles
(:func:`fishertune.data.synth.write_item`) at 1914x1052 (GTAV) and 2048x1024 (Cityscapes) and laid
out like the real releases, so the real readers and label mappings run on them. PNG decoding time
follows the compressed data rate, so the content matters: these textured, noisy renderings compress
to about 2.9 MB per frame, the order of the real frames (Cityscapes: 11 GB of leftImg8bit PNGs for
5,000 frames, about 2.2 MB each), whereas an upscaled miniature image (large flat areas) would
compress to a fraction of that and decode faster, and pure noise would not compress at all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fishertune.data import synthesize
from fishertune.data.synth import Item, write_item

PROTOCOL = Path(__file__).resolve().parents[1] / "mini" / "protocol.yaml"
REAL_FRAMES = 4  # per data set; every sample decodes its frame again, so a few are enough
REAL_SIZES = {"gtav": (1914, 1052), "cityscapes": (2048, 1024)}


@pytest.fixture(scope="session")
def protocol() -> dict:
    """``benchmarks/mini/protocol.yaml``: the miniature's data and training settings."""
    return yaml.safe_load(PROTOCOL.read_text())


@pytest.fixture(scope="session")
def mini_root(tmp_path_factory, protocol) -> Path:
    """The miniature as the mini protocol writes it (its seed and image count)."""
    out = tmp_path_factory.mktemp("mini")
    synthesize(out, seed=protocol["data"]["synth_seed"], images=protocol["data"]["synth_images"], progress=False)
    return out


@pytest.fixture(scope="session")
def real_root(tmp_path_factory) -> Path:
    """``gtav/`` and ``cityscapes/`` with :data:`REAL_FRAMES` full-size train pairs each, real layouts."""
    out = tmp_path_factory.mktemp("real")
    for i in range(REAL_FRAMES):
        stem = f"aachen/aachen_000000_{19 + 20 * i:06d}"
        for item in (Item("gtav", "train", "", i, f"images/{i + 1:05d}.png", f"labels/{i + 1:05d}.png",
                          REAL_SIZES["gtav"], "gtav"),
                     Item("cityscapes", "train", "", i, f"leftImg8bit/train/{stem}_leftImg8bit.png",
                          f"gtFine/train/{stem}_gtFine_labelTrainIds.png", REAL_SIZES["cityscapes"], "cityscapes")):
            write_item(out, seed=0, item=item)
    return out
