"""Training checkpoints: everything a killed cell needs to continue as if it had never stopped.

A checkpoint holds the model's trainable state (parameters that require grad, and every buffer; the
frozen weights are rebuilt from the checkpoint file the cell started from), the optimizer (a sparse
optimizer's indices and moments included), the scheduler, the loss log, and every random generator
(torch's CPU and CUDA streams, NumPy's and Python's global ones; one set per process of a
distributed run). The data order needs nothing: batch ``i`` is a pure function of the seed and ``i``
(``fishertune.engine.train``). It is written atomically (temporary file, flush, rename), so a kill
during the write leaves the previous checkpoint, and read with ``torch.load(weights_only=True)``: no
code in a checkpoint file ever runs.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fishertune.errors import UserError
from fishertune.tensorfile import DamagedFile, torch_load

CHECKPOINT_VERSION = 1
#: what a checkpoint holds (``fishertune.engine.train``), with the types each entry must have
FIELDS: dict[str, tuple[type, ...]] = {
    "iteration": (int,), "model": (dict,), "optimizer": (dict,), "scheduler": (dict,), "losses": (list,),
    "last_finite": (list, type(None)), "window": (torch.Tensor,), "seconds": (float, int), "rng": (list,)}
_MISSING = object()


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    out = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
           "python": [version, list(state), gauss_next]}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, inner, gauss_next = state["python"]
    random.setstate((version, tuple(inner), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train and every buffer (what a rebuilt model lacks to be the trained one)."""
    state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    state.update({name: b.detach() for name, b in model.named_buffers()})
    return state


@dataclass
class Checkpoint:
    """Where a cell's checkpoint lives and how often it is written (every ``every`` iterations; 0: never)."""

    path: Path
    every: int

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, state: dict[str, Any]) -> None:
        from fishertune.runner.store import atomic_write

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                torch.save({"version": CHECKPOINT_VERSION, **state}, f)
                f.flush()
                os.fsync(f.fileno())

        atomic_write(self.path, write)

    def load(self, mmap: bool = False) -> dict[str, Any] | None:
        """The saved state, or None when there is none. A damaged or foreign file is a one-line error.
        ``mmap``: map the tensors instead of reading them (to look at the iteration of a large one)."""
        if not self.path.is_file():
            return None
        try:
            state = torch_load(self.path, mmap=mmap)
        except DamagedFile as e:  # truncated, not a checkpoint, or carrying code (refused by weights_only)
            raise UserError(f"{self.path}: not a loadable checkpoint ({e}); delete it to restart the "
                            "cell from iteration 0") from None
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            raise UserError(f"{self.path}: not a checkpoint of this version of fishertune-bench; delete it to "
                            "restart the cell from iteration 0")
        wrong = [key for key, kinds in FIELDS.items() if not isinstance(state.get(key, _MISSING), kinds)]
        if wrong or state["iteration"] < 0:
            what = f"lacks or mistypes {', '.join(wrong)}" if wrong else f"has iteration {state['iteration']}"
            raise UserError(f"{self.path}: a damaged checkpoint ({what}); delete it to restart the cell from "
                            "iteration 0")
        return state

    def iteration(self) -> int | None:
        """The iteration the checkpoint was taken after (for `fishertune status`), without loading tensors."""
        state = self.load(mmap=True)
        return None if state is None else int(state["iteration"])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Put a checkpoint's trainable state into a freshly built model; every key must match."""
    expected = trainable_state(model)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise UserError(f"{where}: the checkpoint does not fit this cell's model ({len(missing)} missing, "
                        f"{len(extra)} unexpected entries, e.g. {(missing or extra)[0]!r}); delete it to restart")
    with torch.no_grad():
        for name, value in state.items():
            if expected[name].shape != value.shape:
                raise UserError(f"{where}: {name} has shape {tuple(value.shape)} in the checkpoint, "
                                f"{tuple(expected[name].shape)} in the model; delete it to restart")
            expected[name].copy_(value)
