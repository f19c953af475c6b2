"""A cell's compute precision: ``fp32`` (Rein's and the paper's), ``bf16`` autocast, or ``fp64``.

``fp64`` exists for the miniature, measured (``results/perf/mini-signal.md``, figure 6): a tiny model
trained for a few hundred steps from a handful of images turns the last bit of a float32 sum into a
whole mIoU point. The thread count (how a CPU reduction splits its sums) and the torch version change
those bits (measured; another CPU's vector width should too, not measured), and the run then goes
elsewhere (presumably at near-ties of its discrete steps: the Hungarian matching, the point sampling's
top-k, arg-maxes; not isolated). In float64 the same differences are 2^29 times smaller and, measured, no longer reach the
numbers: a mini cell gives the same IoU for every class with 1 or 2 threads and under torch 2.12.1,
2.13.0 and 2.14.1 (a loss can still differ in its last bit). It costs 1.72x the CPU time over the mini
Table 1 grid (1.49-1.85x per cell). It is the miniature's setting: the paper's protocol is fp32.

How it works: the cell runs with ``torch.get_default_dtype()`` set to float64 (:func:`compute_dtype`),
so the backbone, the head and every module a method adds are built in float64 (pretrained files are
converted as they are loaded), and the code that used to write ``.float()`` (upcasting bf16 results
for a loss, a cost matrix or an estimate) writes :func:`to_compute` instead: the default dtype, so
float32 in fp32 and bf16 cells exactly as before, float64 in fp64 cells. Images leave the data
pipeline as float32 and are converted where they enter the model (training, evaluation, and the
source passes of FisherTune's and ChildTune's estimates).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch

PRECISIONS = ("fp32", "bf16", "fp64")


def check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")


@contextmanager
def compute_dtype(precision: str) -> Iterator[torch.dtype]:
    """Set torch's default dtype for a cell of ``precision`` (float64 for ``fp64``, float32 otherwise),
    restoring the previous one afterwards; yields the dtype."""
    check(precision)
    dtype = torch.float64 if precision == "fp64" else torch.float32
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield dtype
    finally:
        torch.set_default_dtype(before)


def to_compute(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the compute dtype (torch's default dtype; ``x`` itself when it already is): what
    ``x.float()`` is in fp32 and bf16 cells, float64 in fp64 cells."""
    dtype = torch.get_default_dtype()
    return x if x.dtype == dtype else x.to(dtype)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on ``device`` for ``precision == "bf16"``; nothing for fp32 and fp64."""
    check(precision)
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
