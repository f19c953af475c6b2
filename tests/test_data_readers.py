"""Readers on the synthetic trees, label mappings, user errors, and verify_dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fishertune.data import CLASSES, DATASETS, IGNORE_INDEX, build_dataset, verify_dataset
from fishertune.data.labels import (CITYSCAPES_ID_TO_TRAIN_ID, MAPILLARY_V12_NAMES, mapillary_name_to_train_id,
                                    mapillary_to_train_id, mapillary_v12_config)
from fishertune.data.verify import (COUNT, ILLEGAL_VALUE, IMAGE_WITHOUT_LABEL, LABEL_WITHOUT_IMAGE, OFFICIAL_COUNTS,
                                    SIZE_MISMATCH, UNREADABLE_IMAGE)
from fishertune.errors import UserError

LEGAL = set(range(len(CLASSES))) | {IGNORE_INDEX}
SPLITS = [("gtav", "train"), ("cityscapes", "train"), ("cityscapes", "val"), ("bdd100k", "train"),
          ("bdd100k", "val"), ("mapillary", "train"), ("mapillary", "val"), ("acdc", "train"), ("acdc", "val")]


def copy_tree(synth_root: Path, name: str, tmp_path: Path) -> Path:
    """A private copy of one synthetic data set, for tests that damage it."""
    return Path(shutil.copytree(synth_root / name, tmp_path / name))


@pytest.mark.parametrize("name, split", SPLITS)
def test_reader_returns_mapped_samples(synth_root, synth_counts, name, split):
    dataset = build_dataset(name, synth_root / name, split)
    expected = sum(n for key, n in synth_counts[name].items() if key.split("/")[0] == split)
    assert len(dataset) == expected
    assert dataset.pairs == sorted(dataset.pairs)
    for i in range(len(dataset)):
        sample = dataset[i]
        image, label = sample["image"], sample["label"]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert label.dtype == np.uint8 and label.shape == image.shape[:2]
        assert set(np.unique(label).tolist()) <= LEGAL
        assert sample["path"] == str(dataset.pairs[i][0])


def test_registry_and_split_aliases(synth_root):
    assert set(DATASETS) == {"gtav", "cityscapes", "bdd100k", "mapillary", "acdc"}
    assert build_dataset("mapillary", synth_root / "mapillary", "validation").pairs == \
        build_dataset("mapillary", synth_root / "mapillary", "val").pairs
    assert build_dataset("cityscapes", synth_root / "cityscapes", "training").split == "train"
    with pytest.raises(UserError, match="did you mean 'cityscapes'"):
        build_dataset("citiscapes", synth_root, "val")
    with pytest.raises(UserError, match="unknown split 'test'"):
        build_dataset("cityscapes", synth_root / "cityscapes", "test")
    with pytest.raises(UserError, match="gtav has no 'val' split"):
        build_dataset("gtav", synth_root / "gtav", "val")


def test_gtav_maps_label_ids_to_train_ids(synth_root):
    dataset = build_dataset("gtav", synth_root / "gtav", "train")
    raw = np.asarray(Image.open(dataset.pairs[0][1]))
    label = dataset[0]["label"]
    assert np.array_equal(label, CITYSCAPES_ID_TO_TRAIN_ID[raw])
    assert (label[raw == 7] == CLASSES.index("road")).all() and (raw == 7).any()
    assert (label[raw == 26] == CLASSES.index("car")).all()
    assert not np.array_equal(label, raw)


def test_cityscapes_id_table():
    lut = CITYSCAPES_ID_TO_TRAIN_ID
    assert lut.shape == (256,) and lut.dtype == np.uint8
    pairs = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
             26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    assert {i: int(t) for i, t in enumerate(lut) if t != 255} == pairs


def test_mapillary_raw_labels_are_66_class_ids_mapped_by_config(synth_root):
    dataset = build_dataset("mapillary", synth_root / "mapillary", "train")
    image_path, label_path = dataset.pairs[0]
    raw = np.asarray(Image.open(label_path))
    assert raw.max() > 18
    config = json.loads((synth_root / "mapillary/config_v1.2.json").read_text())
    assert np.array_equal(dataset[0]["label"], mapillary_to_train_id(config)[raw])


def test_mapillary_mapping_follows_names_not_order(synth_root, tmp_path):
    root = copy_tree(synth_root, "mapillary", tmp_path)
    config = json.loads((root / "config_v1.2.json").read_text())
    perm = np.random.default_rng(0).permutation(len(config["labels"]))  # new position k holds old label perm[k]
    config["labels"] = [config["labels"][k] for k in perm]
    (root / "config_v1.2.json").write_text(json.dumps(config))
    new_index = np.zeros(256, dtype=np.uint8)
    new_index[perm] = np.arange(len(perm))
    for path in root.glob("*/v1.2/labels/*.png"):
        Image.fromarray(new_index[np.asarray(Image.open(path))]).save(path)
    for split in ("train", "val"):
        original = build_dataset("mapillary", synth_root / "mapillary", split)
        permuted = build_dataset("mapillary", root, split)
        for i in range(len(original)):
            assert np.array_equal(original[i]["label"], permuted[i]["label"])
    assert (np.asarray(Image.open(next(root.glob("training/v1.2/labels/*.png")))) !=
            np.asarray(Image.open(next((synth_root / "mapillary").glob("training/v1.2/labels/*.png"))))).any()


# DESIGN section 4's Mapillary rules, written out: the names each class must receive.
MAPILLARY_RULES = [
    ("road", ["construction--flat--road", "construction--flat--crosswalk-plain", "construction--flat--parking",
              "construction--flat--bike-lane", "construction--flat--service-lane", "marking--general",
              "marking--crosswalk-zebra"]),
    ("sidewalk", ["construction--flat--sidewalk", "construction--barrier--curb", "construction--flat--curb-cut",
                  "construction--flat--pedestrian-area"]),
    ("building", ["construction--structure--building"]),
    ("wall", ["construction--barrier--wall"]),
    ("fence", ["construction--barrier--fence"]),
    ("pole", ["object--support--pole", "object--street-light", "object--support--utility-pole"]),
    ("traffic light", ["object--traffic-light"]),
    ("traffic sign", ["object--support--traffic-sign-frame", "object--traffic-sign--front",
                      "object--traffic-sign--back"]),
    ("vegetation", ["nature--vegetation"]),
    ("terrain", ["nature--terrain"]),
    ("sky", ["nature--sky"]),
    ("person", ["human--person"]),
    ("rider", ["human--rider--bicyclist", "human--rider--motorcyclist", "human--rider--other-rider"]),
    ("car", ["object--vehicle--car"]),
    ("truck", ["object--vehicle--truck"]),
    ("bus", ["object--vehicle--bus"]),
    ("train", ["object--vehicle--on-rails"]),
    ("motorcycle", ["object--vehicle--motorcycle"]),
    ("bicycle", ["object--vehicle--bicycle"]),
]


@pytest.mark.parametrize("cls, names", MAPILLARY_RULES)
def test_mapillary_rules(cls, names):
    """Each rule of DESIGN section 4, and nothing else, maps to the class."""
    assert {n for n in MAPILLARY_V12_NAMES if mapillary_name_to_train_id(n) == CLASSES.index(cls)} == set(names)


def test_mapillary_everything_else_is_ignored():
    lut = mapillary_to_train_id(mapillary_v12_config())
    ignored = {MAPILLARY_V12_NAMES[i] for i in range(66) if lut[i] == 255}
    assert ignored == set(MAPILLARY_V12_NAMES) - {n for _, names in MAPILLARY_RULES for n in names}
    assert {"void--unlabeled", "void--ego-vehicle", "object--billboard", "construction--barrier--guard-rail",
            "object--vehicle--caravan", "construction--flat--rail-track", "nature--water"} <= ignored
    assert (lut[66:] == 255).all()


def test_mapillary_config_errors():
    with pytest.raises(UserError, match="maps to a Cityscapes class"):
        mapillary_to_train_id({"labels": [{"name": "foo--bar"}, {"name": "baz"}]})
    with pytest.raises(UserError, match="no 'labels' list"):
        mapillary_to_train_id({"classes": []})


def test_mapillary_validation_is_halved(synth_root):
    root = synth_root / "mapillary"
    val = build_dataset("mapillary", root, "val")
    full = build_dataset("mapillary", root, "val", halve=False)
    train = build_dataset("mapillary", root, "train")
    for i in range(len(val)):
        w, h = Image.open(val.pairs[i][0]).size
        assert val[i]["image"].shape[:2] == val[i]["label"].shape == (h // 2, w // 2)
        assert full[i]["image"].shape[:2] == (h, w)
        assert set(np.unique(val[i]["label"])) <= set(np.unique(full[i]["label"]))  # nearest: no new values
    w, h = Image.open(train.pairs[0][0]).size
    assert train[0]["image"].shape[:2] == (h, w)


def test_acdc_conditions(synth_root, synth_images):
    fog = build_dataset("acdc", synth_root / "acdc", "val", conditions=("fog",))
    assert len(fog) == synth_images and all("/fog/" in p.as_posix() for p, _ in fog.pairs)
    assert len(build_dataset("acdc", synth_root / "acdc", "val")) == 4 * synth_images
    with pytest.raises(UserError, match="unknown ACDC condition"):
        build_dataset("acdc", synth_root / "acdc", "val", conditions=("hail",))


def test_user_errors_name_the_path_and_the_fix(synth_root, tmp_path):
    with pytest.raises(UserError) as missing:
        build_dataset("cityscapes", tmp_path / "nowhere", "val")
    message = str(missing.value)
    assert str(tmp_path / "nowhere") in message and "leftImg8bit/" in message and "data synth" in message
    assert "\n" not in message
    with pytest.raises(UserError, match="no bdd100k val images with labels under"):
        build_dataset("bdd100k", tmp_path, "val")
    root = copy_tree(synth_root, "cityscapes", tmp_path)
    label = next((root / "gtFine/val").glob("*/*.png"))
    label.unlink()
    with pytest.raises(UserError, match="have no label") as orphan:
        build_dataset("cityscapes", root, "val")
    assert str(label) in str(orphan.value)
    assert len(build_dataset("cityscapes", root, "val", strict=False)) == len(list((root / "gtFine/val").glob("*/*")))
    (root.parent / "mapillary").mkdir()
    with pytest.raises(UserError, match="config_v1.2.json is missing"):
        build_dataset("mapillary", root.parent / "mapillary", "val")


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_verify_passes_on_a_good_tree(synth_root, synth_counts, name):
    report = verify_dataset(name, synth_root / name, expected=synth_counts[name], progress=False)
    assert report.ok, report.format()
    assert report.counts == synth_counts[name]
    assert "OK" in report.format()


def test_verify_reports_each_problem(synth_root, synth_counts, tmp_path):
    root = copy_tree(synth_root, "cityscapes", tmp_path)
    labels = sorted((root / "gtFine/train").glob("*/*.png"))
    images = sorted((root / "leftImg8bit/train").glob("*/*.png"))
    labels[0].unlink()  # a deleted label
    shutil.copy(images[1], images[1].with_name("aachen_000000_999999_leftImg8bit.png"))  # an extra image
    shutil.copy(labels[1], labels[1].with_name("aachen_000000_888888_gtFine_labelTrainIds.png"))  # extra label
    ids = np.asarray(Image.open(labels[2])).copy()
    ids[0, 0] = 77
    Image.fromarray(ids).save(labels[2])  # an illegal value
    Image.fromarray(ids[:, :-4] % 19).save(labels[3])  # a size mismatch
    images[4].write_bytes(images[4].read_bytes()[:200])  # a truncated image
    report = verify_dataset("cityscapes", root, split="train", expected=synth_counts["cityscapes"], progress=False)
    assert not report.ok
    text = "\n".join(report.problems)
    for kind, path in ((IMAGE_WITHOUT_LABEL, images[0]), (IMAGE_WITHOUT_LABEL, "aachen_000000_999999"),
                       (LABEL_WITHOUT_IMAGE, "aachen_000000_888888"), (ILLEGAL_VALUE, labels[2]),
                       (SIZE_MISMATCH, labels[3]), (UNREADABLE_IMAGE, images[4])):
        line = next((p for p in report.problems if kind in p), "")
        assert str(path) in line, (kind, text)
    assert "values 77" in text
    assert f"train: {synth_counts['cityscapes']['train']} found" not in text  # orphans do not count as pairs
    assert report.counts == {"train": synth_counts["cityscapes"]["train"] - 1}
    assert any(COUNT in p for p in report.problems)
    assert "PROBLEMS" in report.format() and str(root) in report.format()


def test_verify_groups_examples(synth_root, tmp_path):
    root = copy_tree(synth_root, "bdd100k", tmp_path)
    labels = sorted((root / "labels/sem_seg/masks/val").glob("*.png"))
    for label in labels[:4]:
        label.unlink()
    report = verify_dataset("bdd100k", root, split="val", max_examples=2, progress=False)
    [line] = report.problems
    assert line.startswith(f"4 {IMAGE_WITHOUT_LABEL}") and line.count("expected") == 2


def test_verify_mapillary_ids_outside_the_config(synth_root, tmp_path):
    root = copy_tree(synth_root, "mapillary", tmp_path)
    label = next(root.glob("validation/v1.2/labels/*.png"))
    ids = np.asarray(Image.open(label)).copy()
    ids[:2, :2] = 70
    Image.fromarray(ids).save(label)
    report = verify_dataset("mapillary", root, progress=False)
    assert [p for p in report.problems if ILLEGAL_VALUE in p and str(label) in p]


def test_official_counts_cover_every_dataset_and_split():
    assert set(OFFICIAL_COUNTS) == set(DATASETS)
    acdc = OFFICIAL_COUNTS["acdc"]
    assert sum(n for k, n in acdc.items() if k.startswith("train/")) == 1600  # ACDC: 1600 train, 406 val
    assert sum(n for k, n in acdc.items() if k.startswith("val/")) == 406
