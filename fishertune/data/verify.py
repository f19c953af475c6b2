"""Check a data set on disk before using it: pairing, counts, label values, sizes, readability.

``verify_dataset`` lists the data set with its reader (so it checks exactly what training and
evaluation will read), then reads every label in full and every image's header (JPEGs are decoded at
1/8 scale, PNGs have their chunks checked) on a few threads. Each kind of problem is reported once,
with its total and a few example paths.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fishertune.data.datasets import SegDataset, build_dataset, dataset_class
from fishertune.data.files import read_label
from fishertune.errors import UserError
from fishertune.progress import bar, enabled

#: Pairs in the official releases, per data set and split (ACDC per ``split/condition``).
OFFICIAL_COUNTS: dict[str, dict[str, int]] = {
    "gtav": {"train": 24966},
    "cityscapes": {"train": 2975, "val": 500},
    "bdd100k": {"train": 7000, "val": 1000},
    "mapillary": {"train": 18000, "val": 2000},
    "acdc": {"train/fog": 400, "val/fog": 100, "train/night": 400, "val/night": 106,
             "train/rain": 400, "val/rain": 100, "train/snow": 400, "val/snow": 100},
}

IMAGE_WITHOUT_LABEL = "images without label"
LABEL_WITHOUT_IMAGE = "labels without image"
NO_PAIRS = "splits without any image/label pair"
COUNT = "counts that differ from the expected"
UNREADABLE_IMAGE = "unreadable images"
UNREADABLE_LABEL = "unreadable labels"
ILLEGAL_VALUE = "labels with values outside the classes"
SIZE_MISMATCH = "labels whose size differs from their image"


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_dataset`: pairs per split (``counts``) and one line per problem kind."""

    name: str
    root: Path
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        """A short human-readable report."""
        lines = [f"{self.name} at {self.root}: {'OK' if self.ok else 'PROBLEMS'}"]
        lines += [f"  {key}: {n} pairs" for key, n in self.counts.items()]
        lines += [f"  ! {problem}" for problem in self.problems]
        return "\n".join(lines)


def verify_dataset(name: str, root: str | Path, split: str | None = None, expected: dict[str, int] | None = None,
                   max_examples: int = 3, progress: bool = True, workers: int | None = None) -> VerifyReport:
    """Verify data set ``name`` at ``root`` (one ``split`` or all of them).

    ``expected`` maps count keys (``"train"``, ``"val"``; ACDC ``"train/fog"``...) to pair counts,
    e.g. ``OFFICIAL_COUNTS[name]``; ``None`` skips the count check. Raises :class:`UserError` only
    when the data set cannot be listed at all (unknown name, missing root or Mapillary config).
    """
    splits = [split] if split is not None else list(dataset_class(name).splits)
    report = VerifyReport(name=name, root=Path(root))
    found: dict[str, list[str]] = {}
    pairs: list[tuple[SegDataset, Path, Path]] = []
    for s in splits:
        dataset = build_dataset(name, root, s, strict=False)
        scan = dataset.scan
        groups = Counter(scan.groups)
        for folder in dataset.folders():
            key = f"{dataset.split}/{folder.group}" if folder.group else dataset.split
            report.counts[key] = groups[folder.group]
        found.setdefault(IMAGE_WITHOUT_LABEL, []).extend(
            f"{image} (expected {label})" for image, label in scan.images_without_label)
        found.setdefault(LABEL_WITHOUT_IMAGE, []).extend(str(p) for p in scan.labels_without_image)
        if not scan.pairs:
            folders = ", ".join(str(f.images) for f in dataset.folders())
            found.setdefault(NO_PAIRS, []).append(f"{dataset.split} under {folders}")
        pairs += [(dataset, image, label) for image, label in scan.pairs]
    for key, n in (expected or {}).items():
        if key in report.counts and report.counts[key] != n:
            found.setdefault(COUNT, []).append(f"{key}: {report.counts[key]} found, {n} expected")
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda p: check_pair(*p), pairs)
        for issues in bar(results, disable=not (progress and enabled()), total=len(pairs), desc=f"verify {name}", unit="pair"):
            for kind, detail in issues:
                found.setdefault(kind, []).append(detail)
    report.problems = [f"{len(details)} {kind}, e.g. {'; '.join(details[:max_examples])}"
                       for kind, details in found.items() if details]
    return report


def check_pair(dataset: SegDataset, image_path: Path, label_path: Path) -> list[tuple[str, str]]:
    """The problems of one pair, as ``(kind, detail)``."""
    issues = []
    size = None
    try:
        with Image.open(image_path) as image:
            size = image.size
            if image.format == "JPEG":
                image.draft("RGB", (max(size[0] // 8, 1), max(size[1] // 8, 1)))
                image.load()
            else:
                image.verify()
    except Exception as e:  # noqa: BLE001 - any failure to read is the finding being reported
        issues.append((UNREADABLE_IMAGE, f"{image_path} ({e})"))
    try:
        raw = read_label(label_path)
    except (OSError, UserError, ValueError) as e:
        issues.append((UNREADABLE_LABEL, f"{label_path} ({e})"))
        return issues
    present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
    illegal = present[~dataset.legal_raw_values()[present]]
    if illegal.size:
        issues.append((ILLEGAL_VALUE, f"{label_path} (values {', '.join(map(str, illegal[:5]))})"))
    if size is not None and size != (raw.shape[1], raw.shape[0]):
        issues.append((SIZE_MISMATCH, f"{label_path} ({raw.shape[1]}x{raw.shape[0]}, image {size[0]}x{size[1]})"))
    return issues
