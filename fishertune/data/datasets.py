"""Readers for the five data sets in their real on-disk layouts (DESIGN section 4).

Each reader lists ``(image, label)`` pairs by matching file names within one or more folder pairs,
and maps its raw labels to the 19 train ids in exactly one place: its :attr:`SegDataset.label_lut`
(GTAV: Cityscapes label ids; Mapillary: the table built from its ``config_v1.2.json``; the others
already hold train ids). The same readers run on the real data and on the miniature written by
:func:`fishertune.data.synth.synthesize`.

GTAV and Mapillary also have *prepared* copies written by ``fishertune data prepare``
(:mod:`fishertune.data.prepare`, Rein's file names): train-id labels and, for Mapillary validation,
halved images and labels. ``prepare`` records what each copy was made from in
``<root>/.fishertune-prepared.json`` (:data:`PREPARED_RECORD`: the size and modification time of the
copy and of each of its sources). A reader uses the copies (no table, no halving at read time) when
they cover exactly the pairs of the release's own files and each is as recorded, so a source changed
after ``prepare`` (a label fixed, or broken) makes the copies stale; and the release's files
otherwise (:meth:`SegDataset.choose_view`, the one place that decides).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from fishertune.data.files import read_image, read_label
from fishertune.data.labels import CITYSCAPES_ID_TO_TRAIN_ID, IGNORE_INDEX, NUM_CLASSES, mapillary_to_train_id
from fishertune.errors import UserError
from fishertune.registry import Registry

#: beside a data set's files, written by ``fishertune data prepare``: what each prepared copy was made from
PREPARED_RECORD = ".fishertune-prepared.json"
PREPARED_RECORD_VERSION = 1
#: which of the 256 values a train-id label may hold: the train ids and 255 (ignore)
TRAIN_ID_VALUES = np.zeros(256, dtype=bool)
TRAIN_ID_VALUES[:NUM_CLASSES] = True
TRAIN_ID_VALUES[IGNORE_INDEX] = True

#: Accepted spellings of the two splits, mapped to their canonical names.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "validation": "val"}
SYNTH_HINT = "or run `fishertune data synth --out DIR` for the miniature"


@dataclass(frozen=True)
class Folder:
    """One image folder and its label folder; ``group`` names it in counts (ACDC: the condition)."""

    images: Path
    labels: Path
    group: str = ""
    label_suffix: str = ""  # overrides the reader's label_suffix for this folder
    label_exclude: str = ""  # label files ending so are not labels here (GTAV: the prepared train-id copies)


@dataclass
class Scan:
    """What a listing of a data set's folders found: matched pairs and files without a partner."""

    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    images_without_label: list[tuple[Path, Path]] = field(default_factory=list)  # (image, expected label)
    labels_without_image: list[Path] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # the Folder.group of each pair
    keys: list[str] = field(default_factory=list)  # group and file name without suffix, of each pair


def canonical_split(split: str) -> str:
    """``"train"`` or ``"val"`` for any accepted alias; a :class:`UserError` otherwise."""
    try:
        return SPLIT_ALIASES[split]
    except KeyError:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLIT_ALIASES)}") from None


class SegDataset(Dataset):
    """A segmentation data set: ``dataset[i]`` is ``dict(image, label, path)``.

    ``image`` is ``H x W x 3`` uint8 RGB, ``label`` is ``H x W`` uint8 train ids (255 = ignore),
    ``path`` the image file. Subclasses say where the files are (:meth:`raw_folders`, and
    :meth:`prepared_folders` where ``fishertune data prepare`` writes copies) and how their file
    names end; the pairs are matched on the file name without that ending, relative to the folder.
    With ``strict`` (the default) an image without its label is a :class:`UserError`; ``verify``
    reads with ``strict=False`` to report such files instead. ``prepared``: ``None`` (default) reads
    the prepared copies when complete (:meth:`choose_view`), ``False`` the release's own files,
    ``True`` the prepared copies or a :class:`UserError`.
    """

    name: ClassVar[str]
    splits: ClassVar[tuple[str, ...]] = ("train", "val")
    image_suffix: ClassVar[str]
    label_suffix: ClassVar[str]
    depth: ClassVar[int] = 0  # sub-folder levels between a folder and its files (Cityscapes: city)
    layout: ClassVar[str]  # what --root must contain, for error messages
    defined_raw_values = 256  # raw label values 0..n-1 have a meaning (Mapillary: its config's labels)

    def __init__(self, root: str | Path, split: str, *, strict: bool = True, prepared: bool | None = None) -> None:
        self.root = Path(root)
        self.split = canonical_split(split)
        if self.split not in self.splits:
            raise UserError(f"{self.name} has no {split!r} split; it has {', '.join(self.splits)}")
        if not self.root.is_dir():
            raise UserError(f"{self.name} root {self.root} is not a directory; point --root at {self.layout} "
                            f"({SYNTH_HINT})")
        self.prepared, self.scan = self.choose_view(prepared)
        self.label_lut = None if self.prepared else self.load_label_lut()
        self.pairs = self.scan.pairs
        if strict:
            self._check(self.scan)

    def raw_folders(self) -> list[Folder]:
        """The image/label folder pairs of this split in the release's own layout."""
        raise NotImplementedError

    def prepared_folders(self) -> list[Folder] | None:
        """The folders of this split's prepared copies (train-id labels), or ``None`` where the data
        set has nothing to prepare."""
        return None

    def folders(self) -> list[Folder]:
        """The image/label folder pairs this reader reads: prepared or the release's own."""
        return (self.prepared_folders() if self.prepared else None) or self.raw_folders()

    def choose_view(self, prepared: bool | None) -> tuple[bool, Scan]:
        """Whether to read the prepared copies, and the listing of what will be read.

        The prepared copies are read when they pair with exactly the images that the release's own
        files pair, so a half-finished or stale ``prepare`` falls back to the release's files (same
        labels, mapped and halved when read; only Mapillary's halved validation images differ, the
        prepared ones being JPEGs re-encoded at quality 75 as Rein's).
        """
        folders = self.prepared_folders() if prepared is not False else None
        raw = self.list_pairs(self.raw_folders())
        if folders is None:
            if prepared:
                raise UserError(f"{self.name} has no prepared copies to read")
            return False, raw
        ready = self.list_pairs(folders)
        # the release's own files unpaired: read them, so that the strict check and verify see it
        whole = not raw.images_without_label and not raw.labels_without_image
        complete = (bool(ready.pairs) and ready.keys == raw.keys and not ready.images_without_label and whole
                    and self.prepared_current(raw, ready))
        if prepared and not complete:
            raise UserError(f"the prepared {self.name} {self.split} copies under {self.root} are missing, "
                            f"incomplete or older than their sources; run `fishertune data prepare {self.name} "
                            f"--root {self.root}`")
        return (True, ready) if complete else (False, raw)

    def prepared_current(self, raw: Scan, ready: Scan) -> bool:
        """Whether every prepared copy in ``ready`` (files that are not the release's own) is exactly as
        ``prepare`` recorded it, made from sources that are as they were then (:data:`PREPARED_RECORD`)."""
        record = read_prepared_record(self.root)
        own = {path for pair in raw.pairs for path in pair}
        copies = [path for pair in ready.pairs for path in pair if path not in own]
        return all(record_current(self.root, path, record) for path in copies)

    def load_label_lut(self) -> np.ndarray | None:
        """256-entry table raw label value -> train id, or ``None`` where labels are train ids."""
        return None

    def legal_raw_values(self) -> np.ndarray:
        """Which of the 256 raw label values may occur: the train ids and 255 where labels hold
        train ids, else every value the label table defines (all of them for GTAV)."""
        if self.label_lut is None:
            return TRAIN_ID_VALUES
        legal = np.zeros(256, dtype=bool)
        legal[: self.defined_raw_values] = True
        return legal

    def list_pairs(self, folders: list[Folder] | None = None) -> Scan:
        """Match image and label files by name within each folder (default: :meth:`folders`);
        sorted, deterministic."""
        scan = Scan()
        pattern = "*/" * self.depth + "*"
        for folder in self.folders() if folders is None else folders:
            label_suffix = folder.label_suffix or self.label_suffix
            images = _by_key(folder.images, pattern + self.image_suffix, self.image_suffix)
            labels = _by_key(folder.labels, pattern + label_suffix, label_suffix)
            if folder.label_exclude:
                labels = {k: p for k, p in labels.items() if not p.name.endswith(folder.label_exclude)}
            for key in sorted(images):
                if key in labels:
                    scan.pairs.append((images[key], labels[key]))
                    scan.groups.append(folder.group)
                    scan.keys.append(f"{folder.group}/{key}")
                else:
                    scan.images_without_label.append((images[key], folder.labels / (key + label_suffix)))
            scan.labels_without_image += [labels[key] for key in sorted(labels.keys() - images.keys())]
        return scan

    def _check(self, scan: Scan) -> None:
        """Raise a :class:`UserError` for images without labels, or for no pairs at all."""
        if scan.images_without_label:
            image, label = scan.images_without_label[0]
            what = f"{len(scan.images_without_label)} {self.name} {self.split} images have no label, " \
                   f"e.g. {image} (expected {label})"
            if not scan.pairs:
                raise UserError(f"{what}; point --root at {self.layout}")
            raise UserError(f"{what}; restore the labels or run "
                            f"`fishertune data verify {self.name} --root {self.root}` for a full report")
        if not scan.pairs:
            looked = ", ".join(str(f.images) for f in self.folders())
            raise UserError(f"no {self.name} {self.split} images with labels under {looked}; point --root at "
                            f"{self.layout} ({SYNTH_HINT})")

    def __len__(self) -> int:
        return len(self.pairs)

    def read_raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image and *unmapped* label of pair ``i``, as stored."""
        image_path, label_path = self.pairs[i]
        return read_image(image_path), read_label(label_path)

    def map_label(self, raw: np.ndarray) -> np.ndarray:
        """Raw label values -> train ids: the one place a data set's label mapping is applied."""
        return raw if self.label_lut is None else self.label_lut[raw]

    def __getitem__(self, i: int) -> dict:
        image, raw = self.read_raw(i)
        return {"image": image, "label": self.map_label(raw), "path": str(self.pairs[i][0])}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"


def file_stamp(path: Path) -> list[int] | None:
    """A file's size and modification time in nanoseconds, or None when it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def record_entry(root: Path, copy: Path, sources: list[Path]) -> dict:
    """What :data:`PREPARED_RECORD` holds for one prepared copy: its stamp and its sources' (by path under
    ``root``), as they are now."""
    return {"stamp": file_stamp(copy),
            "sources": {source.relative_to(root).as_posix(): file_stamp(source) for source in sources}}


def read_prepared_record(root: Path) -> dict[str, dict]:
    """The record of a data set's prepared copies, by path under ``root``; empty when absent or unreadable
    (then no copy counts as prepared)."""
    try:
        data = json.loads((Path(root) / PREPARED_RECORD).read_text())
        copies = data["copies"] if data.get("version") == PREPARED_RECORD_VERSION else {}
        return copies if isinstance(copies, dict) else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def record_current(root: Path, copy: Path, record: dict[str, dict]) -> bool:
    """Whether ``copy`` and each of its sources are as ``record`` says they were when it was made."""
    entry = record.get(copy.relative_to(root).as_posix())
    if not isinstance(entry, dict) or not isinstance(entry.get("sources"), dict):
        return False
    return entry == record_entry(root, copy, [root / source for source in entry["sources"]])


def _by_key(folder: Path, pattern: str, suffix: str) -> dict[str, Path]:
    """Files under ``folder`` matching ``pattern``, keyed by relative path minus ``suffix``."""
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix()[: -len(suffix)]: p for p in folder.glob(pattern) if p.is_file()}


class GTAV(SegDataset):
    """GTAV: ``images/*.png`` and ``labels/*.png`` holding Cityscapes label ids; all images train.

    Prepared (Rein's ``tools/convert_datasets/gta.py`` naming): ``labels/<n>_labelTrainIds.png``
    beside each ``labels/<n>.png``, holding train ids; those files are never listed as raw labels.
    A few real GTAV labels differ in size from their image; they are returned as stored and
    ``fishertune data verify`` / ``prepare`` report them.
    """

    name = "gtav"
    splits = ("train",)
    image_suffix = label_suffix = ".png"
    train_id_suffix = "_labelTrainIds.png"
    layout = "the directory that contains images/ and labels/"

    def __init__(self, root: str | Path, split: str = "train", *, strict: bool = True,
                 prepared: bool | None = None) -> None:
        super().__init__(root, split, strict=strict, prepared=prepared)

    def raw_folders(self) -> list[Folder]:
        return [Folder(self.root / "images", self.root / "labels", label_exclude=self.train_id_suffix)]

    def prepared_folders(self) -> list[Folder]:
        return [Folder(self.root / "images", self.root / "labels", label_suffix=self.train_id_suffix)]

    @classmethod
    def train_id_path(cls, label: Path) -> Path:
        """Where ``prepare`` writes the train-id copy of the raw label ``label``."""
        return label.with_name(label.name[: -len(cls.label_suffix)] + cls.train_id_suffix)

    def load_label_lut(self) -> np.ndarray:
        return CITYSCAPES_ID_TO_TRAIN_ID


class Cityscapes(SegDataset):
    """Cityscapes: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
    ``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (made by cityscapesscripts)."""

    name = "cityscapes"
    image_suffix = "_leftImg8bit.png"
    label_suffix = "_gtFine_labelTrainIds.png"
    depth = 1
    layout = ("the directory that contains leftImg8bit/ and gtFine/ with *_gtFine_labelTrainIds.png "
              "from cityscapesscripts' createTrainIdLabelImgs")

    def raw_folders(self) -> list[Folder]:
        return [Folder(self.root / "leftImg8bit" / self.split, self.root / "gtFine" / self.split)]


class BDD100K(SegDataset):
    """BDD100K 10k: ``images/10k/<split>/*.jpg`` with ``labels/sem_seg/masks/<split>/*.png``."""

    name = "bdd100k"
    image_suffix = ".jpg"
    label_suffix = ".png"
    layout = "the directory that contains images/10k/ and labels/sem_seg/masks/"

    def raw_folders(self) -> list[Folder]:
        return [Folder(self.root / "images" / "10k" / self.split,
                       self.root / "labels" / "sem_seg" / "masks" / self.split)]


class Mapillary(SegDataset):
    """Mapillary Vistas v1.2: ``{training,validation}/images/*.jpg`` with ``.../v1.2/labels/*.png``.

    Labels index the ``labels`` of ``config_v1.2.json`` at the root and are mapped by name
    (:func:`fishertune.data.labels.mapillary_to_train_id`). ``halve`` (default: on for validation,
    as in Rein's protocol) returns image and label at half size: :func:`halve_image` (bicubic) and
    :func:`halve_label` (nearest) when read, or the halved copies of ``prepare``.

    Prepared (Rein's README paths): train-id labels in ``cityscapes_trainIdLabel/{train,val}/label/``
    and the halved validation set in ``half/val_img/*.jpg`` and ``half/val_label/*.png``.
    """

    name = "mapillary"
    image_suffix = ".jpg"
    label_suffix = ".png"
    layout = "the directory that contains training/, validation/ and config_v1.2.json"
    config_name = "config_v1.2.json"
    split_dirs = {"train": "training", "val": "validation"}
    train_id_dir = "cityscapes_trainIdLabel/{split}/label"
    half_images = "half/val_img"
    half_labels = "half/val_label"

    def __init__(self, root: str | Path, split: str, halve: bool | None = None, *, strict: bool = True,
                 prepared: bool | None = None) -> None:
        self.halve = canonical_split(split) == "val" if halve is None else halve
        super().__init__(root, split, strict=strict, prepared=prepared)

    def raw_folders(self) -> list[Folder]:
        base = self.root / self.split_dirs[self.split]
        return [Folder(base / "images", base / "v1.2" / "labels")]

    def prepared_folders(self) -> list[Folder]:
        if self.halve and self.split == "val":
            return [Folder(self.root / self.half_images, self.root / self.half_labels)]
        if self.halve:  # halved training images have no prepared copies
            return None
        return [Folder(self.root / self.split_dirs[self.split] / "images",
                       self.root / self.train_id_dir.format(split=self.split))]

    def load_label_lut(self) -> np.ndarray:
        path = self.root / self.config_name
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"Mapillary config {path} is missing; point --root at {self.layout} "
                            f"({SYNTH_HINT})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"Mapillary config {path} is not valid JSON ({e}); restore it from the release") from None
        lut = mapillary_to_train_id(config)
        self.defined_raw_values = len(config["labels"])
        return lut

    def read_raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = super().read_raw(i)
        if not self.halve or self.prepared:  # the prepared validation copies are halved already
            return image, label
        return halve_image(image), halve_label(label)


def half_size(size: tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` halved (rounded down, at least 1), as Rein's ``mapillary_resize.py``."""
    return max(size[0] // 2, 1), max(size[1] // 2, 1)


def halve_image(image: np.ndarray) -> np.ndarray:
    """An ``H x W x 3`` image at half size, bicubic (Mapillary validation, as Rein)."""
    size = half_size((image.shape[1], image.shape[0]))
    return np.array(Image.fromarray(image).resize(size, Image.BICUBIC))


def halve_label(label: np.ndarray) -> np.ndarray:
    """An ``H x W`` label map at half size, nearest (Mapillary validation, as Rein)."""
    return np.array(Image.fromarray(label).resize(half_size((label.shape[1], label.shape[0])), Image.NEAREST))


class ACDC(SegDataset):
    """ACDC: ``rgb_anon/<condition>/<split>/<seq>/*_rgb_anon.png`` with
    ``gt/<condition>/<split>/<seq>/*_gt_labelTrainIds.png``, over the chosen ``conditions``."""

    name = "acdc"
    image_suffix = "_rgb_anon.png"
    label_suffix = "_gt_labelTrainIds.png"
    depth = 1
    layout = "the directory that contains rgb_anon/ and gt/"
    all_conditions = ("fog", "night", "rain", "snow")

    def __init__(self, root: str | Path, split: str, conditions: tuple[str, ...] = all_conditions, *,
                 strict: bool = True, prepared: bool | None = None) -> None:
        unknown = [c for c in conditions if c not in self.all_conditions]
        if unknown or not conditions:
            raise UserError(f"unknown ACDC condition(s) {unknown or conditions}; "
                            f"choose from {', '.join(self.all_conditions)}")
        self.conditions = tuple(conditions)
        super().__init__(root, split, strict=strict, prepared=prepared)

    def raw_folders(self) -> list[Folder]:
        return [Folder(self.root / "rgb_anon" / c / self.split, self.root / "gt" / c / self.split, c)
                for c in self.conditions]


DATASETS: Registry[type[SegDataset]] = Registry("data set")
for _reader in (GTAV, Cityscapes, BDD100K, Mapillary, ACDC):
    DATASETS.register(_reader.name, _reader)


def dataset_class(name: str) -> type[SegDataset]:
    """The reader registered as ``name``; an unknown name is a :class:`UserError` with a suggestion."""
    return DATASETS.get(name)


def build_dataset(name: str, root: str | Path, split: str, **kwargs) -> SegDataset:
    """The reader registered as ``name`` over ``root`` and ``split`` (``kwargs`` go to the reader)."""
    return dataset_class(name)(root, split, **kwargs)
