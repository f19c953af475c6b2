"""Runs verify every data tree before training: a broken tree stops the run with one line and exit 2,
and nothing is written."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fishertune.cli import main

def _first(root: Path, pattern: str) -> Path:
    return sorted(root.glob(pattern))[0]


def _delete_gtav_label(root):
    _first(root / "gtav" / "labels", "*.png").unlink()


def _delete_cityscapes_val_label(root):
    _first(root / "cityscapes" / "gtFine" / "val", "*/*_gtFine_labelTrainIds.png").unlink()


def _mapillary_id_outside_66(root):
    path = _first(root / "mapillary" / "validation" / "v1.2" / "labels", "*.png")
    label = np.array(Image.open(path))
    label[0, 0] = 70
    Image.fromarray(label).save(path)


def _bdd_label_of_wrong_size(root):
    path = _first(root / "bdd100k" / "labels" / "sem_seg" / "masks" / "val", "*.png")
    Image.open(path).resize((33, 21), Image.NEAREST).save(path)


def _truncated_bdd_image(root):
    path = _first(root / "bdd100k" / "images" / "10k" / "val", "*.jpg")
    path.write_bytes(path.read_bytes()[:200])


CASES = [
    (_delete_gtav_label, "images without label"),
    (_delete_cityscapes_val_label, "images without label"),
    (_mapillary_id_outside_66, "values outside the classes"),
    (_bdd_label_of_wrong_size, "size differs"),
    (_truncated_bdd_image, "unreadable images"),
]


@pytest.mark.parametrize("breakage, problem", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_a_run_refuses_to_start_on_a_broken_tree(breakage, problem, synth_root, tmp_path, monkeypatch, capsys,
                                                 mini_manifest):
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    breakage(data)
    manifest = mini_manifest("broken", "methods: [freeze]\ntrain: {iterations: 2}\n", data=f"{{kind: real, root: {data}}}")
    results = tmp_path / "runs"
    assert main(["run", str(manifest), "--results", str(results), "--no-render"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and problem in err and "fishertune data verify" in err, err
    assert not list(results.rglob("*.json"))


def test_a_passed_check_is_remembered_for_the_same_files_only(synth_root, tmp_path, monkeypatch):
    from fishertune.data import verify

    calls = []
    real = verify.verify_dataset
    monkeypatch.setattr(verify, "verify_dataset", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    data = tmp_path / "data"
    shutil.copytree(synth_root / "bdd100k", data / "bdd100k")
    shutil.copy(synth_root / "SYNTH.json", data / "SYNTH.json")
    verify.preflight("bdd100k", data / "bdd100k", "val", tmp_path / "cache", progress=False)
    verify.preflight("bdd100k", data / "bdd100k", "val", tmp_path / "cache", progress=False)
    assert calls == ["bdd100k"]  # the second run trusts the first check
    _bdd_label_of_wrong_size(data)  # a changed file is checked again, and fails
    with pytest.raises(verify.UserError, match="size differs"):
        verify.preflight("bdd100k", data / "bdd100k", "val", tmp_path / "cache", progress=False)
    assert calls == ["bdd100k", "bdd100k"]
