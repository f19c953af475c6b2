"""Cells for the performance checks, built as a run builds them: shared by ``test_methods.py``,
``full_size_cpu.py`` (one step of every full-size family x method on the CPU) and ``gpu_check.py``.

* :func:`train_step`: one step as ``engine.train.train`` takes it (forward and loss under the precision's
  autocast, ``zero_grad``, backward, the method's ``after_backward``, the optimizer's step; no scheduler);
  :func:`largest_batch`: the largest batch that fits on a GPU, doubling until out of memory.
* :func:`write_manifest`: a manifest over ``benchmarks/table1.yaml`` (Rein's protocol: Mask2Former, crop 512)
  for given backbones, methods and checkpoint files, with the estimating methods' budgets cut to a few images
  (a smoke check times the step, not the estimate) and without their cache.
* :func:`peak_rss_gb` and :func:`reset_peak_rss`: the process's peak resident memory, and (Linux) its reset,
  so that one phase's peak can be told from an earlier one's.
* :class:`SyntheticSource`: street-like frames in the readers' format, for ``prepare_cell``'s source data.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from fishertune.engine.train import autocast

ROOT = Path(__file__).resolve().parents[2]
TABLE1 = ROOT / "benchmarks" / "table1.yaml"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(loss_fn: Callable, model, method, optimizer, images: torch.Tensor, labels: torch.Tensor,
               device: torch.device, precision: str, iteration: int = 0) -> None:
    """One step as ``engine.train.train`` takes it; ``loss_fn(images, labels)`` is the (maybe compiled) loss."""
    with autocast(device, precision):
        loss = loss_fn(images, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.after_backward(model, iteration)
    optimizer.step()


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Wall seconds of ``fn()``, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def largest_batch(step: Callable[[int], None], start: int, limit: int, device: torch.device,
                  clear: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """On CUDA: the largest batch (``start`` doubled until a step runs out of memory, at most ``limit``) with its
    images/s (median of 3 steps) and the peak memory of those steps. ``step(batch)`` runs one training step at
    that batch; ``clear()`` drops what a failed step left (gradients)."""
    largest, batch = start, start
    while batch * 2 <= limit:
        batch *= 2
        failed = False
        try:
            step(batch)
            sync(device)
        except torch.cuda.OutOfMemoryError:
            failed = True
        clear()
        gc.collect()
        torch.cuda.empty_cache()
        if failed:
            break
        largest = batch
    step(largest)
    torch.cuda.reset_peak_memory_stats()
    times = [timed(lambda: step(largest), device) for _ in range(3)]
    return {"largest_batch": largest, "images_per_s_largest_batch": round(largest / statistics.median(times), 3),
            "peak_memory_gb_largest_batch": round(torch.cuda.max_memory_allocated() / 2**30, 3)}


def peak_rss_gb() -> float:
    """The peak resident memory since the start or the last :func:`reset_peak_rss` (Linux: VmHWM), in GiB."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_rss() -> bool:
    """Reset the peak resident memory to the current one (Linux ``/proc/self/clear_refs``); False if not here."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def write_manifest(path: Path, backbones: list[str], methods: list[str], weights: dict[str, Path], *,
                   batch: int = 4, crop: int | None = None, precision: str = "fp32", iterations: int = 1,
                   estimation_images: int = 2, workers: int = 0) -> Path:
    """A manifest over ``benchmarks/table1.yaml`` naming ``weights``, with FisherTune's and ChildTune's
    estimates on ``estimation_images`` images (at least 2: DR-FIM's shift measures statistics over a batch),
    not cached (FisherTune's direct estimator: the variational one keeps about ten fp32 copies of the blocks'
    parameters, 12 GB for a ViT-L, more than a smoke check needs),
    and ``workers`` loader processes (0: the step's data is read in the measured process)."""
    train: dict[str, Any] = {"batch_size": batch, "iterations": iterations, "precision": precision}
    if crop is not None:
        train["crop_size"] = crop
    body = {"version": 1, "name": path.stem, "table": "table1", "include": str(TABLE1), "backbones": backbones,
            "methods": methods, "weights": {k: str(v) for k, v in weights.items()}, "train": train,
            "execution": {"num_workers": workers},
            "method_configs": {"fishertune": {"images": estimation_images, "estimator": "direct", "cache": False},
                               "childtune": {"images": estimation_images}}}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


class SyntheticSource(torch.utils.data.Dataset):
    """``n`` frames of ``size`` (w, h) in the readers' format: random pixels and street-like labels (a train id
    per cell of a 4x4 grid, the top eighth ignored), drawn from ``seed``."""

    def __init__(self, n: int = 4, size: tuple[int, int] = (1024, 512), seed: int = 0):
        rng = np.random.default_rng(seed)
        w, h = size
        self.items = []
        for _ in range(n):
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            grid = rng.integers(0, 19, (4, 4), dtype=np.uint8)
            label = np.kron(grid, np.ones((h // 4 + 1, w // 4 + 1), dtype=np.uint8))[:h, :w]
            label[: h // 8] = 255
            self.items.append({"image": image, "label": label})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def __repr__(self) -> str:  # what the cache keys of prepare_cell's context see
        return f"SyntheticSource({len(self)})"
