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
    """``tqdm(iterable, **kwargs)`` shown only when :func:`enabled`."""
    kwargs.setdefault("disable", not enabled())
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
