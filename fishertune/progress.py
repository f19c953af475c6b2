"""Progress bars on every long loop: tqdm, off when stderr is not a terminal or TQDM_DISABLE is set."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def enabled() -> bool:
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return False
    return sys.stderr.isatty()


def bar(iterable=None, **kwargs):
    """``tqdm(iterable, **kwargs)`` shown only when :func:`enabled` (a caller's ``disable=False`` does not
    override that; its ``disable=True`` hides the bar anyway)."""
    kwargs["disable"] = bool(kwargs.get("disable")) or not enabled()
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
