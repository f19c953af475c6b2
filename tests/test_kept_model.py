"""Issue 20: a finished cell keeps its trained model; `export` packages it and `predict` reproduces the
predictions the cell saved; a pretrained file other than the one trained on is refused in one line.

The cells read a tiny DINOv2 checkpoint the tests write (``weights:`` in the manifest, the path a
real run's file takes), so they need neither the shipped tiny models nor any download."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fishertune.backbones import BACKBONES, build_backbone
from fishertune.cli import main
from fishertune.data.labels import colourize
from fishertune.report.params import parameter_rows
from fishertune.runner import run as runner
from fishertune.runner.manifest import load_manifest
from fishertune.runner.model import INDICES, VALUES, load_model, model_dir
from fishertune.runner.run import run_manifest
from fishertune.runner.store import ResultStore, iter_results

#: the pre-flight's fit check of a checkpoint on the meta device copies into meta tensors, which torch notes
pytestmark = pytest.mark.filterwarnings("ignore:for .* copying from a non-meta parameter")
PROTOCOL = Path(__file__).resolve().parents[1] / "benchmarks" / "mini" / "protocol.yaml"
#: one method of each kind of kept state: the whole backbone, a parametrization, tokens with the head's
#: query hook, and two sparse deltas (a fixed mask; FisherTune's growing one)
METHODS = ("full", "lora", "rein", "childtune", "fishertune")
MANIFEST = """\
version: 1
name: {name}
table: table1
include: {protocol}
backbones: [dinov2-tiny]
methods: {methods}
method_configs: {{fishertune: {{estimator: direct, images: 4, schedule: growing, cache: false}}}}
targets: [cityscapes]
train: {{iterations: {iterations}}}
execution: {{jobs: 1{execution}}}
data: {{root: {root}, synth_images: {images}}}
"""


def _manifest(folder: Path, name: str, synth_root: Path, synth_images: int, methods=METHODS, extra: str = "",
              iterations: int = 2, execution: str = "") -> Path:
    """A manifest of ``methods`` on dinov2-tiny whose cells run in this process; ``extra`` adds fields,
    ``execution`` fields of that section (e.g. ``", keep_model: false"``)."""
    path = folder / f"{name}.yaml"
    path.write_text(MANIFEST.format(name=name, protocol=PROTOCOL, methods=f"[{', '.join(methods)}]", root=synth_root,
                                    images=synth_images, iterations=iterations, execution=execution) + extra)
    return path


def _tiny_checkpoint(path: Path, seed: int) -> Path:
    """A dinov2-tiny checkpoint in DINOv2's own layout (its loader's), drawn from ``seed``."""
    vit = build_backbone("dinov2-tiny", pretrained=False, seed=seed, img_size=64).vit
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def kept(tmp_path_factory, synth_root, synth_images):
    """The five cells run once (2 iterations, in this process) from a pretrained file, with each trained
    model's state as training left it."""
    tmp = tmp_path_factory.mktemp("kept")
    weights = _tiny_checkpoint(tmp / "dinov2-tiny-7.safetensors", 7)
    lm = load_manifest(_manifest(tmp, "kept", synth_root, synth_images, extra=f"weights: {{dinov2-tiny: {weights}}}\n"))
    trained = {}
    real_save = runner.save_model

    def save(folder, segmentor, method, card):
        trained[card["cell_id"]] = {k: v.detach().clone() for k, v in segmentor.state_dict().items()}
        return real_save(folder, segmentor, method, card)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "save_model", save)
        assert {s for _, s in run_manifest(lm, str(tmp / "runs"), progress=False)} == {"done"}
    store = ResultStore(tmp / "runs", lm.results_name)
    return {"tmp": tmp, "lm": lm, "store": store, "trained": trained, "weights": weights,
            "cells": {c.method: (c, store.read(c.id)) for c in lm.cells()}}


def _tensor_bytes(path: Path) -> int:
    """A safetensors file's size without its header (8 bytes of length, then the JSON header)."""
    data = path.read_bytes()
    return len(data) - 8 - int.from_bytes(data[:8], "little")


def test_every_kind_of_method_is_rebuilt_bit_for_bit_from_its_kept_model(kept):
    for method, (cell, result) in kept["cells"].items():
        folder = kept["store"].dir / result["model"]["path"]
        assert folder == model_dir(kept["store"].path(cell.id)) and folder.is_dir()
        model, card = load_model(folder, torch.device("cpu"))
        state, trained = model.state_dict(), kept["trained"][cell.id]
        assert set(state) == set(trained), method
        different = [k for k in state if not torch.equal(state[k], trained[k])]
        assert not different, (method, different[:3])
        assert card["cell_id"] == cell.id and card["config"] == result["config"]
        assert card["metrics"]["cityscapes"]["per_class_iou"] == result["targets"]["cityscapes"]["per_class_iou"]
        assert card["git"] == result["git"] and card["versions"] == result["versions"]
        weights = kept["weights"]
        assert (card["pretrained"]["file"], card["pretrained"]["bytes"]) == (weights.name, weights.stat().st_size)
        assert card["pretrained"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_the_kept_file_holds_what_trained_and_the_head_and_nothing_else(kept):
    pretrained = {f"backbone.{k}" for k in build_backbone("dinov2-tiny", pretrained=False, seed=0,
                                                          img_size=64).state_dict()}
    for method, (cell, result) in kept["cells"].items():
        tensors = load_file(str(kept["store"].dir / result["model"]["path"] / "model.safetensors"))
        names = set(tensors)
        head = {n for n in names if n.startswith("head.")}
        backbone = names - head
        trained = kept["trained"][cell.id]
        assert head == {n for n in trained if n.startswith("head.")}  # the whole head (it always trains)
        counted = result["params"]["backbone_trainable"]  # the paper's column: what trains in the backbone
        if method in ("childtune", "fishertune"):  # the chosen elements only: indices and values
            assert backbone and all(n.endswith((INDICES, VALUES)) for n in backbone)
            assert {n.rsplit("@", 1)[0] for n in backbone} <= pretrained
            values = sum(tensors[n].numel() for n in backbone if n.endswith(VALUES))
            assert values == counted == result["model"]["sparse_elements"]
            assert all(tensors[n].dtype == torch.int32 for n in backbone if n.endswith(INDICES))
        else:  # dense: exactly the parameters that trained; the frozen pretrained ones only for full
            assert sum(tensors[n].numel() for n in backbone) == counted > 0
            assert (backbone == pretrained) if method == "full" else not backbone & pretrained
        file = kept["store"].dir / result["model"]["path"] / "model.safetensors"
        assert result["model"]["bytes"] == file.stat().st_size


def test_kept_size_from_the_meta_device_counts_is_the_files_tensor_bytes(kept):
    """`fishertune params` states the kept size of the full-size models from counts on the meta device; on
    the tiny model the same formula gives exactly the bytes of tensors in each file that was written."""
    import yaml

    head = yaml.safe_load(PROTOCOL.read_text())["head"]
    rows = parameter_rows(["dinov2-tiny"], list(METHODS), head=head["name"], head_config=head["config"], img_size=64)
    for row in rows:
        _, result = kept["cells"][row["method"]]
        path = kept["store"].dir / result["model"]["path"] / "model.safetensors"
        assert row["kept_bytes"] == _tensor_bytes(path), row["method"]


def test_export_then_predict_gives_exactly_the_predictions_the_cell_saved(kept, capsys):
    tmp = kept["tmp"]
    for method, (cell, result) in kept["cells"].items():
        package = tmp / "export" / method
        assert main(["export", cell.id, "--results", str(tmp / "runs"), "--out", str(package)]) == 0
        assert sorted(p.name for p in package.iterdir()) == ["README.md", "card.json", "model.safetensors"]
        readme = (package / "README.md").read_text()
        assert cell.id in readme and "the generated miniature" in readme
        assert kept["weights"].name in readme and f"fishertune predict {package}" in readme
        saved = result["predictions"]["cityscapes"]
        images = [p["image"] for p in saved]
        out = tmp / "pred" / method
        assert main(["predict", str(package), *images, "--out", str(out), "--target", "cityscapes"]) == 0
        for rec in saved:
            stem = Path(rec["image"]).stem
            with Image.open(kept["store"].dir / rec["prediction"]) as im:
                expected = np.array(im)
            with Image.open(out / f"{stem}_trainid.png") as im:
                assert im.mode == "L"
                ids = np.array(im)
            assert ids.shape == expected.shape and (ids == expected).all(), (method, stem)
            with Image.open(out / f"{stem}_color.png") as im:
                assert (np.array(im) == colourize(ids)).all()
            with Image.open(out / f"{stem}_overlay.png") as im, Image.open(rec["image"]) as src:
                overlay, image = np.array(im).astype(int), np.array(src.convert("RGB")).astype(int)
                assert np.abs(overlay - (image + colourize(ids)) / 2).max() <= 1  # alpha 0.5
    capsys.readouterr()


def test_a_folder_of_images_of_any_size_is_predicted_with_the_relative_paths_kept(kept, tmp_path):
    _, result = kept["cells"]["lora"]
    folder = kept["store"].dir / result["model"]["path"]
    rng = np.random.default_rng(0)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (37, 300, 3), dtype=np.uint8)).save(tmp_path / "in" / "wide.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "in" / "sub" / "small.png")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    assert main(["predict", str(folder), str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["sub/small_color.png", "sub/small_overlay.png", "sub/small_trainid.png",
                       "wide_color.png", "wide_overlay.png", "wide_trainid.png"]
    with Image.open(tmp_path / "out" / "wide_trainid.png") as im:
        assert im.size == (300, 37)  # the image's own size, whatever size it was predicted at


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fishertune: error: ") and "Traceback" not in err, err
    return lines[0]


def test_bad_export_and_predict_requests_are_one_line_and_exit_2(kept, tmp_path, capsys):
    runs = str(kept["tmp"] / "runs")
    cell, result = kept["cells"]["lora"]
    folder = kept["store"].dir / result["model"]["path"]
    assert main(["export", "no-such-cell", "--results", runs, "--out", str(tmp_path / "x")]) == 2
    assert "no cell id" in _one_error(capsys)
    assert main(["export", "dinov2-tiny--*", "--results", runs, "--out", str(tmp_path / "x")]) == 2
    assert "matches 5 results" in _one_error(capsys)
    assert main(["export", str(folder / "card.json"), "--out", str(tmp_path / "x")]) == 2  # a card, not a result
    assert "not a valid result file" in _one_error(capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert main(["export", cell.id, "--results", runs, "--out", str(tmp_path / "full")]) == 2
    assert "not an empty directory" in _one_error(capsys)
    image = result["predictions"]["cityscapes"][0]["image"]
    assert main(["predict", str(tmp_path), image, "--out", str(tmp_path / "p")]) == 2
    assert "not a kept model" in _one_error(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(folder), str(tmp_path / "empty"), "--out", str(tmp_path / "p")]) == 2
    assert "no images" in _one_error(capsys)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG but not really")
    assert main(["predict", str(folder), str(tmp_path / "bad.png"), "--out", str(tmp_path / "p")]) == 2
    assert "not a readable image" in _one_error(capsys)
    assert main(["predict", str(folder), image, "--out", str(tmp_path / "p"), "--target", "acdc"]) == 2
    assert "evaluated on cityscapes" in _one_error(capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / "p").exists()
    assert list((tmp_path / "full").iterdir()) == [tmp_path / "full" / "keep.txt"]
    # a kept file that changed after the run is refused, by export and by predict
    damaged = tmp_path / "damaged"
    assert main(["export", cell.id, "--results", runs, "--out", str(damaged)]) == 0
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (damaged / "model.safetensors").write_bytes(bytes(data))
    assert main(["predict", str(damaged), image, "--out", str(tmp_path / "p")]) == 2
    assert "sha256 is not the one its card records" in _one_error(capsys)
    assert not (tmp_path / "p").exists()


def test_a_finished_cell_is_reused_only_with_the_weights_file_it_trained_from(kept, tmp_path, capsys, synth_root,
                                                                               synth_images):
    """A cell's id holds its config, not the checkpoint a manifest's ``weights`` names: rerunning into the same
    results with another file for the backbone is refused in one line before anything runs; the same bytes
    under another path are the same weights, and the finished cells are skipped."""
    runs = kept["tmp"] / "runs"
    _, result = kept["cells"]["lora"]
    assert result["weights_file"]["sha256"] == hashlib.sha256(kept["weights"].read_bytes()).hexdigest()
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    other = _tiny_checkpoint(tmp_path / "dinov2-tiny-8.safetensors", 8)
    changed = _manifest(tmp_path, "kept", synth_root, synth_images, extra=f"weights: {{dinov2-tiny: {other}}}\n")
    assert main(["run", str(changed), "--results", str(runs), "--no-render"]) == 2
    line = _one_error(capsys)
    assert "finished with the weights" in line and str(kept["weights"]) in line and str(other) in line
    # nothing ran, nothing was written
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == before
    copy = tmp_path / "moved" / kept["weights"].name
    copy.parent.mkdir()
    shutil.copyfile(kept["weights"], copy)
    moved = _manifest(tmp_path, "kept", synth_root, synth_images, extra=f"weights: {{dinov2-tiny: {copy}}}\n")
    assert {s for _, s in run_manifest(load_manifest(moved), str(runs), progress=False)} == {"skipped"}
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == before


def test_model_cards_are_never_taken_for_results(kept):
    paths = [p for p, _ in iter_results(kept["tmp"] / "runs")]
    assert len(paths) == len(METHODS) and all(p.suffix == ".json" and p.parent == kept["store"].dir for p in paths)


def test_keep_model_false_keeps_none_and_export_says_why(tmp_path, synth_root, synth_images, capsys):
    manifest = _manifest(tmp_path, "nokeep", synth_root, synth_images, ("freeze",), "pretrained: false\n",
                         execution=", keep_model: false")
    lm = load_manifest(manifest)
    (cell,) = lm.cells()
    assert run_manifest(lm, str(tmp_path / "runs"), progress=False) == [(cell, "done")]
    store = ResultStore(tmp_path / "runs", lm.results_name)
    assert store.read(cell.id)["model"] is None and not model_dir(store.path(cell.id)).exists()
    assert main(["export", str(store.path(cell.id)), "--out", str(tmp_path / "x")]) == 2
    assert "execution.keep_model: false" in _one_error(capsys)


def test_predict_refuses_a_pretrained_file_other_than_the_one_trained_on(kept, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FISHERTUNE_WEIGHTS", raising=False)
    cell, result = kept["cells"]["lora"]
    package = tmp_path / "pkg"
    assert main(["export", cell.id, "--results", str(kept["tmp"] / "runs"), "--out", str(package)]) == 0
    rec = result["predictions"]["cityscapes"][0]
    image, good = rec["image"], kept["weights"]

    # the recorded file (still there) and the same bytes elsewhere are accepted, with the saved predictions
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(good.read_bytes())
    for weights in ([], ["--weights", str(copy)]):
        assert main(["predict", str(package), image, "--out", str(tmp_path / "p"), *weights]) == 0
        with Image.open(tmp_path / "p" / f"{Path(image).stem}_trainid.png") as a, \
                Image.open(kept["store"].dir / rec["prediction"]) as b:
            assert (np.array(a) == np.array(b)).all()
    capsys.readouterr()
    # same size, other weights: refused by its hash; another size: refused by its size
    other = _tiny_checkpoint(tmp_path / "other.safetensors", 8)
    assert other.stat().st_size == good.stat().st_size
    assert main(["predict", str(package), image, "--out", str(tmp_path / "q"), "--weights", str(other)]) == 2
    line = _one_error(capsys)
    assert "sha256" in line and good.name in line and str(other) in line
    short = tmp_path / "short.safetensors"
    save_file({"x": torch.zeros(3)}, str(short))
    assert main(["predict", str(package), image, "--out", str(tmp_path / "q"), "--weights", str(short)]) == 2
    line = _one_error(capsys)
    assert "bytes" in line and f"{good.stat().st_size:,}" in line
    assert not (tmp_path / "q").exists()


def test_a_backbone_drawn_from_its_seed_is_drawn_again_and_refused_when_the_draw_changed(tmp_path, synth_root,
                                                                                       synth_images, capsys,
                                                                                       monkeypatch):
    """A variant without a pretrained file (what the tiny ones were before they shipped files) is drawn
    from the cell's seed: the card says so and predict draws it again; a changed draw, or the variant
    gaining a file, is refused in one line."""
    monkeypatch.delenv("FISHERTUNE_WEIGHTS", raising=False)
    spec = BACKBONES.get("dinov2-tiny")
    monkeypatch.setitem(BACKBONES._items, "dinov2-tiny", dataclasses.replace(spec, weights=None, loader=None,
                                                                             shipped=False))
    lm = load_manifest(_manifest(tmp_path, "seeded", synth_root, synth_images, ("lora",), iterations=1))
    (cell,) = lm.cells()
    run_manifest(lm, str(tmp_path / "runs"), progress=False)
    result = ResultStore(tmp_path / "runs", lm.results_name).read(cell.id)
    folder = tmp_path / "runs" / lm.results_name / result["model"]["path"]
    card = json.loads((folder / "card.json").read_text())
    assert card["pretrained"]["file"] is None and card["pretrained"]["seed"] == 42
    rec = result["predictions"]["cityscapes"][0]
    assert main(["predict", str(folder), rec["image"], "--out", str(tmp_path / "p")]) == 0
    with Image.open(tmp_path / "p" / f"{Path(rec['image']).stem}_trainid.png") as a, \
            Image.open(tmp_path / "runs" / lm.results_name / rec["prediction"]) as b:
        assert (np.array(a) == np.array(b)).all()
    capsys.readouterr()

    def drawn_otherwise(**kwargs):  # the same architecture, initialised by other code
        model = spec.fn(**kwargs)
        with torch.no_grad():
            model.vit.cls_token.add_(1.0)
        return model

    patched = BACKBONES.get("dinov2-tiny")
    monkeypatch.setitem(BACKBONES._items, "dinov2-tiny", dataclasses.replace(patched, fn=drawn_otherwise))
    assert main(["predict", str(folder), rec["image"], "--out", str(tmp_path / "q")]) == 2
    line = _one_error(capsys)
    assert "drawn from seed 42 is not the backbone this model was trained on" in line and "commit" in line
    monkeypatch.setitem(BACKBONES._items, "dinov2-tiny", spec)  # the variant as it is: with a pretrained file
    assert main(["predict", str(folder), rec["image"], "--out", str(tmp_path / "q")]) == 2
    line = _one_error(capsys)
    assert "drawn at random from seed 42" in line and spec.weights in line
    assert not (tmp_path / "q").exists()


def test_the_report_of_a_run_folder_shows_every_cell_with_its_kept_model(kept, tmp_path):
    import re

    from fishertune.report.html import write_reports

    (page,) = write_reports(kept["store"].dir, tmp_path / "report")
    text = page.read_text()
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', text, re.S).group(1))
    assert {c["cell_id"]: c["model"]["path"] for c in data["cells"]} == {
        c.id: f"{c.id}.model" for c, _ in kept["cells"].values()}
    figures = re.findall(r'<img alt="([^"]+)"', text)
    assert figures[0] == "training-loss" and "qualitative-dinov2-tiny-cityscapes" in figures
