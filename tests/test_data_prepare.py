"""`fishertune data prepare`: the GTAV and Mapillary tables written out, conversion on copies of the
miniature and on hand-made trees, idempotence, resuming, broken trees, and the readers afterwards."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fishertune.cli import main
from fishertune.data import CLASSES, build_dataset, verify_dataset
from fishertune.data import prepare as prepare_module
from fishertune.data.datasets import PREPARED_RECORD
from fishertune.data.labels import MAPILLARY_V12_NAMES, mapillary_to_train_id, mapillary_v12_config
from fishertune.data.prepare import (HALVED_IMAGES, HALVED_LABELS, ORPHANS, STALE_TEMP, TRAIN_ID_LABELS,
                                     UNREADABLE_POLYGONS, prepare_dataset, write_atomic)
from fishertune.data.verify import (ILLEGAL_VALUE, IMAGE_WITHOUT_LABEL, LABEL_WITHOUT_IMAGE, MISSING_FOLDER,
                                    SIZE_MISMATCH, UNREADABLE_IMAGE, UNREADABLE_LABEL)
from fishertune.errors import UserError

# Cityscapes label id -> train id (DESIGN section 4: 7:0 8:1 11:2 12:3 13:4 17:5 19:6 20:7 21:8 22:9 23:10 24:11
# 25:12 26:13 27:14 28:15 31:16 32:17 33:18, else 255), one entry per label id of cityscapesscripts' labels.py.
GTAV_TABLE = {
    0: 255,  # unlabeled
    1: 255,  # ego vehicle
    2: 255,  # rectification border
    3: 255,  # out of roi
    4: 255,  # static
    5: 255,  # dynamic
    6: 255,  # ground
    7: 0,  # road
    8: 1,  # sidewalk
    9: 255,  # parking
    10: 255,  # rail track
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    14: 255,  # guard rail
    15: 255,  # bridge
    16: 255,  # tunnel
    17: 5,  # pole
    18: 255,  # polegroup
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    29: 255,  # caravan
    30: 255,  # trailer
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}  # license plate (-1) cannot occur in an 8-bit PNG; 34..254 and 255 are not label ids: 255

# DESIGN section 4's Mapillary rules applied by hand to each of the 66 v1.2 names: exact Cityscapes name ->
# that class; traffic sign frame/front/back -> traffic sign; on rails -> train; bicyclist/motorcyclist/other
# rider -> rider; pole, street light, utility pole -> pole; curb, curb cut, pedestrian area -> sidewalk;
# crosswalk plain, parking, bike lane, service lane, lane markings -> road; everything else (None) 255.
MAPILLARY_TABLE = {
    "animal--bird": None,
    "animal--ground-animal": None,
    "construction--barrier--curb": "sidewalk",
    "construction--barrier--fence": "fence",
    "construction--barrier--guard-rail": None,
    "construction--barrier--other-barrier": None,
    "construction--barrier--wall": "wall",
    "construction--flat--bike-lane": "road",
    "construction--flat--crosswalk-plain": "road",
    "construction--flat--curb-cut": "sidewalk",
    "construction--flat--parking": "road",
    "construction--flat--pedestrian-area": "sidewalk",
    "construction--flat--rail-track": None,
    "construction--flat--road": "road",
    "construction--flat--service-lane": "road",
    "construction--flat--sidewalk": "sidewalk",
    "construction--structure--bridge": None,
    "construction--structure--building": "building",
    "construction--structure--tunnel": None,
    "human--person": "person",
    "human--rider--bicyclist": "rider",
    "human--rider--motorcyclist": "rider",
    "human--rider--other-rider": "rider",
    "marking--crosswalk-zebra": "road",
    "marking--general": "road",
    "nature--mountain": None,
    "nature--sand": None,
    "nature--sky": "sky",
    "nature--snow": None,
    "nature--terrain": "terrain",
    "nature--vegetation": "vegetation",
    "nature--water": None,
    "object--banner": None,
    "object--bench": None,
    "object--bike-rack": None,
    "object--billboard": None,
    "object--catch-basin": None,
    "object--cctv-camera": None,
    "object--fire-hydrant": None,
    "object--junction-box": None,
    "object--mailbox": None,
    "object--manhole": None,
    "object--phone-booth": None,
    "object--pothole": None,
    "object--street-light": "pole",
    "object--support--pole": "pole",
    "object--support--traffic-sign-frame": "traffic sign",
    "object--support--utility-pole": "pole",
    "object--traffic-light": "traffic light",
    "object--traffic-sign--back": "traffic sign",
    "object--traffic-sign--front": "traffic sign",
    "object--trash-can": None,
    "object--vehicle--bicycle": "bicycle",
    "object--vehicle--boat": None,
    "object--vehicle--bus": "bus",
    "object--vehicle--car": "car",
    "object--vehicle--caravan": None,
    "object--vehicle--motorcycle": "motorcycle",
    "object--vehicle--on-rails": "train",
    "object--vehicle--other-vehicle": None,
    "object--vehicle--trailer": None,
    "object--vehicle--truck": "truck",
    "object--vehicle--wheeled-slow": None,
    "void--car-mount": None,
    "void--ego-vehicle": None,
    "void--unlabeled": None,
}
TRAIN_IDS = {"road": 0, "sidewalk": 1, "building": 2, "wall": 3, "fence": 4, "pole": 5, "traffic light": 6,
             "traffic sign": 7, "vegetation": 8, "terrain": 9, "sky": 10, "person": 11, "rider": 12, "car": 13,
             "truck": 14, "bus": 15, "train": 16, "motorcycle": 17, "bicycle": 18}


def copy_tree(synth_root: Path, name: str, tmp_path: Path) -> Path:
    """A private copy of one synthetic data set (the session's miniature must not change)."""
    return Path(shutil.copytree(synth_root / name, tmp_path / name))


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(root: Path, outputs: str) -> list[Path]:
    """Temporary files under ``root``, and outputs (a glob) that do not decode in full."""
    bad = list(root.rglob("*.tmp"))
    for p in root.glob(outputs):
        try:
            with Image.open(p) as image:
                image.load()
        except OSError:
            bad.append(p)
    return bad


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def run_cli(capsys, name: str, root: Path) -> tuple[int, str]:
    code = main(["data", "prepare", name, "--root", str(root), "--workers", "2"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def problem(report, kind: str) -> str:
    return next((line for line in report.problems if kind in line), "")


# ---- the tables -------------------------------------------------------------------------------------------

def test_gtav_table_is_cityscapes_scripts_label_ids(tmp_path):
    assert len(GTAV_TABLE) == 34
    assert sorted(v for v in GTAV_TABLE.values() if v != 255) == list(range(19))
    expected = np.array([GTAV_TABLE.get(i, 255) for i in range(256)], dtype=np.uint8)
    # every 8-bit value, id by id, through prepare and the reader
    root = tmp_path / "gtav"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "images/00001.png")
    Image.fromarray(ids, "L").save(root / "labels/00001.png")
    report = prepare_dataset("gtav", root, progress=False)
    assert report.ok and report.written == {TRAIN_ID_LABELS: 1}, report.format()
    written = np.asarray(Image.open(root / "labels/00001_labelTrainIds.png"))
    for label_id in range(256):
        assert written.ravel()[label_id] == expected[label_id], label_id
    assert np.array_equal(build_dataset("gtav", root, "train")[0]["label"], expected[ids])


def test_mapillary_table_class_by_class(tmp_path):
    assert list(MAPILLARY_TABLE) == list(MAPILLARY_V12_NAMES) and len(MAPILLARY_TABLE) == 66
    config = mapillary_v12_config()
    expected = [TRAIN_IDS[c] if c else 255 for c in MAPILLARY_TABLE.values()]
    lut = mapillary_to_train_id(config)
    for i, (name, cls) in enumerate(MAPILLARY_TABLE.items()):
        assert config["labels"][i]["name"] == name
        assert lut[i] == expected[i], (name, cls, lut[i])
    assert list(TRAIN_IDS) == list(CLASSES)
    # the same table through prepare: one label holding every id, train split and halved validation
    root = tmp_path / "mapillary"
    (root / "config_v1.2.json").parent.mkdir(parents=True)
    (root / "config_v1.2.json").write_text(json.dumps(config))
    ids = np.repeat(np.repeat(np.arange(66, dtype=np.uint8).reshape(6, 11), 2, axis=0), 2, axis=1)  # 12 x 22
    for split in ("training", "validation"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "v1.2/labels").mkdir(parents=True)
        Image.fromarray(np.full((12, 22, 3), 128, np.uint8)).save(root / split / "images/k.jpg")
        Image.fromarray(ids, "L").save(root / split / "v1.2/labels/k.png")
    report = prepare_dataset("mapillary", root, progress=False)
    assert report.ok, report.format()
    train = np.asarray(Image.open(root / "cityscapes_trainIdLabel/train/label/k.png"))
    half = np.asarray(Image.open(root / "half/val_label/k.png"))
    assert np.array_equal(train, np.array(expected, np.uint8)[ids])
    assert np.array_equal(half, np.array(expected, np.uint8)[ids[::2, ::2]])  # nearest, 2x2 blocks


# ---- conversion on the miniature ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gtav", "mapillary"])
def test_prepare_is_idempotent(synth_root, synth_counts, tmp_path, name):
    root = copy_tree(synth_root, name, tmp_path)
    first = prepare_dataset(name, root, workers=2, progress=False)
    assert first.ok and not first.notes and first.counts == synth_counts[name], first.format()
    pairs = sum(synth_counts[name].values())
    assert sum(first.written.values()) == pairs + 2 * synth_counts[name].get("val", 0)
    assert all(first.reads_prepared.values())
    before = snapshot(root)
    second = prepare_dataset(name, root, workers=2, progress=False)
    assert not second.written and second.finished == first.written, second.format()
    assert snapshot(root) == before  # same bytes, not even rewritten
    assert "0 written" in second.format()


def test_gtav_outputs_beside_the_labels(synth_root, tmp_path):
    root = copy_tree(synth_root, "gtav", tmp_path)
    prepare_dataset("gtav", root, progress=False)
    raw = sorted(p for p in (root / "labels").glob("*.png") if not p.name.endswith("_labelTrainIds.png"))
    assert sorted((root / "labels").glob("*_labelTrainIds.png")) == \
        [p.with_name(p.stem + "_labelTrainIds.png") for p in raw]
    written = Image.open(raw[0].with_name(raw[0].stem + "_labelTrainIds.png"))
    assert written.mode == "L"


def test_resume_after_a_killed_run(synth_root, tmp_path):
    root = copy_tree(synth_root, "mapillary", tmp_path)
    prepare_dataset("mapillary", root, progress=False)
    done = snapshot(root)
    half = sorted((root / "half/val_img").glob("*.jpg"))[1]
    label = sorted((root / "cityscapes_trainIdLabel/train/label").glob("*.png"))[0]
    half.unlink()
    label.unlink()
    stale = half.with_name(f".{half.name}.{dead_pid()}.tmp")
    stale.write_bytes(b"\xff\xd8 half a jpeg")
    live = label.with_name(f".{label.name}.{os.getppid()}.tmp")  # a running process's file is left alone
    live.write_bytes(b"busy")
    partial = build_dataset("mapillary", root, "val")
    assert not partial.prepared  # incomplete copies: the original files, halved when read
    report = prepare_dataset("mapillary", root, progress=False)
    assert report.ok and report.written == {HALVED_IMAGES: 1, TRAIN_ID_LABELS: 1}, report.format()
    assert any(STALE_TEMP in note and str(stale) in note for note in report.notes)
    assert not stale.exists() and live.exists()
    live.unlink()
    # the same bytes, but for the record of the copies, which holds the new copies' modification times
    assert {k: v[0] for k, v in snapshot(root).items() if k != PREPARED_RECORD} == \
        {k: v[0] for k, v in done.items() if k != PREPARED_RECORD}
    assert build_dataset("mapillary", root, "val").prepared


def test_outdated_or_damaged_outputs_are_redone(synth_root, tmp_path):
    root = copy_tree(synth_root, "gtav", tmp_path)
    prepare_dataset("gtav", root, progress=False)
    outputs = sorted((root / "labels").glob("*_labelTrainIds.png"))
    good = [p.read_bytes() for p in outputs]
    outputs[0].write_bytes(good[0][:60])  # truncated: the header reads, the rest is missing
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(outputs[1])  # wrong size
    source = outputs[2].with_name(outputs[2].name.replace("_labelTrainIds", ""))
    os.utime(source, ns=(outputs[2].stat().st_mtime_ns + 10**9,) * 2)  # the source changed after conversion
    report = prepare_dataset("gtav", root, progress=False)
    assert report.ok and report.written == {TRAIN_ID_LABELS: 3}, report.format()
    assert [p.read_bytes() for p in outputs] == good


def test_write_atomic_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "out/x.png"

    class Exploding:
        def save(self, f, **kwargs):
            f.write(b"\x89PNG half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, Exploding(), "PNG")
    assert list((tmp_path / "out").iterdir()) == []
    write_atomic(target, Image.new("L", (3, 2)), "PNG")
    assert Image.open(target).size == (3, 2) and [p.name for p in target.parent.iterdir()] == ["x.png"]


# ---- the readers on prepared trees -------------------------------------------------------------------------

def test_gtav_reader_reads_the_prepared_labels(synth_root, synth_counts, tmp_path):
    root = copy_tree(synth_root, "gtav", tmp_path)
    prepare_dataset("gtav", root, progress=False)
    prepared = build_dataset("gtav", root, "train")
    original = build_dataset("gtav", root, "train", prepared=False)
    assert prepared.prepared and prepared.label_lut is None and original.label_lut is not None
    assert all(label.name.endswith("_labelTrainIds.png") for _, label in prepared.pairs)
    assert not any(label.name.endswith("_labelTrainIds.png") for _, label in original.pairs)
    assert len(prepared) == len(original) == synth_counts["gtav"]["train"]
    for i in range(len(prepared)):
        a, b = prepared[i], original[i]
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
        assert a["path"] == b["path"]
    # verify reads the prepared view and does not count the copies as labels without image
    report = verify_dataset("gtav", root, expected=synth_counts["gtav"], progress=False)
    assert report.ok, report.format()
    # one copy missing: the reader falls back to the raw labels (same samples), still no orphans
    next((root / "labels").glob("*_labelTrainIds.png")).unlink()
    fallback = build_dataset("gtav", root, "train")
    assert not fallback.prepared and fallback.pairs == original.pairs
    assert verify_dataset("gtav", root, expected=synth_counts["gtav"], progress=False).ok
    with pytest.raises(UserError, match="data prepare gtav"):
        build_dataset("gtav", root, "train", prepared=True)


def test_mapillary_reader_reads_the_prepared_copies(synth_root, synth_counts, tmp_path):
    root = copy_tree(synth_root, "mapillary", tmp_path)
    prepare_dataset("mapillary", root, progress=False)
    for split in ("train", "val"):
        prepared = build_dataset("mapillary", root, split)
        original = build_dataset("mapillary", root, split, prepared=False)
        assert prepared.prepared and prepared.label_lut is None and len(prepared) == len(original)
        for i in range(len(prepared)):
            a, b = prepared[i], original[i]
            assert np.array_equal(a["label"], b["label"])
            if split == "train":
                assert np.array_equal(a["image"], b["image"])
            else:  # the halved copy is Rein's re-encoded JPEG of exactly the image halved when read
                assert "half/val_img" in a["path"] and a["image"].shape == b["image"].shape
                buffer = io.BytesIO()
                Image.fromarray(b["image"]).save(buffer, format="JPEG", quality=75)
                assert np.array_equal(a["image"], np.asarray(Image.open(buffer).convert("RGB")))
        full = build_dataset("mapillary", root, split, halve=False)
        assert full.prepared and "cityscapes_trainIdLabel" in str(full.pairs[0][1])
        assert np.array_equal(full[0]["label"], build_dataset("mapillary", root, split, halve=False,
                                                              prepared=False)[0]["label"])
    assert verify_dataset("mapillary", root, expected=synth_counts["mapillary"], progress=False).ok


def test_orphan_copies_are_noted_and_ignored(synth_root, tmp_path):
    root = copy_tree(synth_root, "mapillary", tmp_path)
    prepare_dataset("mapillary", root, progress=False)
    extra = root / "half/val_label/zzzzzzzzzzzzzzzzzzzzzz.png"
    shutil.copy(next((root / "half/val_label").glob("*.png")), extra)
    Image.new("RGB", Image.open(extra).size).save(root / "half/val_img" / (extra.stem + ".jpg"))
    report = prepare_dataset("mapillary", root, progress=False)
    assert report.ok and any(ORPHANS in note and str(extra) in note for note in report.notes), report.format()
    assert report.reads_prepared == {"train": True, "val": False}
    assert not build_dataset("mapillary", root, "val").prepared


def test_a_label_fixed_after_prepare_is_read_not_its_stale_copy(synth_root, tmp_path):
    root = copy_tree(synth_root, "gtav", tmp_path)
    prepare_dataset("gtav", root, progress=False)
    assert build_dataset("gtav", root, "train").prepared
    label = sorted(p for p in (root / "labels").glob("*.png") if not p.name.endswith("_labelTrainIds.png"))[0]
    fixed = Image.open(label)
    ids = np.array(fixed)
    ids[:10, :10] = 26  # a car (Cityscapes label id 26, train id 13) drawn in by hand after prepare
    out = Image.fromarray(ids, "P")
    out.putpalette(fixed.getpalette())
    out.save(label)
    reader = build_dataset("gtav", root, "train")
    assert not reader.prepared  # the copy is older than its source now: the release's files are read
    index = [lbl for _, lbl in reader.pairs].index(label)
    assert (reader[index]["label"][:10, :10] == 13).all()
    report = prepare_dataset("gtav", root, progress=False)  # prepare makes that one copy again
    assert report.ok and report.written == {TRAIN_ID_LABELS: 1}, report.format()
    again = build_dataset("gtav", root, "train")
    assert again.prepared and (again[index]["label"][:10, :10] == 13).all()


def test_a_validation_label_broken_after_prepare_is_found_by_verify(synth_root, synth_counts, tmp_path):
    root = copy_tree(synth_root, "mapillary", tmp_path)
    prepare_dataset("mapillary", root, progress=False)
    assert verify_dataset("mapillary", root, expected=synth_counts["mapillary"], progress=False).ok
    label = sorted(root.glob("validation/v1.2/labels/*.png"))[0]
    ids = np.asarray(Image.open(label)).copy()
    ids[:2, :2] = 70  # outside the 66 ids of v1.2
    Image.fromarray(ids).save(label)
    assert not build_dataset("mapillary", root, "val", strict=False).prepared
    report = verify_dataset("mapillary", root, expected=synth_counts["mapillary"], progress=False)
    assert str(label) in problem(report, ILLEGAL_VALUE), report.format()


def test_a_validation_image_without_label_is_not_hidden_by_the_halved_copies(synth_root, tmp_path):
    root = copy_tree(synth_root, "mapillary", tmp_path)
    label = sorted(root.glob("validation/v1.2/labels/*.png"))[0]
    label.unlink()
    image = root / "validation/images" / (label.stem + ".jpg")
    report = prepare_dataset("mapillary", root, progress=False)
    assert str(image) in problem(report, IMAGE_WITHOUT_LABEL) and not report.reads_prepared["val"]
    assert str(image) in problem(verify_dataset("mapillary", root, progress=False), IMAGE_WITHOUT_LABEL)
    with pytest.raises(UserError, match="have no label"):
        build_dataset("mapillary", root, "val")


def test_prepare_and_verify_agree_on_a_copy_changed_after_prepare(synth_root, synth_counts, tmp_path):
    root = copy_tree(synth_root, "gtav", tmp_path)
    prepare_dataset("gtav", root, progress=False)
    copy = sorted((root / "labels").glob("*_labelTrainIds.png"))[0]
    good = copy.read_bytes()
    ids = np.asarray(Image.open(copy)).copy()
    ids[0, :5] = 77  # no train id 77
    Image.fromarray(ids).save(copy)
    # its record entry made to match, as if the file had come back with the size and time recorded
    record_path = root / PREPARED_RECORD
    record = json.loads(record_path.read_text())
    record["copies"][copy.relative_to(root).as_posix()]["stamp"] = [copy.stat().st_size, copy.stat().st_mtime_ns]
    record_path.write_text(json.dumps(record))
    assert build_dataset("gtav", root, "train").prepared  # the record holds: verify reads the copy
    assert "values 77" in problem(verify_dataset("gtav", root, expected=synth_counts["gtav"], progress=False),
                                  ILLEGAL_VALUE)
    report = prepare_dataset("gtav", root, progress=False)  # reads the copy as verify does, and makes it again
    assert report.ok and report.written == {TRAIN_ID_LABELS: 1}, report.format()
    assert copy.read_bytes() == good
    assert verify_dataset("gtav", root, expected=synth_counts["gtav"], progress=False).ok


# ---- broken trees ------------------------------------------------------------------------------------------

def test_gtav_broken_tree(synth_root, tmp_path, capsys):
    root = copy_tree(synth_root, "gtav", tmp_path)
    labels = sorted((root / "labels").glob("*.png"))
    images = sorted((root / "images").glob("*.png"))
    labels[0].unlink()  # an image without label
    labels[1].write_bytes(labels[1].read_bytes()[:60])  # an unreadable label
    images[2].write_bytes(images[2].read_bytes()[:300])  # an unreadable image
    ids = np.asarray(Image.open(labels[3]))
    Image.fromarray(ids[:, :-3]).save(labels[3])  # a size mismatch: noted, converted as it is
    code, text = run_cli(capsys, "gtav", root)
    assert code == 2, text
    report = prepare_dataset("gtav", root, progress=False)
    assert str(images[0]) in problem(report, IMAGE_WITHOUT_LABEL)
    assert str(labels[1]) in problem(report, UNREADABLE_LABEL)
    assert str(images[2]) in problem(report, UNREADABLE_IMAGE)
    assert any(SIZE_MISMATCH in note and str(labels[3]) in note for note in report.notes)
    assert len(report.problems) == 3 and not report.written and report.finished[TRAIN_ID_LABELS] == len(images) - 3
    for kind in (IMAGE_WITHOUT_LABEL, UNREADABLE_LABEL, UNREADABLE_IMAGE):
        assert sum(kind in line for line in text.splitlines()) == 1
    converted = {p.name for p in (root / "labels").glob("*_labelTrainIds.png")}
    assert not {labels[1].stem + "_labelTrainIds.png", labels[2].stem + "_labelTrainIds.png"} & converted
    assert labels[3].stem + "_labelTrainIds.png" in converted
    assert not leftovers(root, "labels/*_labelTrainIds.png")
    assert not build_dataset("gtav", root, "train", strict=False).prepared
    assert not any(LABEL_WITHOUT_IMAGE in p for p in verify_dataset("gtav", root, progress=False).problems)


def test_missing_folders(synth_root, tmp_path, capsys):
    root = copy_tree(synth_root, "gtav", tmp_path)
    shutil.rmtree(root / "labels")
    code, text = run_cli(capsys, "gtav", root)
    assert code == 2 and MISSING_FOLDER in text and str(root / "labels") in text
    acdc = copy_tree(synth_root, "acdc", tmp_path)
    shutil.rmtree(acdc / "gt/snow")
    code, text = run_cli(capsys, "acdc", acdc)
    assert code == 2 and MISSING_FOLDER in text and str(acdc / "gt/snow/train") in text
    code, text = run_cli(capsys, "mapillary", tmp_path / "nowhere")
    assert code == 2 and text.count("\n") == 1 and "is not a directory" in text


def test_mapillary_broken_tree(synth_root, tmp_path, capsys):
    root = copy_tree(synth_root, "mapillary", tmp_path)
    label = sorted(root.glob("validation/v1.2/labels/*.png"))[0]
    ids = np.asarray(Image.open(label)).copy()
    ids[:2, :2] = 70  # outside the 66 ids of v1.2
    Image.fromarray(ids).save(label)
    image = sorted(root.glob("validation/images/*.jpg"))[1]
    image.write_bytes(image.read_bytes()[:400])
    code, text = run_cli(capsys, "mapillary", root)
    assert code == 2
    assert ILLEGAL_VALUE in text and str(label) in text and "values 70" in text
    assert UNREADABLE_IMAGE in text and str(image) in text
    for key in (label.stem, image.stem):  # no output at all for a broken pair
        assert not list(root.glob(f"cityscapes_trainIdLabel/*/label/{key}.png"))
        assert not list(root.glob(f"half/*/{key}.*"))
    assert len(list(root.glob("half/val_img/*.jpg"))) == len(list(root.glob("validation/images/*.jpg"))) - 2
    assert not leftovers(root, "half/*/*") and not leftovers(root, "cityscapes_trainIdLabel/*/label/*")
    assert not build_dataset("mapillary", root, "val", strict=False).prepared
    assert build_dataset("mapillary", root, "train").prepared


@pytest.mark.parametrize("name", ["bdd100k", "acdc", "cityscapes"])
def test_nothing_to_convert_is_checked(synth_root, synth_counts, tmp_path, capsys, name):
    root = copy_tree(synth_root, name, tmp_path)
    before = snapshot(root)
    code, text = run_cli(capsys, name, root)
    assert code == 0 and "nothing to convert" in text and "OK" in text, text
    assert snapshot(root) == before
    label = sorted(p for p in root.rglob("*.png") if "label" in p.relative_to(root).as_posix().lower())[0]
    label.unlink()
    code, text = run_cli(capsys, name, root)
    assert code == 2 and IMAGE_WITHOUT_LABEL in text and label.name in text


# ---- Cityscapes polygons -----------------------------------------------------------------------------------

def polygon_tree(root: Path) -> list[Path]:
    """Two Cityscapes images 64 x 32 with polygon files in cityscapesscripts' format and no label PNGs."""
    files = []
    for split, city, n in (("train", "aachen", 19), ("val", "lindau", 7)):
        stem = f"{city}_000000_{n:06d}"
        image = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
        image.parent.mkdir(parents=True)
        Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(image)
        objects = [
            {"label": "sky", "polygon": [[0, 0], [63, 0], [63, 12], [0, 12]]},
            {"label": "road", "polygon": [[0, 20], [63, 20], [63, 31], [0, 31]]},
            {"label": "car", "polygon": [[10, 16], [30, 16], [30, 28], [10, 28]]},  # drawn over the road
            {"label": "persongroup", "polygon": [[40, 14], [44, 14], [44, 26], [40, 26]]},  # "group" -> person
            {"label": "license plate", "polygon": [[18, 24], [22, 24], [22, 27], [18, 27]]},  # id -1: not drawn
            {"label": "building", "polygon": [[50, 2], [60, 2], [60, 10], [50, 10]], "deleted": 1},
        ]
        polygons = root / "gtFine" / split / city / f"{stem}_gtFine_polygons.json"
        polygons.parent.mkdir(parents=True)
        polygons.write_text(json.dumps({"imgHeight": 32, "imgWidth": 64, "objects": objects}))
        files.append(polygons)
    return files


def test_cityscapes_polygons_to_train_ids(tmp_path, capsys):
    pytest.importorskip("cityscapesscripts")
    root = tmp_path / "cityscapes"
    polygons = polygon_tree(root)
    code, text = run_cli(capsys, "cityscapes", root)
    assert code == 0 and "train-id labels: 2 written" in text, text
    for path in polygons:
        label = np.asarray(Image.open(path.with_name(path.name.replace("_polygons.json", "_labelTrainIds.png"))))
        assert label.shape == (32, 64)
        assert label[5, 30] == 10  # sky
        assert label[30, 50] == 0  # road
        assert label[22, 15] == 13 and label[25, 20] == 13  # car, also under the license plate
        assert label[20, 42] == 11  # person (from persongroup)
        assert label[16, 2] == 255 and label[5, 55] == 10  # background; the deleted building is not drawn
    report = prepare_dataset("cityscapes", root, progress=False)
    assert not report.written and report.finished == {TRAIN_ID_LABELS: 2} and report.ok
    dataset = build_dataset("cityscapes", root, "val")
    assert len(dataset) == 1 and dataset[0]["label"][30, 50] == 0


def test_cityscapes_unknown_label_and_resume(tmp_path):
    pytest.importorskip("cityscapesscripts")
    root = tmp_path / "cityscapes"
    polygons = polygon_tree(root)
    data = json.loads(polygons[0].read_text())
    data["objects"].append({"label": "spaceship", "polygon": [[0, 0], [4, 0], [4, 4]]})
    polygons[0].write_text(json.dumps(data))
    polygons[1].with_name("lindau_000000_000099_gtFine_polygons.json").write_text("{not json")
    report = prepare_dataset("cityscapes", root, progress=False)
    assert not report.ok and report.written == {TRAIN_ID_LABELS: 1}
    line = problem(report, UNREADABLE_POLYGONS)
    assert line.startswith("2 ") and "does not know" in line and "lindau_000000_000099" in line
    assert problem(report, IMAGE_WITHOUT_LABEL)  # aachen has no label now
    assert not list(root.rglob("*.tmp")) and not list(root.glob("gtFine/train/*/*.png"))


def test_cityscapes_without_cityscapesscripts(tmp_path, monkeypatch, capsys):
    root = tmp_path / "cityscapes"
    polygons = polygon_tree(root)
    for module in ("cityscapesscripts", "cityscapesscripts.helpers.annotation",
                   "cityscapesscripts.preparation.json2labelImg"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it fails
    prepare_module._cityscapes_converter.cache_clear()
    try:
        code, text = run_cli(capsys, "cityscapes", root)
        assert code == 2 and text.count("\n") == 1
        assert "pip install -e '.[cityscapes]' (in the clone) or pip install cityscapesscripts" in text
        assert not list(root.glob("gtFine/*/*/*.png"))
        for path in polygons:  # converted already (by anyone): nothing needs the package
            label = path.with_name(path.name.replace("_polygons.json", "_labelTrainIds.png"))
            Image.fromarray(np.zeros((32, 64), np.uint8)).save(label)
        code, text = run_cli(capsys, "cityscapes", root)
        assert code == 0 and "0 written, 2 already done" in text, text
    finally:
        prepare_module._cityscapes_converter.cache_clear()


def test_cli_report(synth_root, tmp_path, capsys):
    root = copy_tree(synth_root, "mapillary", tmp_path)
    code, text = run_cli(capsys, "mapillary", root)
    assert code == 0
    for kind in (TRAIN_ID_LABELS, HALVED_IMAGES, HALVED_LABELS):
        assert kind in text
    assert "readers use the prepared copies" in text
    code, text = run_cli(capsys, "mapilary", root)
    assert code == 2 and "did you mean 'mapillary'" in text
