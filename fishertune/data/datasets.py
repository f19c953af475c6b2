"""Readers for the five data sets in their real on-disk layouts (DESIGN section 4).

Each reader lists ``(image, label)`` pairs by matching file names within one or more folder pairs,
and maps its raw labels to the 19 train ids in exactly one place: its :attr:`SegDataset.label_lut`
(GTAV: Cityscapes label ids; Mapillary: the table built from its ``config_v1.2.json``; the others
already hold train ids). The same readers run on the real data and on the miniature written by
:func:`fishertune.data.synth.synthesize`.
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

#: Accepted spellings of the two splits, mapped to their canonical names.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "validation": "val"}
SYNTH_HINT = "or run `fishertune data synth --out DIR` for the miniature"


@dataclass(frozen=True)
class Folder:
    """One image folder and its label folder; ``group`` names it in counts (ACDC: the condition)."""

    images: Path
    labels: Path
    group: str = ""


@dataclass
class Scan:
    """What a listing of a data set's folders found: matched pairs and files without a partner."""

    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    images_without_label: list[tuple[Path, Path]] = field(default_factory=list)  # (image, expected label)
    labels_without_image: list[Path] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # the Folder.group of each pair


def canonical_split(split: str) -> str:
    """``"train"`` or ``"val"`` for any accepted alias; a :class:`UserError` otherwise."""
    try:
        return SPLIT_ALIASES[split]
    except KeyError:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLIT_ALIASES)}") from None


class SegDataset(Dataset):
    """A segmentation data set: ``dataset[i]`` is ``dict(image, label, path)``.

    ``image`` is ``H x W x 3`` uint8 RGB, ``label`` is ``H x W`` uint8 train ids (255 = ignore),
    ``path`` the image file. Subclasses say where the files are (:meth:`folders`) and how their file
    names end; the pairs are matched on the file name without that ending, relative to the folder.
    With ``strict`` (the default) an image without its label is a :class:`UserError`; ``verify``
    reads with ``strict=False`` to report such files instead.
    """

    name: ClassVar[str]
    splits: ClassVar[tuple[str, ...]] = ("train", "val")
    image_suffix: ClassVar[str]
    label_suffix: ClassVar[str]
    depth: ClassVar[int] = 0  # sub-folder levels between a folder and its files (Cityscapes: city)
    layout: ClassVar[str]  # what --root must contain, for error messages
    defined_raw_values = 256  # raw label values 0..n-1 have a meaning (Mapillary: its config's labels)

    def __init__(self, root: str | Path, split: str, *, strict: bool = True) -> None:
        self.root = Path(root)
        self.split = canonical_split(split)
        if self.split not in self.splits:
            raise UserError(f"{self.name} has no {split!r} split; it has {', '.join(self.splits)}")
        if not self.root.is_dir():
            raise UserError(f"{self.name} root {self.root} is not a directory; point --root at {self.layout} "
                            f"({SYNTH_HINT})")
        self.label_lut = self.load_label_lut()
        self.scan = self.list_pairs()
        self.pairs = self.scan.pairs
        if strict:
            self._check(self.scan)

    def folders(self) -> list[Folder]:
        """The image/label folder pairs of this split."""
        raise NotImplementedError

    def load_label_lut(self) -> np.ndarray | None:
        """256-entry table raw label value -> train id, or ``None`` where labels are train ids."""
        return None

    def legal_raw_values(self) -> np.ndarray:
        """Which of the 256 raw label values may occur: the train ids and 255 where labels hold
        train ids, else every value the label table defines (all of them for GTAV)."""
        legal = np.zeros(256, dtype=bool)
        if self.label_lut is None:
            legal[:NUM_CLASSES] = True
            legal[IGNORE_INDEX] = True
        else:
            legal[: self.defined_raw_values] = True
        return legal

    def list_pairs(self) -> Scan:
        """Match image and label files by name within each folder; sorted, deterministic."""
        scan = Scan()
        pattern = "*/" * self.depth + "*"
        for folder in self.folders():
            images = _by_key(folder.images, pattern + self.image_suffix, self.image_suffix)
            labels = _by_key(folder.labels, pattern + self.label_suffix, self.label_suffix)
            for key in sorted(images):
                if key in labels:
                    scan.pairs.append((images[key], labels[key]))
                    scan.groups.append(folder.group)
                else:
                    scan.images_without_label.append((images[key], folder.labels / (key + self.label_suffix)))
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


def _by_key(folder: Path, pattern: str, suffix: str) -> dict[str, Path]:
    """Files under ``folder`` matching ``pattern``, keyed by relative path minus ``suffix``."""
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix()[: -len(suffix)]: p for p in folder.glob(pattern) if p.is_file()}


class GTAV(SegDataset):
    """GTAV: ``images/*.png`` and ``labels/*.png`` holding Cityscapes label ids; all images train.

    A few real GTAV labels differ in size from their image; they are returned as stored and
    ``fishertune data verify`` reports them.
    """

    name = "gtav"
    splits = ("train",)
    image_suffix = label_suffix = ".png"
    layout = "the directory that contains images/ and labels/"

    def __init__(self, root: str | Path, split: str = "train", *, strict: bool = True) -> None:
        super().__init__(root, split, strict=strict)

    def folders(self) -> list[Folder]:
        return [Folder(self.root / "images", self.root / "labels")]

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

    def folders(self) -> list[Folder]:
        return [Folder(self.root / "leftImg8bit" / self.split, self.root / "gtFine" / self.split)]


class BDD100K(SegDataset):
    """BDD100K 10k: ``images/10k/<split>/*.jpg`` with ``labels/sem_seg/masks/<split>/*.png``."""

    name = "bdd100k"
    image_suffix = ".jpg"
    label_suffix = ".png"
    layout = "the directory that contains images/10k/ and labels/sem_seg/masks/"

    def folders(self) -> list[Folder]:
        return [Folder(self.root / "images" / "10k" / self.split,
                       self.root / "labels" / "sem_seg" / "masks" / self.split)]


class Mapillary(SegDataset):
    """Mapillary Vistas v1.2: ``{training,validation}/images/*.jpg`` with ``.../v1.2/labels/*.png``.

    Labels index the ``labels`` of ``config_v1.2.json`` at the root and are mapped by name
    (:func:`fishertune.data.labels.mapillary_to_train_id`). ``halve`` (default: on for validation,
    as in Rein's protocol) halves image (bicubic) and label (nearest) when read; pass
    ``halve=False`` for copies already halved on disk.
    """

    name = "mapillary"
    image_suffix = ".jpg"
    label_suffix = ".png"
    layout = "the directory that contains training/, validation/ and config_v1.2.json"
    config_name = "config_v1.2.json"
    split_dirs = {"train": "training", "val": "validation"}

    def __init__(self, root: str | Path, split: str, halve: bool | None = None, *, strict: bool = True) -> None:
        super().__init__(root, split, strict=strict)
        self.halve = self.split == "val" if halve is None else halve

    def folders(self) -> list[Folder]:
        base = self.root / self.split_dirs[self.split]
        return [Folder(base / "images", base / "v1.2" / "labels")]

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
        if not self.halve:
            return image, label
        h, w = image.shape[:2]
        size = (max(w // 2, 1), max(h // 2, 1))
        image = np.array(Image.fromarray(image).resize(size, Image.BICUBIC))
        lh, lw = label.shape
        label = np.array(Image.fromarray(label).resize((max(lw // 2, 1), max(lh // 2, 1)), Image.NEAREST))
        return image, label


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
                 strict: bool = True) -> None:
        unknown = [c for c in conditions if c not in self.all_conditions]
        if unknown or not conditions:
            raise UserError(f"unknown ACDC condition(s) {unknown or conditions}; "
                            f"choose from {', '.join(self.all_conditions)}")
        self.conditions = tuple(conditions)
        super().__init__(root, split, strict=strict)

    def folders(self) -> list[Folder]:
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
