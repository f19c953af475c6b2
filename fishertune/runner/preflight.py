"""Pre-flight of a reproduction (``fishertune reproduce``): everything a sweep needs, checked before any
training, every problem listed at once.

A full Table 1 is days of GPU time, so the check is thorough: each data set the manifest reads is found
and verified (pairs, official counts, label values, sizes: the same check as ``fishertune data verify``,
remembered once passed), each checkpoint is present and fits its backbone (read without running code and
matched key by key against the architecture, built on the meta device so no memory is spent), and a GPU
is there unless the command says ``--device cpu``. Without data or weights it answers in seconds.
"""

from __future__ import annotations

import torch

from fishertune.backbones import BACKBONES
from fishertune.backbones.registry import weights_path
from fishertune.errors import UserError
from fishertune.runner.data import SPLITS, cache_dir, data_roots
from fishertune.runner.manifest import Cell, LoadedManifest


def _device_problem(lm: LoadedManifest, device: str | None) -> str | None:
    wanted = device or lm.manifest.execution.device
    if lm.tiny and wanted == "auto":
        return None  # tiny backbones: minutes on a CPU
    if wanted in ("auto", "cuda") and not torch.cuda.is_available():
        return ("device: no GPU (torch.cuda.is_available() is False); run on a machine with one, or pass "
                "--device cpu to train on the CPU (days per full-size cell)")
    return None


def weights_problems(lm: LoadedManifest, cells: list[Cell]) -> list[str]:
    m = lm.manifest
    problems = []
    if not m.pretrained:
        return problems
    for name in dict.fromkeys(c.backbone for c in cells):
        spec = BACKBONES.get(name)
        if not spec.weights:
            continue
        try:
            path = weights_path(spec, m.weights.get(name))
            with torch.device("meta"):
                model = spec.fn(img_size=m.train.crop_size)
            spec.loader(model, path)  # reads without running code; a file that does not fit is a UserError
        except UserError as e:
            problems.append(f"weights: {e}")
    return problems


def _data_problems(lm: LoadedManifest, progress: bool) -> list[str]:
    from fishertune.data.verify import preflight

    m = lm.manifest
    problems = []
    splits = [(m.source, SPLITS[m.source][0]), *((t, SPLITS[t][1]) for t in m.targets)]
    for name, split in splits:
        try:
            root = data_roots(m, [name], progress)[name]
            if not root.is_dir():
                raise UserError(f"{name} is expected at {root}, which is not a directory; unpack the official "
                                f"download there (see `fishertune data prepare --help`)")
            preflight(name, root, split, cache_dir(), progress, any_count=m.data.counts == "any")
        except UserError as e:
            problems.append(f"data: {e}")
    return problems


def reproduction_problems(lm: LoadedManifest, cells: list[Cell], device: str | None = None,
                          progress: bool = True) -> list[str]:
    """Every reason the cells cannot run here, one line each (empty: ready)."""
    problems = [p for p in [_device_problem(lm, device)] if p]
    problems += weights_problems(lm, cells)
    problems += _data_problems(lm, progress)
    return problems
