"""The training loop: iteration-based, AdamW + poly schedule, deterministic data order.

Sample number ``k`` of a run (``k = iteration * batch_size + slot``) reads image
``order[k % n]`` of a per-epoch permutation drawn from the run's seed, and is augmented with a
generator seeded by ``(seed, k)``. The data a step sees is therefore a pure function of the seed and
the step, independent of the number of loader workers, and a run can restart at any iteration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fishertune.data import TrainTransform, to_tensor
from fishertune.engine.optim import build_optimizer, build_scheduler
from fishertune.progress import bar as progress_bar


class TrainStream(Dataset):
    """Map-style view of an endless, seeded, augmented stream over a source data set."""

    def __init__(self, dataset, transform: TrainTransform, seed: int):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self._orders: dict[int, np.ndarray] = {}

    def index_of(self, k: int) -> int:
        n = len(self.dataset)
        epoch = k // n
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
        return int(self._orders[epoch][k % n])

    def __len__(self) -> int:  # the stream is endless; the sampler bounds it
        return 2**62

    def __getitem__(self, k: int):
        sample = self.dataset[self.index_of(k)]
        rng = np.random.default_rng([self.seed, 1, k])
        image, label = self.transform(sample["image"], sample["label"], rng)
        return to_tensor(image), torch.from_numpy(label.astype(np.int64))  # NumPy: no torch threads per sample


@dataclass
class TrainStats:
    iterations: int
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)  # (iteration, loss) every log_every


def source_batches(dataset, transform: TrainTransform, seed: int, batch_size: int, num_workers: int = 0,
                   start: int = 0, stop: int | None = None) -> DataLoader:
    """Batches of the seeded stream from sample ``start * batch_size`` up to batch ``stop``.

    Workers decode and augment (a full-size sample costs tens of ms of CPU, mostly PNG decoding and
    the resize; see ``benchmarks/perf``); batches are pinned when CUDA is there. Workers need no
    seeding: a sample draws only from its own generator, seeded by ``(seed, k)``, so batch ``i`` is
    the same for any ``num_workers``. Workers are not persistent because the loader is iterated
    once (a run is one pass over its sampler), and the default prefetch (2 batches per worker)
    already keeps every worker busy; more would only hold more shared memory.
    """
    stream = TrainStream(dataset, transform, seed)
    sampler = range(start * batch_size, stop * batch_size) if stop is not None else range(start * batch_size, 2**62)
    return DataLoader(stream, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


def train(segmentor: torch.nn.Module, method, dataset, transform: TrainTransform, *, iterations: int, batch_size: int,
          lr: float, weight_decay: float, poly_power: float, warmup: int, seed: int, device: torch.device,
          num_workers: int = 0, log_every: int = 50, desc: str = "train") -> TrainStats:
    """Train ``segmentor`` in place for ``iterations`` steps and return the loss log."""
    segmentor.train()
    optimizer = build_optimizer(segmentor, lr=lr, weight_decay=weight_decay, sparse=method.sparse_indices(segmentor))
    scheduler = build_scheduler(optimizer, iterations, poly_power, warmup)
    loader = source_batches(dataset, transform, seed, batch_size, num_workers, 0, iterations)
    stats = TrainStats(iterations=iterations, seconds=0.0)
    started = time.perf_counter()
    running = torch.zeros((), device=device)
    bar = progress_bar(loader, total=iterations, desc=desc, unit="it")
    for it, (images, labels) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        loss = segmentor.loss(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward(segmentor, it)
        grown = method.sparse_growth(segmentor, it, iterations)
        if grown:
            params = dict(segmentor.named_parameters())
            optimizer.grow({params[name]: idx for name, idx in grown.items()})
        optimizer.step()
        scheduler.step()
        running += loss.detach()
        if (it + 1) % log_every == 0 or it + 1 == iterations:
            n = (it % log_every) + 1
            mean = float(running) / n  # one host sync per logging interval, not per step
            running.zero_()
            stats.losses.append((it + 1, mean))
            bar.set_postfix(loss=f"{mean:.3f}")
            if not np.isfinite(mean):
                raise FloatingPointError(f"non-finite loss {mean} at iteration {it + 1}")
    stats.seconds = time.perf_counter() - started
    return stats
