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


# ---- checkpoints: read once per run ---------------------------------------------------------------------
# The pre-flight checks each checkpoint against its backbone key by key and shape by shape, from the file's
# index alone (a safetensors header; the zip directory and pickle of torch.save's and TorchScript archives),
# on a model built on the meta device: no PyTorch warning per key, and the data left for the cell to read.
# Files in each release's layout come from fishertune.backbones.official's writers (the upstream models),
# at a mid size here (width 128, 4 blocks) and at full size in the slow test.

def _mid_variants():
    """name -> (backbone builder at a mid size, loader, writer of the matching release-layout file, file name)."""
    from fishertune.backbones import clip, dinov2, eva02, mae, official, sam
    from fishertune.backbones.timm_vit import TimmViTBackbone, timm_vit

    arch = dict(embed_dim=128, depth=4, num_heads=2)
    return {
        "dinov2-mid": (lambda img_size: TimmViTBackbone(timm_vit(img_size, 16, init_values=1e-5, **arch), "dinov2"),
                       dinov2.load_dinov2, lambda p: official.write_dinov2(p, **arch), "dinov2_mid.pth"),
        "mae-mid": (lambda img_size: mae._mae(img_size, 16, 0.1, **arch), mae.load_mae,
                    lambda p: official.write_mae(p, patch_size=14, **arch), "mae_mid.pth"),
        "eva02-mid": (lambda img_size: eva02.Eva02Backbone(eva02.eva02_model(img_size, 16, **arch)), eva02.load_eva02,
                      lambda p: official.write_eva02(p, **arch), "eva02_mid.pt"),
        "sam-mid": (lambda img_size: sam._sam(img_size, 16, 0.1, False, 64, window_size=14, global_attn_indexes=(1, 3),
                                              **arch), sam.load_sam,
                    lambda p: official.write_sam(p, global_attn_indexes=(1, 3), **arch), "sam_mid.pth"),
        "clip-mid": (lambda img_size: clip.clip_vit(img_size, 16, width=128, layers=4, heads=2, quick_gelu=True),
                     clip.load_clip, lambda p: official.write_clip(p, width=128, layers=4, text_width=64, text_layers=1),
                     "clip_mid.pt"),
        "clip-openclip-mid": (lambda img_size: clip.clip_vit(img_size, 16, width=128, layers=4, heads=2,
                                                             quick_gelu=False), clip.load_clip,
                              lambda p: official.write_clip(p, quick_gelu=False, torchscript=False, width=128,
                                                            layers=4, text_width=64, text_layers=1),
                              "clip_mid.safetensors"),
    }


@pytest.fixture(scope="module")
def mid_checkpoints(tmp_path_factory):
    """name -> path of a release-layout file for each mid-size variant (written once)."""
    folder = tmp_path_factory.mktemp("weights")
    return {name: writer(folder / file) for name, (_, _, writer, file) in _mid_variants().items()}


def _bytes_read() -> int:
    """Bytes this process has read through read(2) so far (memory-mapped pages are not counted)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="reads /proc/self/io (Linux)")
def test_preflight_checks_every_key_from_the_files_index_without_warnings_or_reading_the_data(
        mid_checkpoints, tmp_path, monkeypatch, recwarn):
    import warnings

    from fishertune.backbones import BACKBONES, BackboneSpec
    from fishertune.runner.manifest import load_manifest
    from fishertune.runner.preflight import weights_problems

    for name, (fn, loader, _, file) in _mid_variants().items():
        monkeypatch.setitem(BACKBONES._items, name, BackboneSpec(name, name.split("-")[0], fn, file, loader))
    names = list(mid_checkpoints)
    manifest = tmp_path / "m.yaml"
    manifest.write_text("version: 1\nname: mid\ntable: table1\nmethods: [freeze]\n"
                        f"backbones: [{', '.join(names)}]\n"
                        f"weights: {{{', '.join(f'{n}: {p}' for n, p in mid_checkpoints.items())}}}\n")
    lm = load_manifest(manifest)
    warnings.simplefilter("always")
    assert weights_problems(lm, lm.cells()) == []  # the first call also imports what the loaders import
    assert not recwarn.list, [str(w.message)[:200] for w in recwarn.list]
    before = _bytes_read()
    assert weights_problems(lm, lm.cells()) == []
    read = _bytes_read() - before
    total = sum(p.stat().st_size for p in mid_checkpoints.values())
    assert total > 50e6 and read < 0.05 * total, (read, total)  # the indexes only (measured: under 1%)

    # the check still compares every key and shape: the file of another depth is one line naming it
    deeper = tmp_path / "deeper.pth"
    from fishertune.backbones import official

    official.write_dinov2(deeper, embed_dim=128, depth=5, num_heads=2)
    lm.manifest.weights["dinov2-mid"] = str(deeper)
    (problem,) = weights_problems(lm, [c for c in lm.cells() if c.backbone == "dinov2-mid"])
    assert str(deeper) in problem and "14 unexpected: blocks.4." in problem


@pytest.mark.slow
def test_preflight_of_table1_with_full_size_release_files_prints_no_line_per_key(tmp_path):
    """Table 1's five checkpoints at full size (7 GB, written in about a minute): the pre-flight says only
    what is missing (the data), a line each, and no PyTorch warning."""
    import os
    import subprocess
    import sys

    from fishertune.backbones import official
    from fishertune.runner.manifest import load_manifest

    table1 = Path(__file__).resolve().parents[1] / "benchmarks" / "table1.yaml"
    for name in load_manifest(table1).manifest.backbones:
        official.write_official(name, tmp_path / "weights")
    out = subprocess.run([sys.executable, "-m", "fishertune.cli", "reproduce", str(table1), "--device", "cpu",
                          "--results", str(tmp_path / "runs")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "FISHERTUNE_WEIGHTS": str(tmp_path / "weights"),
                              "FISHERTUNE_DATA": str(tmp_path / "data"), "TQDM_DISABLE": "1"})
    lines = out.stderr.splitlines()
    assert out.returncode == 2
    assert [ln.split(" is expected at")[0] for ln in lines[:-1]] == [
        "data: gtav", "data: cityscapes", "data: bdd100k", "data: mapillary"], out.stderr[-2000:]
    assert "4 problem(s) before any training" in lines[-1]
