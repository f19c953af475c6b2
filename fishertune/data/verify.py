"""Check a data set on disk before using it: pairing, counts, label values, sizes, readability.

``verify_dataset`` lists the data set with its reader (so it checks exactly what training and
evaluation will read), then reads every label in full and every image's header (JPEGs are decoded at
1/8 scale, PNGs have their chunks checked) on a few threads. Each kind of problem is reported once,
with its total and a few example paths.
"""

from __future__ import annotations

import hashlib
import json
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

MISSING_FOLDER = "missing folders"
#: bump when the checks change, so that trees verified by an older version are checked again
VERIFY_VERSION = 2  # 2: prepared copies are read only while their record holds; raw orphans are seen

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
        report.counts.update(pair_counts(dataset))
        for kind, detail in listing_issues(dataset):
            found.setdefault(kind, []).append(detail)
        pairs += [(dataset, image, label) for image, label in dataset.scan.pairs]
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


def pair_counts(dataset: SegDataset) -> dict[str, int]:
    """Pairs per count key (``split``, or ``split/group`` for ACDC) of one reader's listing."""
    groups = Counter(dataset.scan.groups)
    return {f"{dataset.split}/{f.group}" if f.group else dataset.split: groups[f.group] for f in dataset.folders()}


def listing_issues(dataset: SegDataset) -> list[tuple[str, str]]:
    """The problems of one reader's listing, as ``(kind, detail)``: missing folders, files without
    their partner, no pairs at all."""
    scan = dataset.scan
    issues = [(MISSING_FOLDER, str(path)) for f in dataset.folders() for path in dict.fromkeys((f.images, f.labels))
              if not path.is_dir()]
    issues += [(IMAGE_WITHOUT_LABEL, f"{image} (expected {label})") for image, label in scan.images_without_label]
    issues += [(LABEL_WITHOUT_IMAGE, str(p)) for p in scan.labels_without_image]
    if not scan.pairs:
        issues.append((NO_PAIRS, f"{dataset.split} under {', '.join(str(f.images) for f in dataset.folders())}"))
    return issues


def check_pair(dataset: SegDataset, image_path: Path, label_path: Path) -> list[tuple[str, str]]:
    """The problems of one pair, as ``(kind, detail)``."""
    size, issues = check_image(image_path)
    raw, label_issues = check_label(dataset.legal_raw_values(), label_path)
    issues += label_issues
    if raw is not None:
        issues += check_sizes(label_path, size, (raw.shape[1], raw.shape[0]))
    return issues


def check_image(path: Path) -> tuple[tuple[int, int] | None, list[tuple[str, str]]]:
    """The ``(width, height)`` of an image (``None`` if unreadable) and its problems. JPEGs are
    decoded at 1/8 scale, PNGs have their chunks checked."""
    try:
        with Image.open(path) as image:
            size = image.size
            if image.format == "JPEG":
                image.draft("RGB", (max(size[0] // 8, 1), max(size[1] // 8, 1)))
                image.load()
            else:
                image.verify()
        return size, []
    except Exception as e:  # noqa: BLE001 - any failure to read is the finding being reported
        return None, [(UNREADABLE_IMAGE, f"{path} ({e})")]


def check_label(legal: np.ndarray, path: Path) -> tuple[np.ndarray | None, list[tuple[str, str]]]:
    """The raw label map (``None`` if unreadable) and its problems: unreadable, or values outside ``legal``
    (256 booleans: those the reader gives a meaning, :meth:`SegDataset.legal_raw_values`)."""
    try:
        raw = read_label(path)
    except (OSError, UserError, ValueError) as e:
        return None, [(UNREADABLE_LABEL, f"{path} ({e})")]
    present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
    illegal = present[~legal[present]]
    if illegal.size:
        return raw, [(ILLEGAL_VALUE, f"{path} (values {', '.join(map(str, illegal[:5]))})")]
    return raw, []


def check_sizes(label_path: Path, image_size: tuple[int, int] | None,
                label_size: tuple[int, int] | None) -> list[tuple[str, str]]:
    """A :data:`SIZE_MISMATCH` finding if both sizes are known and differ."""
    if image_size is None or label_size is None or image_size == label_size:
        return []
    return [(SIZE_MISMATCH, f"{label_path} ({label_size[0]}x{label_size[1]}, image {image_size[0]}x{image_size[1]})")]


def expected_counts(name: str, root: Path) -> dict[str, int]:
    """The counts a tree should have: recorded by the generator for the miniature, else official."""
    marker = Path(root).parent / "SYNTH.json"
    if marker.is_file():
        try:
            return json.loads(marker.read_text())["counts"].get(name, {})
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise UserError(f"{marker} is damaged; regenerate the miniature with `fishertune data synth` "
                            "or pass --any-count") from None
    return OFFICIAL_COUNTS.get(name, {})


def _listing_signature(name: str, root: Path, split: str, expected: dict[str, int] | None) -> str:
    """Hash of what a check depends on: every file of the split's listing with its size and time."""
    dataset = build_dataset(name, root, split, strict=False)
    h = hashlib.sha256(f"{name}|{Path(root).resolve()}|{split}|{VERIFY_VERSION}".encode())
    for image, label in dataset.scan.pairs:
        for path in (image, label):
            st = os.stat(path)
            h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    for image, _ in dataset.scan.images_without_label:
        h.update(f"{image}|no label\n".encode())
    h.update(json.dumps(expected, sort_keys=True).encode())
    return h.hexdigest()[:24]


def preflight(name: str, root: str | Path, split: str, cache: Path | None, progress: bool = True,
              any_count: bool = False) -> None:
    """The check every run makes before training: :func:`verify_dataset` on the split it reads, with the
    expected counts (none with ``any_count``); a :class:`UserError` (one line: the problems, the command for
    the full report) when the tree is not usable. A passed check is remembered under ``cache`` for this
    exact listing (files, sizes, modification times) and expectation, so a sweep verifies each tree once."""
    root = Path(root)
    expected = None if any_count else expected_counts(name, root)
    marker = None
    if cache is not None:
        marker = Path(cache) / "verified" / f"{name}-{split}-{_listing_signature(name, root, split, expected)}"
        if marker.is_file():
            return
    report = verify_dataset(name, root, split=split, expected=expected, progress=progress)
    if not report.ok:
        counts = "" if any_count or not any(COUNT in p for p in report.problems) else \
            " (a tree with other counts on purpose: --any-count, or data.counts: any in the manifest)"
        raise UserError(f"{name} at {root} is not usable: {' | '.join(report.problems)}; see "
                        f"`fishertune data verify {name} --root {root} --split {split}`{counts}")
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(report.counts) + "\n")
        os.replace(tmp, marker)
