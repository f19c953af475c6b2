"""Deterministic, class-balanced subsets of a data set (``--subset N``, manifest ``data.subset``).

For quick runs and CI regression on real data. Which classes each image holds (its *class presence*)
is read once from the labels and cached on disk, keyed by the listing (paths, sizes and modification
times of the label files), so a changed tree is read again. The selection is greedy and seeded:
walking the images in a seeded random order, it repeatedly takes the first unchosen image that holds
the class the subset has seen least so far (among classes still available), so that rare classes
(train, motorcycle, ...) are in the subset whenever the data set has them. The same tree, ``N`` and
seed always give the same images. A reader with groups (ACDC's conditions) gets ``N`` images per group.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from fishertune.data.labels import NUM_CLASSES
from fishertune.progress import bar


def _listing_key(dataset) -> str:
    h = hashlib.sha256(f"{type(dataset).__name__}|{getattr(dataset, 'split', '')}".encode())
    for _, label in dataset.pairs:
        st = os.stat(label)
        h.update(f"{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    lut = getattr(dataset, "label_lut", None)
    if lut is not None:
        h.update(np.asarray(lut).tobytes())
    return h.hexdigest()[:20]


def class_presence(dataset, cache: Path | None = None, workers: int | None = None,
                   progress: bool = True) -> np.ndarray:
    """``(len(dataset), 19)`` booleans: which train classes each image's label holds (cached)."""
    path = None
    if cache is not None:
        path = Path(cache) / "class-presence" / f"{dataset.name}-{_listing_key(dataset)}.npy"
        if path.is_file():
            try:
                table = np.load(path, allow_pickle=False)
                if table.shape == (len(dataset), NUM_CLASSES):
                    return table
            except (OSError, ValueError):
                pass  # damaged cache: read again

    def one(i: int) -> np.ndarray:
        _, raw = dataset.read_raw(i)
        ids = np.unique(dataset.map_label(raw))
        row = np.zeros(NUM_CLASSES, dtype=bool)
        row[ids[ids < NUM_CLASSES]] = True
        return row

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(bar(pool.map(one, range(len(dataset))), total=len(dataset), disable=not progress,
                        desc=f"classes {dataset.name}", unit="label"))
    table = np.stack(rows) if rows else np.zeros((0, NUM_CLASSES), dtype=bool)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, table)
        os.replace(tmp, path)
    return table


def balanced_indices(presence: np.ndarray, n: int, seed: int) -> list[int]:
    """``n`` row indices of ``presence`` chosen greedily for class balance (see the module docstring),
    in ascending order; all rows when ``n`` is at least their number."""
    total = len(presence)
    if n >= total:
        return list(range(total))
    order = np.random.default_rng([seed, 7]).permutation(total)
    ranked = presence[order]  # rows in the seeded order
    free = np.ones(total, dtype=bool)
    seen = np.zeros(presence.shape[1], dtype=np.int64)
    chosen = []
    for _ in range(n):
        available = (ranked & free[:, None]).any(axis=0)
        if available.any():
            cls = int(np.argmin(np.where(available, seen, np.iinfo(np.int64).max)))
            pos = int(np.argmax(ranked[:, cls] & free))
        else:  # the remaining images hold no class at all
            pos = int(np.argmax(free))
        free[pos] = False
        seen += ranked[pos]
        chosen.append(int(order[pos]))
    return sorted(chosen)


class SubsetView:
    """The images ``indices`` of a reader, behaving like the reader (``pairs``, ``scan.groups``, ...)."""

    def __init__(self, dataset, indices: list[int], size: int):
        self.dataset = dataset
        self.indices = list(indices)
        self.subset = size
        self.pairs = [dataset.pairs[i] for i in self.indices]
        groups = dataset.scan.groups
        self.scan = SimpleNamespace(pairs=self.pairs, groups=[groups[i] for i in self.indices] if groups else [])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]

    def read_raw(self, i: int):
        return self.dataset.read_raw(self.indices[i])

    def __getattr__(self, name):  # name, split, label_lut, map_label, ... of the reader
        if name == "dataset" or name.startswith("__"):  # not yet set (unpickling in a loader worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"SubsetView({self.dataset!r}, n={len(self)})"


def class_balanced_subset(dataset, n: int, seed: int, cache: Path | None = None, progress: bool = True) -> SubsetView:
    """``n`` images of ``dataset`` (``n`` per group for readers with groups), class-balanced, seeded."""
    presence = class_presence(dataset, cache, progress=progress)
    groups = dataset.scan.groups or [""] * len(dataset)
    chosen: list[int] = []
    for group in dict.fromkeys(groups):
        members = np.array([i for i, g in enumerate(groups) if g == group])
        chosen += [int(members[j]) for j in balanced_indices(presence[members], n, seed)]
    return SubsetView(dataset, sorted(chosen), n)
