"""--subset N: deterministic, class-balanced subsets; results and tables that say they are subsets."""

import json
import os

import numpy as np

from fishertune.cli import main
from fishertune.data import build_dataset
from fishertune.data.subset import balanced_indices, class_balanced_subset, class_presence


def test_greedy_selection_takes_the_rare_classes_a_random_draw_misses():
    rng = np.random.default_rng(0)
    presence = np.zeros((200, 19), dtype=bool)
    presence[:, :5] = rng.random((200, 5)) < 0.9  # common classes
    presence[137, 16] = True  # "train" in one image of 200
    presence[42, 17] = presence[43, 17] = True  # "motorcycle" in two
    chosen = balanced_indices(presence, 8, seed=3)
    assert len(chosen) == len(set(chosen)) == 8 and chosen == sorted(chosen)
    assert presence[chosen].any(axis=0)[[16, 17]].all()
    assert balanced_indices(presence, 8, seed=3) == chosen  # deterministic
    assert balanced_indices(presence, 300, seed=3) == list(range(200))  # n >= size: everything


def test_every_class_of_the_data_set_is_in_a_subset_as_large_as_the_class_count(synth_root):
    gtav = build_dataset("gtav", synth_root / "gtav", "train")
    presence = class_presence(gtav, progress=False)
    sub = class_balanced_subset(gtav, 19, seed=0, progress=False)
    assert len(sub) == min(19, len(gtav))
    covered = presence[sub.indices].any(axis=0)
    assert (covered == presence.any(axis=0)).all()
    # the view reads exactly the reader's images
    assert sub[0]["path"] == gtav[sub.indices[0]]["path"]


def test_class_presence_is_cached_and_read_again_when_a_label_changes(synth_root, tmp_path, monkeypatch):
    city = build_dataset("cityscapes", synth_root / "cityscapes", "val")
    first = class_presence(city, cache=tmp_path, progress=False)
    assert len(list((tmp_path / "class-presence").glob("*.npy"))) == 1

    def no_reading(i):
        raise AssertionError("labels read again although the cache is valid")

    monkeypatch.setattr(city, "read_raw", no_reading)
    assert (class_presence(city, cache=tmp_path, progress=False) == first).all()
    monkeypatch.undo()
    label = city.pairs[0][1]
    st = os.stat(label)  # a changed file (its modification time) makes a new listing
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    class_presence(city, cache=tmp_path, progress=False)
    assert len(list((tmp_path / "class-presence").glob("*.npy"))) == 2


def test_acdc_subset_takes_n_per_condition(synth_root):
    acdc = build_dataset("acdc", synth_root / "acdc", "val")
    sub = class_balanced_subset(acdc, 2, seed=1, progress=False)
    assert sorted(sub.scan.groups) == sorted(["fog", "night", "rain", "snow"] * 2)
    assert all(acdc.scan.groups[i] == g for i, g in zip(sub.indices, sub.scan.groups))


def test_a_subset_run_is_stored_apart_and_tabled_as_a_subset(tmp_path, mini_manifest, capsys):
    manifest = mini_manifest("quick", "methods: [freeze]\ntrain: {iterations: 3}\n")
    assert main(["run", str(manifest), "--subset", "3", "--results", str(tmp_path / "runs"), "--no-render"]) == 0
    (path,) = (tmp_path / "runs" / "quick-subset3").glob("*.json")
    r = json.loads(path.read_text())
    assert r["manifest"]["data_subset"] == 3 and r["config"]["data"]["subset"] == 3
    assert r["train"]["source_images"] == 3 and all(t["num_images"] == 3 for t in r["targets"].values())
    assert main(["render", "table1", "--results", str(tmp_path / "runs"), "--out", str(tmp_path / "t")]) == 0
    assert "SUBSET: 3" in (tmp_path / "t" / "table1.md").read_text()
    assert main(["run", str(manifest), "--subset", "0", "--dry-run"]) == 2
    assert "subset" in capsys.readouterr().err


def test_the_selection_shows_no_progress_bar_when_bars_are_off(synth_root, monkeypatch, capsys):
    city = build_dataset("cityscapes", synth_root / "cityscapes", "val")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    class_presence(city, progress=True)
    monkeypatch.delenv("TQDM_DISABLE")
    class_presence(city, progress=True)  # stderr is not a terminal here (captured)
    assert capsys.readouterr().err == ""
