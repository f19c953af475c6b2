"""Reading tensor files without running code: torch pickles (``weights_only``) and safetensors.

Both readers turn every way a file can be damaged (truncated, a broken safetensors header, not a
tensor file at all) into :class:`DamagedFile`, whose message is one line, for the caller to wrap in a
:class:`~fishertune.errors.UserError` saying what the file is and how to fix it. A pickle written with
a newer protocol than torch's default loads without the warning torch prints for it (the warning
would appear above the one line of an error, or on every load of a good file).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch


class DamagedFile(ValueError):
    """A tensor file that cannot be read; the message is one line (the reader's reason)."""


class CodeInFile(DamagedFile):
    """A torch pickle that holds objects other than tensors and plain containers (refused, not run)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def torch_load(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, without torch's pickle-protocol warning."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CodeInFile(first_line(e)) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise DamagedFile(first_line(e)) from None


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (on the CPU) and the metadata of a safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise DamagedFile(first_line(e)) from None
