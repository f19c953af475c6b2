"""Reading images and label maps from disk, the same way for every data set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fishertune.errors import UserError


def read_image(path: Path) -> np.ndarray:
    """The image at ``path`` as a writable ``H x W x 3`` uint8 RGB array."""
    with Image.open(path) as image:
        # convert() of an RGB image would only copy it: decode straight into the array instead
        return np.array(image if image.mode == "RGB" else image.convert("RGB"))


def read_label(path: Path) -> np.ndarray:
    """The raw label map at ``path`` as a writable ``H x W`` uint8 array of ids (palette indices for
    palette PNGs).

    Raises :class:`UserError` for a file that is not a single-channel id map (a colour rendering,
    for example) or holds ids above 255.
    """
    with Image.open(path) as label:
        if label.mode in ("L", "P"):
            return np.array(label)
        if label.mode in ("I", "I;16"):
            ids = np.asarray(label)
            if ids.size and (ids.min() < 0 or ids.max() > 255):
                raise UserError(f"label {path} holds ids outside 0..255; expected 8-bit class ids")
            return ids.astype(np.uint8)
        raise UserError(f"label {path} is a {label.mode} image, not a single-channel map of class ids; "
                        "use the id PNGs of the data set (not its colour renderings)")

