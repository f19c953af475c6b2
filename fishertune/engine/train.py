"""The training loop: iteration-based, AdamW + poly schedule, deterministic data order.

Sample number ``k`` of a run (``k = iteration * batch_size + slot``) reads image
``order[k % n]`` of a per-epoch permutation drawn from the run's seed, and is augmented with a
generator seeded by ``(seed, k)``. The data a step sees is therefore a pure function of the seed and
the step, independent of the number of loader workers, and a run can restart at any iteration.

Distributed (``torchrun``, one process per device): the global batch keeps its size and its samples;
process ``r`` of ``w`` takes slots ``r*b .. (r+1)*b - 1`` of every batch (``b = batch / w``), and the
model runs in DistributedDataParallel, whose gradient is the mean of the processes' (the mean of the
loss over the global batch when each process's loss is a mean over its equal share; Mask2Former's
mask count is averaged over the processes, as Mask2Former does).

Speed (DESIGN section 4, issue 9): ``precision: bf16`` runs the forward and loss under bf16 autocast
(weights, gradients and optimizer state stay fp32); ``compile`` puts the loss module through
``torch.compile``; the step never waits for the device: the loss is summed on the device and read
once per logging interval, where a non-finite value stops the run with the iteration it appeared at.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from fishertune.data import TrainTransform, to_tensor
from fishertune.engine.checkpoint import (Checkpoint, load_trainable_state, rng_state, set_rng_state,
                                          trainable_state)
from fishertune.engine.optim import build_optimizer, build_scheduler
from fishertune.errors import UserError
from fishertune.precision import autocast, to_compute  # noqa: F401  (autocast: engine.train's name, kept)
from fishertune.progress import bar as progress_bar
from fishertune.tensorfile import first_line


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


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: at ``iteration`` (1-based), after ``last_finite`` =
    ``(iteration, loss)`` of the last finite step (None if the first step already was not)."""

    def __init__(self, iteration: int, value: float, last_finite: tuple[int, float] | None):
        self.iteration, self.value, self.last_finite = iteration, value, last_finite
        last = (f"; the last finite loss was {last_finite[1]:.4f} at iteration {last_finite[0]}" if last_finite
                else "; no step had a finite loss")
        super().__init__(f"non-finite loss ({value}) at iteration {iteration}{last}")


@dataclass
class TrainStats:
    iterations: int
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)  # (iteration, loss) every log_every
    resumed_from: int = 0  # the iteration a checkpoint let the run start at (0: from scratch)


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process (``(0, 1)`` outside a distributed run)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class BatchSlots(Sampler):
    """Sample numbers ``i * batch + rank * share + j`` for batches ``start <= i < stop`` (endless when
    ``stop`` is None) and ``0 <= j < share``: this process's slots of every global batch."""

    def __init__(self, batch: int, start: int, stop: int | None, rank: int = 0, world_size: int = 1):
        self.batch, self.start, self.stop, self.rank = batch, start, stop, rank
        self.share = batch // world_size

    def __iter__(self):
        i = self.start
        while self.stop is None or i < self.stop:
            first = i * self.batch + self.rank * self.share
            yield from range(first, first + self.share)
            i += 1

    def __len__(self) -> int:
        return 2**62 if self.stop is None else (self.stop - self.start) * self.share


def source_batches(dataset, transform: TrainTransform, seed: int, batch_size: int, num_workers: int = 0,
                   start: int = 0, stop: int | None = None, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Batches of the seeded stream from sample ``start * batch_size`` up to batch ``stop``; in a
    distributed run this process's share of each (``batch_size / world_size`` samples).

    Workers decode and augment (a full-size sample costs tens of ms of CPU, mostly PNG decoding and
    the resize; see ``benchmarks/perf``); batches are pinned when CUDA is there. Workers need no
    seeding: a sample draws only from its own generator, seeded by ``(seed, k)``, so batch ``i`` is
    the same for any ``num_workers``. Workers are not persistent because the loader is iterated
    once (a run is one pass over its sampler), and the default prefetch (2 batches per worker)
    already keeps every worker busy; more would only hold more shared memory.
    """
    if batch_size % world_size:
        from fishertune.errors import UserError

        raise UserError(f"train.batch_size {batch_size} does not split over {world_size} processes; use a batch "
                        "size divisible by the number of processes (the protocol's global batch is 4)")
    stream = TrainStream(dataset, transform, seed)
    sampler = BatchSlots(batch_size, start, stop, rank, world_size)
    # its own generator for the (unused) worker base seed, so that starting the loader leaves torch's stream alone
    return DataLoader(stream, batch_size=batch_size // world_size, sampler=sampler, num_workers=num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed))


class LossModule(torch.nn.Module):
    """``forward(images, labels)`` = the segmentor's training loss: what DDP and torch.compile wrap."""

    def __init__(self, segmentor: torch.nn.Module):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.segmentor.loss(images, labels)


def _check_window(window: torch.Tensor, n: int, first_it: int, last_finite: tuple[int, float] | None):
    """Read the losses of one interval (one host sync); raise :class:`NonFiniteLoss` at the first bad one.
    Returns their mean and the last finite ``(iteration, loss)``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        window = window[:n].clone()  # the global batch's loss: the mean of the processes' (each over its share)
        dist.all_reduce(window)
        window /= dist.get_world_size()
    values = window[:n].tolist()
    for k, v in enumerate(values):
        if not math.isfinite(v):
            raise NonFiniteLoss(first_it + k, v, last_finite)
        last_finite = (first_it + k, v)
    return sum(values) / n, last_finite


def train(segmentor: torch.nn.Module, method, dataset, transform: TrainTransform, *, iterations: int, batch_size: int,
          lr: float, weight_decay: float, poly_power: float, warmup: int, seed: int, device: torch.device,
          num_workers: int = 0, log_every: int = 50, desc: str = "train", precision: str = "fp32",
          compile: bool = False, checkpoint: Checkpoint | None = None, backbone_lr_mult: float = 1.0) -> TrainStats:
    """Train ``segmentor`` in place for ``iterations`` steps and return the loss log.

    With ``checkpoint``, the state is saved every ``checkpoint.every`` iterations, and a run that finds
    one continues from it, ending exactly where an uninterrupted run ends."""
    rank, world_size = world()
    segmentor.train()
    optimizer = build_optimizer(segmentor, lr=lr, weight_decay=weight_decay, sparse=method.sparse_indices(segmentor),
                                scaled=getattr(segmentor, "backbone_weights", ()), lr_mult=backbone_lr_mult)
    scheduler = build_scheduler(optimizer, iterations, poly_power, warmup)
    stats = TrainStats(iterations=iterations, seconds=0.0)
    start, last_finite, elapsed = 0, None, 0.0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        load_trainable_state(segmentor, saved["model"], checkpoint.path)
        for it in range(saved["iteration"]):  # the method's own record of its growth stages (cheap, no tensors)
            method.sparse_growth(segmentor, it, iterations)
        with _restoring(checkpoint):
            optimizer.load_state_dict(saved["optimizer"])  # a sparse optimizer's indices are in its groups
            scheduler.load_state_dict(saved["scheduler"])
            stats.losses = [tuple(x) for x in saved["losses"]]
            last_finite = tuple(saved["last_finite"]) if saved["last_finite"] else None
        start, elapsed = saved["iteration"], saved["seconds"]
        stats.resumed_from = start
    else:  # training's random draws (drop path, point sampling) follow the seed alone: not what ran before
        # (initialisation, a method's estimate), and in a distributed run a stream per process
        torch.manual_seed(seed if world_size == 1 else seed * 1000 + rank)
    model: torch.nn.Module = LossModule(segmentor)
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=True)
    if compile:
        model = torch.compile(model)
    loader = source_batches(dataset, transform, seed, batch_size, num_workers, start, iterations, rank, world_size)
    batches = iter(loader)
    if saved is not None:  # the streams as they were at the save
        with _restoring(checkpoint):
            set_rng_state(saved["rng"][rank], device)
    started = time.perf_counter()
    window = torch.zeros(log_every, device=device)
    pending = 0  # steps in ``window`` not yet read
    if saved is not None:
        pending = len(saved["window"])
        window[:pending] = saved["window"].to(device)
    bar = progress_bar(batches, total=iterations, initial=start, desc=desc, unit="it")
    for it, (images, labels) in enumerate(bar, start=start):
        images = to_compute(images.to(device, non_blocking=True))  # float64 in an fp64 cell
        labels = labels.to(device, non_blocking=True)
        with autocast(device, precision):
            loss = model(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward(segmentor, it)
        grown = method.sparse_growth(segmentor, it, iterations)
        if grown:
            params = dict(segmentor.named_parameters())
            optimizer.grow({params[name]: idx for name, idx in grown.items()})
        optimizer.step()
        scheduler.step()
        window[pending] = loss.detach()
        pending += 1
        done = it + 1
        if done % log_every == 0 or done == iterations:
            mean, last_finite = _check_window(window, pending, done - pending + 1, last_finite)
            pending = 0
            stats.losses.append((done, mean))
            bar.set_postfix(loss=f"{mean:.3f}")
        if checkpoint is not None and checkpoint.every and done % checkpoint.every == 0 and done < iterations:
            if pending:  # never save a state that already went non-finite
                _, last_finite = _check_window(window[:pending].clone(), pending, done - pending + 1, last_finite)
            _save(checkpoint, segmentor, optimizer, scheduler, stats, done, last_finite, window[:pending],
                  elapsed + time.perf_counter() - started, device, rank, world_size)
    stats.seconds = elapsed + time.perf_counter() - started
    return stats


@contextmanager
def _restoring(checkpoint: Checkpoint):
    """Restoring a part of ``checkpoint``: a part that does not fit this cell's training is a one-line error."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{checkpoint.path}: does not fit this cell's training state ({first_line(e)}); delete it "
                        "to restart the cell from iteration 0") from None


def _save(checkpoint: Checkpoint, segmentor, optimizer, scheduler, stats: TrainStats, iteration: int,
          last_finite, window: torch.Tensor, seconds: float, device: torch.device, rank: int, world_size: int) -> None:
    """Write the checkpoint after ``iteration`` steps (process 0 writes, holding every process's generators)."""
    rng = [rng_state(device)]
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, rng[0])
        rng = gathered
    if rank == 0:
        checkpoint.save({"iteration": iteration, "model": trainable_state(segmentor),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "losses": [list(x) for x in stats.losses], "last_finite": list(last_finite) if last_finite else None,
                         "window": window.detach().cpu().clone(), "seconds": seconds, "rng": rng})
    if world_size > 1:
        dist.barrier()
