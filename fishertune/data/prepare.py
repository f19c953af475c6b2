"""``fishertune data prepare``: convert a data set in place as Rein's tools do, resumably.

What each data set gets (DESIGN section 4; Rein's ``tools/convert_datasets/`` and its README):

- ``gtav``: ``labels/<n>_labelTrainIds.png`` (train ids) beside each ``labels/<n>.png`` (Cityscapes
  label ids), as ``gta.py``. The table is :data:`~fishertune.data.labels.CITYSCAPES_ID_TO_TRAIN_ID`,
  applied by the reader's :meth:`~fishertune.data.datasets.SegDataset.map_label`.
- ``cityscapes``: ``gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png`` from the
  ``*_gtFine_polygons.json`` beside them, drawn by cityscapesscripts (``json2labelImg``'s
  ``createLabelImage(annotation, "trainIds")``; the optional extra ``cityscapes``),
  as ``cityscapes.py`` (which also converts the test split's placeholder polygons; we convert the
  two splits that are read). A tree without polygon files (the miniature) is only checked.
- ``mapillary``: ``cityscapes_trainIdLabel/{train,val}/label/<key>.png``, the 66 v1.2 ids mapped to
  the 19 train ids by name (:func:`~fishertune.data.labels.mapillary_to_train_id`), as
  ``mapillary2cityscape.py --train_id``; and the halved validation set ``half/val_img/<key>.jpg``
  (bicubic; JPEG at quality 75, Pillow's default that Rein's plain ``save`` uses) and
  ``half/val_label/<key>.png`` (nearest), as ``mapillary_resize.py``. The folder names are those
  of Rein's README; copies made by Rein's tools have no record of their sources, so ``prepare``
  makes them again before the readers use them.
- ``bdd100k``, ``acdc``: nothing to convert; every pair is checked as ``fishertune data verify``
  checks it (pair counts are left to ``verify``).

What each GTAV and Mapillary copy was made from is recorded in ``<root>/.fishertune-prepared.json``
(:data:`~fishertune.data.datasets.PREPARED_RECORD`: size and modification time of the copy and of each
of its sources: the label, the image, Mapillary's config); the readers use the copies only while the
record holds (a source changed since, e.g. a label fixed by hand, makes them stale until ``prepare``
runs again). Finished copies are skipped: a copy is *finished* when the record holds for it and it
reads whole at the size it must have (the source's, or half of it), a label in full with train ids
only, as ``verify`` reads it, an image as ``verify`` does (PNG chunks checked, JPEG decoded at 1/8
scale). Anything else (no record: copies made by Rein's tools or an older version, or changed since)
is converted again. Cityscapes' labels, made from polygon files, are finished when they read whole and
are not older than their polygon file. Every output is written to ``.<name>.<pid>.tmp``
in its folder, flushed to disk and renamed into place, so a killed run leaves whole files or none;
temporary files of runs that are no longer alive are removed when the next run starts.

Checks: every split's listing (missing folders, images without label, labels without image). Each
pair that is converted is checked as ``verify`` checks it first (readable image and label, label
values the data set defines, e.g. Mapillary ids inside its 66); a pair with a problem gets no
output, so a rerun reports it again until it is fixed (and a copy it had is not recorded, so the
readers use the release's files, where ``verify`` finds the problem). A label whose size differs from
its image is *noted* and converted as it is (Rein converts it too, and its fixed-size training
``Resize`` then stretches image and label to the same size without a word); prepare does not alter
data.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image

from fishertune.data.datasets import (GTAV, PREPARED_RECORD, PREPARED_RECORD_VERSION, TRAIN_ID_VALUES, Cityscapes,
                                      Mapillary, SegDataset, build_dataset, dataset_class, half_size, halve_image,
                                      halve_label, read_prepared_record, record_entry)
from fishertune.data.files import read_image
from fishertune.data.verify import (SIZE_MISMATCH, UNREADABLE_IMAGE, UNREADABLE_LABEL, check_image, check_label,
                                    check_pair, check_sizes, listing_issues, pair_counts)
from fishertune.errors import UserError
from fishertune.progress import bar, enabled

UNREADABLE_POLYGONS = "unreadable polygon files"
ORPHANS = "prepared copies without a source (the readers ignore the prepared copies until they are deleted)"
STALE_TEMP = "temporary files of killed runs removed"
#: Kinds that are reported but do not make the tree unusable.
NOTE_KINDS = (SIZE_MISMATCH, ORPHANS, STALE_TEMP)

TRAIN_ID_LABELS = "train-id labels"
HALVED_IMAGES = "halved validation images"
HALVED_LABELS = "halved validation labels"
JPEG_QUALITY = 75  # Pillow's default, which Rein's mapillary_resize.py gets from a plain save()
CITYSCAPES_EXTRA = "pip install -e '.[cityscapes]' (in the clone) or pip install cityscapesscripts"

Issue = tuple[str, str]


@dataclass
class Outcome:
    """What one job did: output kinds written and already finished, and its findings; ``recorded``: the
    record entry of each copy now finished (by path under the root)."""

    written: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    recorded: dict[str, dict] = field(default_factory=dict)


@dataclass
class PrepareReport:
    """Outcome of :func:`prepare_dataset`: files written and skipped per output kind, pairs per
    split, problems (the tree is not usable as it is) and notes, one line per kind."""

    name: str
    root: Path
    written: Counter = field(default_factory=Counter)
    finished: Counter = field(default_factory=Counter)
    counts: dict[str, int] = field(default_factory=dict)
    reads_prepared: dict[str, bool] = field(default_factory=dict)  # split -> readers use the prepared copies
    converts: bool = True  # False: the data set (or tree) has nothing to convert and was only checked
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    found: dict[str, list[str]] = field(default_factory=dict, repr=False)
    recorded: dict[str, dict] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, outcome: Outcome) -> None:
        self.written.update(outcome.written)
        self.finished.update(outcome.finished)
        self.recorded.update(outcome.recorded)
        for kind, detail in outcome.issues:
            self.found.setdefault(kind, []).append(detail)

    def finish(self, max_examples: int = 3) -> PrepareReport:
        """Turn the findings into one line per kind."""
        for kind, details in self.found.items():
            line = f"{len(details)} {kind}, e.g. {'; '.join(details[:max_examples])}"
            (self.notes if kind in NOTE_KINDS else self.problems).append(line)
        return self

    def format(self) -> str:
        """A short human-readable report."""
        lines = [f"{self.name} at {self.root}: {'OK' if self.ok else 'PROBLEMS'}"]
        lines += [f"  {key}: {n} pairs" for key, n in self.counts.items()]
        kinds = list(dict.fromkeys([*self.written, *self.finished]))
        lines += [f"  {kind}: {self.written[kind]} written, {self.finished[kind]} already done" for kind in kinds]
        if not self.converts:
            lines.append("  nothing to convert; every pair checked")
        lines += [f"  {split}: readers use the prepared copies" if used else
                  f"  {split}: readers use the original files (prepared copies incomplete)"
                  for split, used in self.reads_prepared.items()]
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  ! {problem}" for problem in self.problems]
        return "\n".join(lines)


def prepare_dataset(name: str, root: str | Path, workers: int | None = None, progress: bool = True) -> PrepareReport:
    """Prepare data set ``name`` at ``root`` in place (see the module docstring) and report.

    Raises :class:`UserError` only when the data set cannot be listed at all (unknown name, missing
    root or Mapillary config), an output cannot be written, or Cityscapes polygons need converting
    without cityscapesscripts installed.
    """
    dataset_class(name)  # an unknown name is a UserError with a suggestion
    steps: dict[str, Callable[..., PrepareReport]] = {
        "gtav": prepare_gtav, "cityscapes": prepare_cityscapes, "mapillary": prepare_mapillary}
    prepare = steps.get(name, functools.partial(check_only, name))
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    return prepare(Path(root), workers, progress and enabled()).finish()


def prepare_gtav(root: Path, workers: int, progress: bool) -> PrepareReport:
    """GTAV: a train-id copy beside every raw label (Rein's ``gta.py``)."""
    report = PrepareReport("gtav", root)
    dataset = GTAV(root, prepared=False, strict=False)
    _list(dataset, report)
    _remove_stale(report, [dataset.root / "labels"])
    record = read_prepared_record(dataset.root)
    jobs = [functools.partial(_gtav_pair, dataset, image, label, record) for image, label in dataset.pairs]
    _run(jobs, "prepare gtav", workers, progress, report)
    _write_record(dataset.root, report)
    _after(report, [dataset])
    return report


def _gtav_pair(dataset: GTAV, image: Path, label: Path, record: dict[str, dict]) -> Outcome:
    out = Outcome()
    image_size, label_size = _header(image, UNREADABLE_IMAGE, out), _header(label, UNREADABLE_LABEL, out)
    if image_size is None or label_size is None:
        return out
    out.issues += check_sizes(label, image_size, label_size)
    target = dataset.train_id_path(label)
    if _fresh(dataset.root, target, label_size, [label], record, out):
        out.finished.append(TRAIN_ID_LABELS)
        return out
    _, problems = check_image(image)
    raw, label_problems = check_label(dataset.legal_raw_values(), label)
    if problems or label_problems:
        out.issues += problems + label_problems
        return out
    write_atomic(target, Image.fromarray(dataset.map_label(raw), "L"), "PNG")
    out.recorded[_rel(dataset.root, target)] = record_entry(dataset.root, target, [label])
    out.written.append(TRAIN_ID_LABELS)
    return out


def prepare_mapillary(root: Path, workers: int, progress: bool) -> PrepareReport:
    """Mapillary: 19-class train-id copies of the labels (Rein's ``mapillary2cityscape.py``) and the
    halved validation images and labels (``mapillary_resize.py``)."""
    report = PrepareReport("mapillary", root)
    record = read_prepared_record(root)
    views = []
    for split in Mapillary.splits:
        dataset = Mapillary(root, split, halve=False, prepared=False, strict=False)
        _list(dataset, report)
        config = dataset.root / dataset.config_name
        outputs = [root / Mapillary.train_id_dir.format(split=split)]
        if split == "val":
            outputs += [root / Mapillary.half_images, root / Mapillary.half_labels]
        _remove_stale(report, outputs)
        jobs = [functools.partial(_mapillary_pair, dataset, image, label, config, record)
                for image, label in dataset.pairs]
        _run(jobs, f"prepare mapillary {split}", workers, progress, report)
        views.append([dataset] + ([Mapillary(root, split, halve=True, prepared=False, strict=False)]
                                  if split == "val" else []))
    _write_record(root, report)
    for split_views in views:
        _after(report, split_views)
    return report


def _mapillary_pair(dataset: Mapillary, image: Path, label: Path, config: Path, record: dict[str, dict]) -> Outcome:
    out = Outcome()
    image_size, label_size = _header(image, UNREADABLE_IMAGE, out), _header(label, UNREADABLE_LABEL, out)
    if image_size is None or label_size is None:
        return out
    out.issues += check_sizes(label, image_size, label_size)
    key = label.name[: -len(dataset.label_suffix)]
    root = dataset.root
    targets = [(root / dataset.train_id_dir.format(split=dataset.split) / label.name, label_size, TRAIN_ID_LABELS)]
    if dataset.split == "val":
        targets += [(root / dataset.half_images / (key + dataset.image_suffix), half_size(image_size), HALVED_IMAGES),
                    (root / dataset.half_labels / label.name, half_size(label_size), HALVED_LABELS)]
    sources = {TRAIN_ID_LABELS: [label, config], HALVED_IMAGES: [image], HALVED_LABELS: [label, config]}
    todo = [t for t in targets if not _fresh(root, t[0], t[1], sources[t[2]], record, out, t[2] != HALVED_IMAGES)]
    out.finished += [kind for _, _, kind in targets if all(kind != k for _, _, k in todo)]
    if not todo:
        return out
    pixels = None
    if any(kind == HALVED_IMAGES for _, _, kind in todo):
        try:
            pixels = read_image(image)
            problems = []
        except Exception as e:  # noqa: BLE001 - any failure to read is the finding being reported
            problems = [(UNREADABLE_IMAGE, f"{image} ({e})")]
    else:
        _, problems = check_image(image)
    raw, label_problems = check_label(dataset.legal_raw_values(), label)
    if problems or label_problems:
        out.issues += problems + label_problems
        return out
    for path, _, kind in todo:
        if kind == TRAIN_ID_LABELS:
            write_atomic(path, Image.fromarray(dataset.map_label(raw), "L"), "PNG")
        elif kind == HALVED_LABELS:
            write_atomic(path, Image.fromarray(dataset.map_label(halve_label(raw)), "L"), "PNG")
        else:
            write_atomic(path, Image.fromarray(halve_image(pixels)), "JPEG", quality=JPEG_QUALITY)
        out.recorded[_rel(root, path)] = record_entry(root, path, sources[kind])
        out.written.append(kind)
    return out


def prepare_cityscapes(root: Path, workers: int, progress: bool) -> PrepareReport:
    """Cityscapes: ``*_gtFine_labelTrainIds.png`` from the polygon files (Rein's ``cityscapes.py``),
    then the listing checks; a tree without polygon files is checked in full instead."""
    report = PrepareReport("cityscapes", root)
    datasets = [Cityscapes(root, split, prepared=False, strict=False) for split in Cityscapes.splits]
    polygons = sorted(p for d in datasets for p in d.raw_folders()[0].labels.glob("*/*_gtFine_polygons.json"))
    if not polygons:
        check_only("cityscapes", root, workers, progress, report)
        return report
    _remove_stale(report, sorted({p.parent for p in polygons}))
    if not all(_finished(_cityscapes_target(p), None, [p]) for p in polygons):
        _cityscapes_converter()  # fail at once, before any work, when the extra is not installed
    jobs = [functools.partial(_cityscapes_file, p) for p in polygons]
    with contextlib.redirect_stdout(io.StringIO()):  # cityscapesscripts prints its errors
        _run(jobs, "prepare cityscapes", workers, progress, report)
    for split in Cityscapes.splits:  # list again: the labels may be new
        _list(Cityscapes(root, split, strict=False), report)
    return report


def _cityscapes_target(polygons: Path) -> Path:
    return polygons.with_name(polygons.name[: -len("_polygons.json")] + "_labelTrainIds.png")


def _cityscapes_file(polygons: Path) -> Outcome:
    out = Outcome()
    try:
        text = polygons.read_text()
        data = json.loads(text)
        size = (int(data["imgWidth"]), int(data["imgHeight"]))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        out.issues.append((UNREADABLE_POLYGONS, f"{polygons} ({type(e).__name__}: {e})"))
        return out
    target = _cityscapes_target(polygons)
    if _finished(target, size, [polygons]):
        out.finished.append(TRAIN_ID_LABELS)
        return out
    annotation_class, create_label_image = _cityscapes_converter()
    try:
        annotation = annotation_class()
        annotation.fromJsonText(text)
        image = create_label_image(annotation, "trainIds")
    except (Exception, SystemExit) as e:  # noqa: BLE001 - cityscapesscripts exits on an unknown label
        what = "a label cityscapesscripts does not know" if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
        out.issues.append((UNREADABLE_POLYGONS, f"{polygons} ({what})"))
        return out
    write_atomic(target, image, "PNG")
    out.written.append(TRAIN_ID_LABELS)
    return out


@functools.lru_cache(maxsize=1)
def _cityscapes_converter():
    """cityscapesscripts' ``Annotation`` and ``createLabelImage`` (the body of ``json2labelImg``,
    which we call in two halves to write the result atomically)."""
    try:
        from cityscapesscripts.helpers.annotation import Annotation
        from cityscapesscripts.preparation.json2labelImg import createLabelImage
    except ImportError:
        raise UserError("converting the Cityscapes polygons to *_gtFine_labelTrainIds.png needs cityscapesscripts; "
                        f"run {CITYSCAPES_EXTRA}") from None
    return Annotation, createLabelImage


def check_only(name: str, root: Path, workers: int, progress: bool,
               report: PrepareReport | None = None) -> PrepareReport:
    """A data set with nothing to convert: its listing and every pair checked as ``verify`` does."""
    report = report or PrepareReport(name, root)
    report.converts = False
    for split in dataset_class(name).splits:
        dataset = build_dataset(name, root, split, strict=False)
        _list(dataset, report)
        jobs = [functools.partial(_check_pair, dataset, image, label) for image, label in dataset.pairs]
        _run(jobs, f"check {name} {split}", workers, progress, report)
    return report


def _check_pair(dataset: SegDataset, image: Path, label: Path) -> Outcome:
    return Outcome(issues=check_pair(dataset, image, label))


def _list(dataset: SegDataset, report: PrepareReport) -> None:
    report.counts.update(pair_counts(dataset))
    report.add(Outcome(issues=listing_issues(dataset)))


def _after(report: PrepareReport, views: list[SegDataset]) -> None:
    """Note prepared copies without a source (in each of the readers' ``prepared=False`` ``views``
    of one split), and record whether the readers (default options) now read the prepared copies."""
    for raw in views:
        ready = raw.list_pairs(raw.prepared_folders())
        keys = set(raw.scan.keys)
        orphans = [label for key, (_, label) in zip(ready.keys, ready.pairs) if key not in keys]
        report.add(Outcome(issues=[(ORPHANS, str(p)) for p in orphans + ready.labels_without_image]))
    raw = views[0]
    report.reads_prepared[raw.split] = build_dataset(raw.name, raw.root, raw.split, strict=False).prepared


def _run(jobs: list[Callable[[], Outcome]], desc: str, workers: int, progress: bool, report: PrepareReport) -> None:
    """Run ``jobs`` on ``workers`` threads (Pillow releases the GIL while decoding and encoding)."""
    if not jobs:
        return
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for outcome in bar(pool.map(lambda job: job(), jobs), total=len(jobs), desc=desc, unit="file",
                           disable=not progress):
            report.add(outcome)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # running jobs finish their file; queued ones are dropped
        raise
    pool.shutdown()


def _header(path: Path, kind: str, out: Outcome) -> tuple[int, int] | None:
    """``(width, height)`` from the file's header, or ``None`` with a finding of ``kind``."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as e:  # noqa: BLE001 - any failure to read is the finding being reported
        out.issues.append((kind, f"{path} ({e})"))
        return None


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _fresh(root: Path, target: Path, size: tuple[int, int], sources: list[Path], record: dict[str, dict],
           out: Outcome, label: bool = True) -> bool:
    """Whether the copy ``target`` is finished (see the module docstring): ``record`` holds for it and its
    ``sources``, and it reads whole at ``size``, as a train-id label when ``label`` (read in full, as
    ``verify`` reads it). A finished copy's record entry goes into ``out``."""
    entry = record.get(_rel(root, target))
    if entry != record_entry(root, target, sources):
        return False
    if label:
        found, problems = check_label(TRAIN_ID_VALUES, target)
        found = None if found is None else (found.shape[1], found.shape[0])
    else:
        found, problems = check_image(target)
    if problems or found != size:
        return False
    out.recorded[_rel(root, target)] = entry
    return True


def _write_record(root: Path, report: PrepareReport) -> None:
    """Write the record of the copies finished so far (:data:`PREPARED_RECORD`), atomically, unless it holds
    exactly that already; a copy that is not finished (a problem with its pair) has no entry."""
    if read_prepared_record(root) == report.recorded:
        return
    text = json.dumps({"version": PREPARED_RECORD_VERSION, "copies": report.recorded}, indent=0, sort_keys=True)
    path = root / PREPARED_RECORD
    tmp = _temp_path(path)
    try:
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); free some space or make the folder "
                        "writable") from None
    finally:
        tmp.unlink(missing_ok=True)


def _finished(target: Path, size: tuple[int, int] | None, sources: Iterable[Path]) -> bool:
    """Whether ``target`` exists and is not older than any source; with ``size``, also whether it
    reads whole (PNG chunks checked, JPEG decoded at 1/8 scale) at that size."""
    try:
        mtime = target.stat().st_mtime_ns
        if any(mtime < source.stat().st_mtime_ns for source in sources):
            return False
    except OSError:
        return False
    if size is None:
        return True
    found, problems = check_image(target)
    return not problems and found == size


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: Path, image: Image.Image, format: str, **options) -> None:
    """Save ``image`` to ``path`` through a temporary file in the same folder, flushed to disk and
    renamed into place: ``path`` is always absent, old or complete."""
    tmp = _temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            image.save(f, format=format, **options)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); free some space or make the folder "
                        "writable") from None
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale(report: PrepareReport, folders: Iterable[Path]) -> None:
    """Remove the temporary files that killed runs left in ``folders``."""
    from fishertune.data.synth import _alive

    for folder in folders:
        if not folder.is_dir():
            continue
        for tmp in folder.glob(".*.tmp"):
            pid = tmp.name.rsplit(".", 2)[-2]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)
                report.add(Outcome(issues=[(STALE_TEMP, str(tmp))]))


