"""The synthetic miniature: layouts, encodings, class coverage, determinism, atomic writing."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fishertune.data import CLASSES, build_dataset, synthesize
from fishertune.data import synth as synth_module
from fishertune.data.labels import MAPILLARY_V12_NAMES, mapillary_to_train_id
from fishertune.errors import UserError

# What DESIGN section 4 says each layout looks like, as glob patterns of (images, labels).
LAYOUTS = {
    "gtav": [("images/*.png", "labels/*.png")],
    "cityscapes": [(f"leftImg8bit/{s}/*/*_leftImg8bit.png", f"gtFine/{s}/*/*_gtFine_labelTrainIds.png")
                   for s in ("train", "val")],
    "bdd100k": [(f"images/10k/{s}/*.jpg", f"labels/sem_seg/masks/{s}/*.png") for s in ("train", "val")],
    "mapillary": [(f"{s}/images/*.jpg", f"{s}/v1.2/labels/*.png") for s in ("training", "validation")],
    "acdc": [(f"rgb_anon/{c}/{s}/*/*_rgb_anon.png", f"gt/{c}/{s}/*/*_gt_labelTrainIds.png")
             for c in ("fog", "night", "rain", "snow") for s in ("train", "val")],
}


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_real_layout_and_counts(synth_root, synth_images, name):
    """Training sources (GTAV, Cityscapes train) get train_images (2 x images by default), every other
    split images (per ACDC condition)."""
    root = synth_root / name
    written = {p for p in root.rglob("*") if p.is_file()}
    listed = set()
    for image_glob, label_glob in LAYOUTS[name]:
        source = name == "gtav" or (name == "cityscapes" and "/train/" in image_glob)
        per_folder = 2 * synth_images if source else synth_images
        images, labels = sorted(root.glob(image_glob)), sorted(root.glob(label_glob))
        assert len(images) == len(labels) == per_folder, (image_glob, len(images), len(labels))
        listed |= set(images) | set(labels)
    extra = {p.relative_to(root).as_posix() for p in written - listed}
    assert extra == ({"config_v1.2.json"} if name == "mapillary" else set())


def test_name_shapes(synth_root):
    assert sorted(p.name for p in (synth_root / "gtav/images").iterdir())[:2] == ["00001.png", "00002.png"]
    city = next((synth_root / "cityscapes/leftImg8bit/val").iterdir())
    assert all(p.name.startswith(city.name + "_000000_") for p in city.iterdir())
    stems = [p.stem for p in (synth_root / "bdd100k/images/10k/train").iterdir()]
    assert all(len(s) == 17 and s[8] == "-" and int(s.replace("-", ""), 16) >= 0 for s in stems)
    keys = [p.stem for p in (synth_root / "mapillary/training/images").iterdir()]
    assert all(len(k) == 22 for k in keys) and len(set(keys)) == len(keys)
    frames = [p.name for p in (synth_root / "acdc/rgb_anon/night/val").glob("*/*")]
    assert all("_frame_" in f and f.startswith("GOPR") for f in frames)


def test_marker_records_parameters(synth_root, synth_images, synth_counts):
    marker = json.loads((synth_root / "SYNTH.json").read_text())
    assert (marker["seed"], marker["images"], marker["train_images"]) == (0, synth_images, 2 * synth_images)
    assert synth_counts["gtav"] == {"train": 2 * synth_images}
    assert synth_counts["cityscapes"] == {"train": 2 * synth_images, "val": synth_images}
    assert synth_counts["acdc"]["val/night"] == synth_images
    assert not list(synth_root.glob(".tmp-*")) and not (synth_root / synth_module.REPLACING).exists()


@pytest.mark.parametrize("name, size", [("gtav", (256, 141)), ("cityscapes", (256, 128)),
                                        ("bdd100k", (256, 144)), ("acdc", (240, 135))])
def test_sizes_keep_real_aspect_ratios(synth_root, name, size):
    image_glob, label_glob = LAYOUTS[name][0]
    for path in list((synth_root / name).glob(image_glob)) + list((synth_root / name).glob(label_glob)):
        assert Image.open(path).size == size


def test_mapillary_sizes_vary_and_stay_large_enough(synth_root):
    sizes = {Image.open(p).size for p in (synth_root / "mapillary").glob("*/images/*.jpg")}
    assert len(sizes) >= 3
    assert len({round(w / h, 2) for w, h in sizes}) >= 2
    assert min(min(w, h) for w, h in sizes) // 2 >= 64  # still >= 64 once validation is halved


def test_encodings(synth_root):
    assert Image.open(next((synth_root / "gtav/labels").iterdir())).mode == "P"
    assert Image.open(next((synth_root / "cityscapes/gtFine/val").glob("*/*.png"))).mode == "L"
    with Image.open(next((synth_root / "bdd100k/images/10k/val").iterdir())) as jpeg:
        assert jpeg.format == "JPEG"


def test_gtav_labels_hold_cityscapes_label_ids(synth_root):
    values = set()
    for path in (synth_root / "gtav/labels").iterdir():
        values |= set(np.unique(np.asarray(Image.open(path))).tolist())
    assert {7, 8, 11, 21, 23, 26} <= values  # road, sidewalk, building, vegetation, sky, car as label ids
    assert values <= set(range(34))
    assert not values & {2, 3, 5, 6}  # ids the generator never draws (rectification border, ...)


def test_mapillary_labels_use_the_66_class_ids(synth_root):
    values = set()
    for path in (synth_root / "mapillary").glob("*/v1.2/labels/*.png"):
        values |= set(np.unique(np.asarray(Image.open(path))).tolist())
    config = json.loads((synth_root / "mapillary/config_v1.2.json").read_text())
    assert [label["name"] for label in config["labels"]] == list(MAPILLARY_V12_NAMES)
    assert set(config["labels"][0]) == {"name", "readable", "color", "instances", "evaluate"}
    lut = mapillary_to_train_id(config)
    assert max(values) > 18 and max(values) < len(config["labels"])
    by_class: dict[int, set[str]] = {}
    for v in values:
        by_class.setdefault(int(lut[v]), set()).add(MAPILLARY_V12_NAMES[v])
    for cls in ("road", "sidewalk", "pole", "traffic sign"):
        assert len(by_class[CLASSES.index(cls)]) >= 2, (cls, by_class[CLASSES.index(cls)])
    assert "marking--general" in by_class[CLASSES.index("road")]
    assert {"void--unlabeled", "void--ego-vehicle"} <= by_class[255]


@pytest.mark.parametrize("name, split", [("gtav", "train"), ("cityscapes", "val"), ("bdd100k", "val"),
                                         ("mapillary", "val"), ("acdc", "val")])
def test_every_class_occurs(synth_root, name, split):
    dataset = build_dataset(name, synth_root / name, split)
    seen = np.zeros(256, dtype=bool)
    for i in range(len(dataset)):
        seen[np.unique(dataset[i]["label"])] = True
    missing = [CLASSES[c] for c in range(len(CLASSES)) if not seen[c]]
    assert not missing


def test_targets_carry_some_ignored_pixels(synth_root):
    labels = [np.asarray(Image.open(p)) for p in (synth_root / "cityscapes/gtFine/val").glob("*/*.png")]
    assert all((label == 255).any() for label in labels)  # the ego-vehicle hood, as in Cityscapes


def test_domains_look_different(synth_root):
    """Mean brightness tells dusk and night from daylight; saturation tells GTAV from Cityscapes."""

    def stats(pattern):
        images = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in synth_root.glob(pattern)]
        pixels = np.concatenate([im.reshape(-1, 3) for im in images])
        return pixels.mean(), (pixels.max(axis=1) - pixels.min(axis=1)).mean()

    gtav_b, gtav_s = stats("gtav/images/*.png")
    city_b, city_s = stats("cityscapes/leftImg8bit/*/*/*.png")
    night_b, _ = stats("acdc/rgb_anon/night/*/*/*.png")
    bdd_b, _ = stats("bdd100k/images/10k/*/*.jpg")
    assert gtav_s > 1.5 * city_s
    assert night_b < 0.4 * city_b and bdd_b < 0.8 * gtav_b


def test_same_seed_same_bytes_other_seed_other_images(tmp_path, synth_root, synth_images):
    a = synthesize(tmp_path / "a", seed=0, images=synth_images, progress=False)
    assert files(a["gtav"].parent) == files(synth_root)
    b = synthesize(tmp_path / "b", seed=1, images=1, progress=False)
    first = files(a["cityscapes"])
    other = files(b["cityscapes"])
    image = "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    assert first[image] != other[image]


def test_complete_output_is_reused(synth_root, synth_images, monkeypatch):
    monkeypatch.setattr(synth_module, "write_item", lambda *a: pytest.fail("re-rendered a complete synth"))
    roots = synthesize(synth_root, seed=0, images=synth_images, progress=False)
    assert roots == {name: synth_root / name for name in LAYOUTS}


def test_interrupted_synth_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    written = []
    real = synth_module.write_item

    def flaky(root, seed, item):
        if len(written) == 5:
            raise KeyboardInterrupt
        written.append(item)
        real(root, seed, item)

    monkeypatch.setattr(synth_module, "write_item", flaky)
    with pytest.raises(KeyboardInterrupt):
        synthesize(tmp_path, seed=0, images=1, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [synth_module.LOCK]  # the lock file only, held by nobody
    monkeypatch.setattr(synth_module, "write_item", real)
    roots = synthesize(tmp_path, seed=0, images=1, progress=False)
    assert (tmp_path / "SYNTH.json").exists() and all(r.is_dir() for r in roots.values())


def test_other_parameters_replace_an_earlier_synth(tmp_path):
    synthesize(tmp_path, seed=0, images=1, progress=False)
    synthesize(tmp_path, seed=0, images=2, progress=False)
    assert len(list((tmp_path / "gtav/images").iterdir())) == 4
    assert json.loads((tmp_path / "SYNTH.json").read_text())["images"] == 2


def test_refuses_to_replace_foreign_data(tmp_path):
    (tmp_path / "cityscapes" / "leftImg8bit").mkdir(parents=True)
    with pytest.raises(UserError, match="not written by"):
        synthesize(tmp_path, seed=0, images=1, progress=False)
    assert (tmp_path / "cityscapes" / "leftImg8bit").is_dir()


def test_two_writers_of_one_empty_folder_generate_it_once_and_never_replace_it(tmp_path, monkeypatch):
    """Two processes asking for the miniature in one empty cache (threads here: flock is per open file, so
    two threads contend as two processes do): the second waits for the first and reads its tree."""
    started, release = threading.Event(), threading.Event()
    written = []
    real = synth_module.write_item

    def slow(root, seed, item):
        written.append(item)
        started.set()
        release.wait(10)  # the first writer is in the middle of the tree while the second asks for it
        real(root, seed, item)

    monkeypatch.setattr(synth_module, "write_item", slow)
    out, results = tmp_path / "cache", {}
    threads = [threading.Thread(target=lambda k=k: results.setdefault(k, synthesize(out, images=1, progress=False,
                                                                                    workers=1)))
               for k in range(2)]
    threads[0].start()
    assert started.wait(10)
    threads[1].start()
    threads[1].join(0.5)
    assert threads[1].is_alive() and not (out / "gtav").exists()  # waiting, not writing a second tree
    release.set()
    for thread in threads:
        thread.join(30)
    assert written and len(set(written)) == len(written)  # every file rendered once, by one writer
    assert results[0] == results[1] and all(root.is_dir() for root in results[1].values())


def _class_mean_colours(looks: str, images: int = 18) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the mean colour of road, sidewalk, building, vegetation and car in the GTAV images."""
    classes = [CLASSES.index(c) for c in ("road", "sidewalk", "building", "vegetation", "car")]
    colours, labels = [], []
    for item in [i for i in synth_module.plan(0, 1, images, looks) if i.dataset == "gtav"]:
        image, ids = synth_module.render(0, item)
        train = synth_module.MAPILLARY_TO_TRAIN[ids]
        for c in classes:
            if (train == c).sum() > 20:
                colours.append(image[train == c].mean(axis=0))
                labels.append(c)
    return np.array(colours), np.array(labels)


def _nearest_mean_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out accuracy of telling a region's class from its mean colour (nearest class mean)."""
    right = 0
    for i in range(len(x)):
        rest = np.arange(len(x)) != i
        means = {c: x[rest & (y == c)].mean(axis=0) for c in np.unique(y)}
        right += min(means, key=lambda c: np.linalg.norm(x[i] - means[c])) == y[i]
    return right / len(x)


def test_shuffled_looks_keep_every_label_and_take_colour_away_as_a_clue():
    # same scenes and labels, other pixels
    for item in synth_module.plan(0, 1, 2)[:3]:
        image, ids = synth_module.render(0, item)
        shuffled, shuffled_ids = synth_module.render(0, synth_module.replace(item, looks="shuffled"))
        assert np.array_equal(ids, shuffled_ids)
        assert np.abs(image.astype(int) - shuffled).mean() > 5
    # a region's mean colour tells its class (5 classes, chance 0.2) with the classes' own looks, not shuffled
    assert _nearest_mean_accuracy(*_class_mean_colours("class")) > 0.7
    assert _nearest_mean_accuracy(*_class_mean_colours("shuffled")) < 0.4


def test_shuffled_looks_are_their_own_tree_and_a_bad_value_is_refused(tmp_path):
    synthesize(tmp_path, seed=0, images=1, train_images=1, progress=False)
    plain = files(tmp_path / "gtav")
    synthesize(tmp_path, seed=0, images=1, train_images=1, progress=False, looks="shuffled")
    assert json.loads((tmp_path / "SYNTH.json").read_text())["looks"] == "shuffled"
    shuffled = files(tmp_path / "gtav")
    assert shuffled.keys() == plain.keys()
    assert all(shuffled[k] == plain[k] for k in plain if k.startswith("labels/"))
    assert any(shuffled[k] != plain[k] for k in plain if k.startswith("images/"))
    synthesize(tmp_path, seed=0, images=1, train_images=1, progress=False)  # back to the class looks
    assert files(tmp_path / "gtav") == plain and "looks" not in json.loads((tmp_path / "SYNTH.json").read_text())
    with pytest.raises(UserError, match="--looks must be one of class, shuffled"):
        synthesize(tmp_path / "other", looks="mixed", progress=False)
