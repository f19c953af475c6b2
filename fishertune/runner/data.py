"""Where each data set of a manifest lives, and its readers (source train split, target val split).

Real data: ``data.roots[name]`` or ``data.root/name`` or ``$FISHERTUNE_DATA/name``. The miniature is
generated on first use into ``data.root`` or the cache (``$FISHERTUNE_CACHE``, default
``~/.cache/fishertune``), keyed by its seed and size, and reused afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

from fishertune.data import build_dataset, synthesize
from fishertune.errors import UserError
from fishertune.runner.manifest import Manifest

DATA_ENV = "FISHERTUNE_DATA"
CACHE_ENV = "FISHERTUNE_CACHE"
#: (training split, evaluation split) in each data set's own naming
SPLITS = {"gtav": ("train", None), "cityscapes": ("train", "val"), "bdd100k": ("train", "val"),
          "mapillary": ("training", "validation"), "acdc": ("train", "val")}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fishertune").expanduser()


def miniature_dir(m: Manifest) -> Path:
    """Where the miniature of ``m`` is generated in the cache (by generator version, seed and counts)."""
    from fishertune.data.synth import VERSION

    train = m.data.synth_train_images or 2 * m.data.synth_images
    looks = "" if m.data.synth_looks == "class" else f"-{m.data.synth_looks}"
    return cache_dir() / f"synth-v{VERSION}-seed{m.data.synth_seed}-n{m.data.synth_images}-t{train}{looks}"


def data_roots(m: Manifest, names: list[str], progress: bool = True) -> dict[str, Path]:
    """Directory of each named data set; the miniature is synthesized here when absent."""
    if m.data.kind == "miniature":
        base = Path(m.data.root).expanduser() if m.data.root else miniature_dir(m)
        roots = synthesize(base, seed=m.data.synth_seed, images=m.data.synth_images, progress=progress,
                           train_images=m.data.synth_train_images, looks=m.data.synth_looks)
        return {name: Path(roots[name]) for name in names}
    base = m.data.root or os.environ.get(DATA_ENV)
    out = {}
    for name in names:
        if name in m.data.roots:
            out[name] = Path(m.data.roots[name]).expanduser()
        elif base:
            out[name] = Path(base).expanduser() / name
        else:
            raise UserError(f"where is {name}? set {DATA_ENV} to the directory holding {name}/, or set data.root "
                            f"or data.roots.{name} in the manifest")
    return out


def generated(m: Manifest) -> bool:
    """Whether the data the manifest reads was written by ``fishertune data synth`` (the miniature, or a
    real-layout tree with the generator's SYNTH.json beside the data sets, e.g. in ``$FISHERTUNE_DATA``)."""
    if m.data.kind == "miniature":
        return True
    roots = data_roots(m, [m.source, *m.targets], progress=False)
    return any((root.parent / "SYNTH.json").is_file() for root in roots.values())


def open_datasets(m: Manifest, progress: bool = True):
    """The source training reader and one evaluation reader per target, after verifying each tree
    (pairs, counts, label values, sizes); with ``data.subset``, class-balanced subsets of them."""
    from fishertune.data.verify import preflight

    roots = data_roots(m, [m.source, *m.targets], progress)
    for name, root in roots.items():
        if not root.is_dir():
            raise UserError(f"{name} is expected at {root}, which is not a directory; unpack the official download "
                            f"there, or point {DATA_ENV} / data.root / data.roots.{name} at it")
    # the same check as `fishertune data verify`, before any training (remembered once passed)
    for name, split in [(m.source, SPLITS[m.source][0]), *((t, SPLITS[t][1]) for t in m.targets)]:
        preflight(name, roots[name], split, cache_dir(), progress, any_count=m.data.counts == "any")
    source = build_dataset(m.source, roots[m.source], SPLITS[m.source][0])
    targets = {t: build_dataset(t, roots[t], SPLITS[t][1]) for t in m.targets}
    if m.data.subset:
        from fishertune.data.subset import class_balanced_subset

        for dataset in (source, *targets.values()):
            _check_subset(dataset, m.data.subset)
        source = class_balanced_subset(source, m.data.subset, m.seed, cache_dir(), progress)
        targets = {t: class_balanced_subset(d, m.data.subset, m.seed, cache_dir(), progress) for t, d in targets.items()}
    return source, targets


def _check_subset(dataset, n: int) -> None:
    """A subset of ``n`` images must be one: a data set (an ACDC condition) with no more images is refused
    rather than used whole and labelled a subset."""
    groups = dataset.scan.groups or [""] * len(dataset)
    for group in dict.fromkeys(groups):
        size = groups.count(group)
        if n >= size:
            which = f"{dataset.name} {dataset.split}" + (f" {group}" if group else "")
            raise UserError(f"--subset {n} (data.subset) is not smaller than the {size} images of {which}; drop it "
                            f"to use every image, or choose fewer than {size}")
