"""Locating and loading official checkpoint files, safely and strictly.

Loading never runs code from a file: pickles are read with ``torch.load(weights_only=True)``,
``.safetensors`` with safetensors, TorchScript archives (OpenAI's CLIP files) with the restricted reader
of :mod:`fishertune.backbones.torchscript` (never ``torch.jit.load``). Keys are checked strictly after
the family's conversion: a wrong or truncated file stops the run with one line naming the file and the
missing or unexpected keys.

Pre-flight checks (:func:`shapes_only`) read a file's index alone: names, shapes and dtypes as meta
tensors, the data never read (a safetensors header; the zip directory and pickle of a ``torch.save``
or TorchScript archive, its storages memory-mapped and never touched). The family's conversion runs on
those meta tensors against a model built on the meta device, and :func:`load_strict` checks every key
and shape, so a run reads each checkpoint's data once, when the cell builds its backbone.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from torch import nn

from fishertune.backbones.torchscript import is_torchscript_archive, read_torchscript_state_dict
from fishertune.errors import UserError
from fishertune.tensorfile import CodeInFile, DamagedFile, first_line, load_safetensors, torch_load

WEIGHTS_ENV = "FISHERTUNE_WEIGHTS"
#: the tiny foundation models shipped inside the package (made by ``fishertune tiny pretrain``)
TINY_DIR = Path(__file__).resolve().parent / "tiny"
#: set by :func:`shapes_only`: :func:`read_state_dict` returns meta tensors
_SHAPES_ONLY: ContextVar[bool] = ContextVar("fishertune_shapes_only", default=False)


@contextmanager
def shapes_only():
    """Within this block :func:`read_state_dict` reads only the names, shapes and dtypes of a file's tensors
    (as meta tensors), so a family's loader applied to a model built on the meta device checks a checkpoint
    key by key and shape by shape without reading its data (the pre-flight)."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def resolve_weights(filename: str, explicit: str | os.PathLike | None, backbone: str, shipped: bool = False) -> Path:
    """Find a checkpoint: an explicit path (manifest field), else the package's own file for a shipped tiny
    model, else ``$FISHERTUNE_WEIGHTS/filename``."""
    if explicit:
        path = Path(explicit).expanduser()
        where = "the manifest's weights entry"
    elif shipped:
        path = TINY_DIR / filename
        if not path.is_file():
            raise UserError(
                f"backbone {backbone!r}: its pretrained tiny model {path} is missing from the package; make it "
                f"with `fishertune tiny pretrain {backbone}` (or set `pretrained: false` for random weights)"
            )
        return path
    else:
        root = os.environ.get(WEIGHTS_ENV)
        if not root:
            raise UserError(
                f"backbone {backbone!r} needs the checkpoint {filename}: set {WEIGHTS_ENV} to the "
                f"directory holding it, or give its path under `weights: {{{backbone}: PATH}}` in the manifest"
            )
        path = Path(root).expanduser() / filename
        where = f"${WEIGHTS_ENV}"
    if path.is_dir():
        raise UserError(f"backbone {backbone!r}: checkpoint {path} (from {where}) is a directory; give the path of "
                        f"the file {filename} itself")
    if not path.is_file():
        raise UserError(
            f"backbone {backbone!r}: checkpoint {path} (from {where}) does not exist; download "
            f"{filename} from the model's official release and put it there"
        )
    return path


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: safetensors' dtype names; another (e.g. an 8-bit float) is read as float32: the pre-flight checks shapes
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_shapes(path: Path) -> dict[str, torch.Tensor]:
    """Meta tensors with the names, shapes and dtypes of a safetensors header (the data is not read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for key in f.keys():
                part = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(part.get_dtype(), torch.float32)
                out[key] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
            return out
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise DamagedFile(first_line(e)) from None


def _torch_load(path: Path, meta: bool):
    """``torch.load`` without running code; with ``meta``, storages memory-mapped and moved to the meta device
    (never read), except in files of the legacy (pre-zip) format, which cannot be mapped and are read."""
    if meta:
        try:
            return torch_load(path, mmap=True, map_location="meta")
        except CodeInFile:
            raise
        except DamagedFile as e:
            if "mmap" not in str(e):
                raise
    return torch_load(path, map_location="meta" if meta else "cpu")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from ``path`` without executing code; unwrap ``model``/``state_dict`` nesting. Within
    :func:`shapes_only`, meta tensors read from the file's index only."""
    meta = _SHAPES_ONLY.get()
    try:
        if path.suffix == ".safetensors":
            state = _safetensors_shapes(path) if meta else load_safetensors(path)[0]
        elif is_torchscript_archive(path):
            state = read_torchscript_state_dict(path, meta=meta)  # raises UserError itself
        else:
            state = _torch_load(path, meta)
    except CodeInFile as e:
        raise UserError(
            f"checkpoint {path} carries objects other than tensors and was not loaded ({e}); "
            "use the official weights file or a .safetensors export"
        ) from None
    except DamagedFile as e:
        raise UserError(f"checkpoint {path} cannot be read ({e}); the file may be truncated: download it again") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path} does not hold a dictionary of tensors; is it a weights file?")
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path, ignore: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module``; any missing, unexpected or mis-shaped key is a user error. A module
    on the meta device holds no values: for it the check is all (nothing is copied, and PyTorch's
    per-key warning that copying into a meta parameter is a no-op does not arise)."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own and k not in ignore)
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:3])}{more}")
        raise UserError(
            f"checkpoint {path} does not fit {type(module).__name__}: {'; '.join(parts)}; "
            "is it the right file for this backbone, and complete?"
        )
    if any(t.is_meta for t in own.values()):
        return
    module.load_state_dict({k: state[k] for k in own}, strict=True)
