"""Locating and loading official checkpoint files, safely and strictly.

Loading never runs code from a file: pickles are read with ``torch.load(weights_only=True)``,
``.safetensors`` with safetensors, TorchScript archives (OpenAI's CLIP files) with the restricted reader
of :mod:`fishertune.backbones.torchscript` (never ``torch.jit.load``). Keys are checked strictly after
the family's conversion: a wrong or truncated file stops the run with one line naming the file and the
missing or unexpected keys.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from fishertune.backbones.torchscript import is_torchscript_archive, read_torchscript_state_dict
from fishertune.errors import UserError
from fishertune.tensorfile import CodeInFile, DamagedFile, load_safetensors, torch_load

WEIGHTS_ENV = "FISHERTUNE_WEIGHTS"
#: the tiny foundation models shipped inside the package (made by ``fishertune tiny pretrain``)
TINY_DIR = Path(__file__).resolve().parent / "tiny"


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


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from ``path`` without executing code; unwrap ``model``/``state_dict`` nesting."""
    try:
        if path.suffix == ".safetensors":
            state, _ = load_safetensors(path)
        elif is_torchscript_archive(path):
            state = read_torchscript_state_dict(path)  # raises UserError itself
        else:
            state = torch_load(path)
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
    """Load ``state`` into ``module``; any missing, unexpected or mis-shaped key is a user error."""
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
    module.load_state_dict({k: state[k] for k in own}, strict=True)
