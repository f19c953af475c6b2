"""Figures (issue 8): every plot drawn from hand-made results is a real picture (PNG and PDF); the
prediction the runner saves is exactly what evaluation scores; the palette; the saved PNGs round-trip."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fishertune.data import CLASSES, NUM_CLASSES
from fishertune.engine.evaluate import evaluate, predict
from fishertune.engine.metrics import confusion_matrix
from fishertune.errors import UserError
from fishertune.report.plots import METHOD_COLOURS, colourize, colours, plot_results
from fishertune.runner.run import save_predictions

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------- fixtures


def _cityscapes_tree(root: Path, n: int = 2, size=(64, 32)) -> list[tuple[Path, Path]]:
    """A tiny Cityscapes val split in its real layout: random images, labels of stripes of train ids."""
    pairs = []
    for i in range(n):
        img = root / "leftImg8bit" / "val" / "city" / f"city_{i:06d}_000019_leftImg8bit.png"
        lab = root / "gtFine" / "val" / "city" / f"city_{i:06d}_000019_gtFine_labelTrainIds.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        lab.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(RNG.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(img)
        label = (np.arange(size[0])[None, :].repeat(size[1], 0) // 4 % NUM_CLASSES).astype(np.uint8)
        label[:3] = 255
        Image.fromarray(label).save(lab)
        pairs.append((img, lab))
    return pairs


def _result(table: str, name: str, backbone: str, method: str, targets: list[str], source: str, params: int,
            miou_base: float) -> dict:
    per_target = {}
    for k, t in enumerate(targets):
        ious = {c: float(miou_base + 3 * k + (i * 7 + len(method) * 5) % 40) for i, c in enumerate(CLASSES)}
        ious["train"] = None  # a class without IoU
        vals = [v for v in ious.values() if v is not None]
        per_target[t] = {"miou": sum(vals) / len(vals), "per_class_iou": ious}
    agg = sum(t["miou"] for t in per_target.values()) / len(per_target)
    cell_id = f"{backbone}--{method}--{source}--0123456789"
    return {"schema": 1, "status": "done", "cell_id": cell_id,
            "manifest": {"path": f"benchmarks/mini/{table}.yaml", "name": name, "version": 1, "table": table,
                         "data_kind": "miniature", "data_subset": None},
            "backbone": backbone, "method": method, "row": method,
            "config": {"source": source, "targets": targets,
                       "data": {"kind": "miniature", "synth_seed": 0, "synth_images": 12}},
            "targets": per_target, "aggregate": {"name": "mean_over_targets", "miou": agg},
            "params": {"backbone_trainable": params, "backbone_total": 236033}}


PARAMS = {"full": 236033, "freeze": 0, "lora": 9216, "rein": 18881, "fishertune": 11800}


def _write(results: Path, r: dict) -> Path:
    path = results / r["manifest"]["name"] / f"{r['cell_id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r))
    return path


def _check_png(path: Path, min_w: int = 800, min_h: int = 400) -> None:
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    h, w = rgb.shape[:2]
    assert w >= min_w and h >= min_h, (path, w, h)
    assert rgb.std() > 20, path  # not blank
    distinct = np.unique(rgb.reshape(-1, 3)[::7], axis=0)
    assert len(distinct) > 30, (path, len(distinct))


def _check_pdf(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"%PDF"), path
    assert len(re.findall(rb"/Type\s*/Page\b(?!s)", data)) >= 1, path


# ------------------------------------------------------------------------------- (a) the figures


def test_every_figure_of_a_table1_and_a_table2_manifest_is_a_real_png_and_pdf(tmp_path):
    results = tmp_path / "runs"
    data = tmp_path / "data" / "cityscapes"
    pairs = _cityscapes_tree(data)
    # Table 1-like: GTAV -> three targets, two families (one with paper rows, DINOv2 without)
    for bb, base in (("clip-tiny", 8.0), ("dinov2-tiny", 10.0)):
        for m in ("full", "freeze", "lora", "rein", "fishertune"):
            r = _result("table1", "t1", bb, m, ["cityscapes", "bdd100k", "mapillary"], "gtav", PARAMS[m], base)
            if bb == "dinov2-tiny" and m in ("freeze", "rein", "fishertune"):
                path = results / "t1" / f"{r['cell_id']}.json"
                kept = [(i, RNG.integers(0, NUM_CLASSES, (32, 64), dtype=np.uint8)) for i in range(len(pairs))]
                ds = type("DS", (), {"pairs": pairs, "name": "cityscapes", "root": data, "split": "val"})()
                r["predictions"] = {"cityscapes": save_predictions(path, "cityscapes", ds, kept)}
                if m == "fishertune":  # run with another data root: the same images, read from elsewhere
                    for rec in r["predictions"]["cityscapes"]:
                        rec["image"] = "/elsewhere/" + Path(rec["image"]).name
            _write(results, r)
    # Table 2-like: Cityscapes -> BDD100K, ACDC, both families of the paper's Table 2
    for bb in ("eva02-tiny", "dinov2-tiny"):
        for m in ("full", "freeze", "rein", "fishertune"):
            _write(results, _result("table2", "t2", bb, m, ["bdd100k", "acdc"], "cityscapes", PARAMS[m], 5.0))
    messages = []
    out = tmp_path / "plots"
    written = plot_results(results, out, say=messages.append)
    names = sorted(p.name for p in written)
    expected = {"t1": ["miou-vs-params", "qualitative-dinov2-tiny-cityscapes"],
                "t2": ["miou-vs-params"] + [f"per-class-{t}-{b}" for t in ("bdd100k", "acdc")
                                            for b in ("eva02-tiny", "dinov2-tiny")]}
    assert names == sorted(f"{s}.{ext}" for stems in expected.values() for s in stems for ext in ("png", "pdf"))
    for folder, stems in expected.items():
        for s in stems:
            _check_png(out / folder / f"{s}.png")
            _check_pdf(out / folder / f"{s}.pdf")
    assert not list(out.rglob(".*"))  # no temporary files left behind
    # t1's chosen dinov2-tiny cells had their predictions; t2's cells had none, and that is said
    assert messages and all(m.startswith("t2: ") for m in messages), messages


def test_qualitative_figure_lists_cells_without_predictions_and_how_to_get_them(tmp_path):
    results = tmp_path / "runs"
    for m in ("freeze", "rein"):
        _write(results, _result("table1", "t1", "dinov2-tiny", m, ["cityscapes"], "gtav", PARAMS[m], 9.0))
    messages = []
    written = plot_results(results, tmp_path / "plots", "t1", say=messages.append)
    assert [p.name for p in written] == ["miou-vs-params.png", "miou-vs-params.pdf"]
    text = "\n".join(messages)
    assert "dinov2-tiny--freeze--gtav--0123456789" in text and "dinov2-tiny--rein--gtav--0123456789" in text
    assert "rm " in text and "fishertune run benchmarks/mini/table1.yaml --only" in text


def test_mixed_results_and_unknown_choices_are_refused(tmp_path):
    results = tmp_path / "runs"
    _write(results, _result("table1", "a", "clip-tiny", "freeze", ["cityscapes"], "gtav", 0, 9.0))
    _write(results, _result("table1", "b", "clip-tiny", "rein", ["cityscapes"], "gtav", 18881, 9.0))
    with pytest.raises(UserError, match="--manifest"):
        plot_results(results, tmp_path / "plots")
    with pytest.raises(UserError, match="--backbone"):
        plot_results(results, tmp_path / "plots", "a", backbone="sam-tiny")
    with pytest.raises(UserError, match="--methods"):
        plot_results(results, tmp_path / "plots", "a", methods=["nosuchrow"])


def _has_colour(rgb: np.ndarray, hex_colour: str, tolerance: int = 12) -> bool:
    target = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return bool((np.abs(rgb.astype(int) - target).max(axis=-1) <= tolerance).any())


def test_training_loss_figure_draws_every_cell_with_losses_in_its_methods_colour(tmp_path):
    results = tmp_path / "runs"
    for bb in ("clip-tiny", "dinov2-tiny"):
        for m, shape in (("freeze", lambda i: 40 / (1 + i)), ("rein", lambda i: 35.0), ("fishertune", lambda i: 30 * 1.5 ** i)):
            r = _result("table1", "t1", bb, m, ["cityscapes"], "gtav", PARAMS[m], 9.0)
            r["train"] = {"losses": [[50 * (i + 1), shape(i)] for i in range(8)]}  # falling, flat, diverging
            _write(results, r)
    _write(results, _result("table1", "t1", "dinov2-tiny", "lora", ["cityscapes"], "gtav", PARAMS["lora"], 9.0))
    written = plot_results(results, tmp_path / "plots", "t1", say=lambda m: None)
    assert {p.name for p in written} >= {"training-loss.png", "training-loss.pdf"}
    png = tmp_path / "plots" / "t1" / "training-loss.png"
    _check_png(png)
    _check_pdf(png.with_suffix(".pdf"))
    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB"))
    for m in ("freeze", "rein", "fishertune"):
        assert _has_colour(rgb, METHOD_COLOURS[m]), m
    assert not _has_colour(rgb, METHOD_COLOURS["lora"])  # its result recorded no losses: no curve, no entry


def test_method_colours_are_fixed_and_distinct():
    assert colours(["rein", "fishertune"])["rein"] == colours(["fishertune", "rein", "x"])["rein"]
    assert len(set(METHOD_COLOURS.values())) == len(METHOD_COLOURS)
    extra = colours(["b-row", "a-row", "rein"])
    assert extra["a-row"] != extra["b-row"] and extra["a-row"] not in METHOD_COLOURS.values()


# ------------------------------------------------------------- (b) predict is what evaluate scores


class TinyNet(nn.Module):
    """A seeded random conv net: noisy, varied predictions over many classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, NUM_CLASSES, 3, padding=1))

    def forward(self, x):
        return self.net(x)


class Images(torch.utils.data.Dataset):
    def __init__(self, samples, groups):
        self.samples = samples
        self.scan = type("Scan", (), {"groups": groups})()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def test_confusion_rebuilt_from_predict_equals_evaluate():
    sizes = [(90, 170), (64, 64), (120, 100), (50, 210)]  # odd sizes: resize, padding, overhanging windows
    samples = []
    for h, w in sizes:
        label = RNG.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8)
        label[RNG.random((h, w)) < 0.1] = 255
        samples.append({"image": RNG.integers(0, 255, (h, w, 3), dtype=np.uint8), "label": label, "path": "x"})
    model, args = TinyNet().eval(), dict(test_size=(96, 48), crop=32, stride=21, batch=3, device=torch.device("cpu"))
    res = evaluate(model, Images(samples, ["fog", "fog", "night", "night"]), keep=2, **args)
    preds = [predict(model, s["image"], s["label"].shape, **args) for s in samples]
    rebuilt = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(s["label"]), NUM_CLASSES)
                  for p, s in zip(preds, samples)).numpy()
    assert (rebuilt == res.confusion).all()
    assert len(np.unique(np.concatenate([p.ravel() for p in preds]))) > 3  # a prediction worth comparing
    fog = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(s["label"]), NUM_CLASSES)
              for p, s in list(zip(preds, samples))[:2]).numpy()
    assert (fog == res.groups["fog"].confusion).all()
    assert [i for i, _ in res.predictions] == [0, 1]
    assert all((kept == preds[i]).all() and kept.dtype == np.uint8 and kept.shape == sizes[i]
               for i, kept in res.predictions)
    assert evaluate(model, Images(samples, [""] * 4), **args).predictions == []  # none kept by default


# ----------------------------------------------------------------------------------- (c) palette


def test_palette_maps_train_ids_to_cityscapes_colours_and_ignore_to_black():
    label = np.array([[0, 10, 11], [255, 18, 2]], dtype=np.uint8)
    rgb = colourize(label)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (128, 64, 128)  # road
    assert tuple(rgb[0, 1]) == (70, 130, 180)  # sky
    assert tuple(rgb[0, 2]) == (220, 20, 60)  # person
    assert tuple(rgb[1, 0]) == (0, 0, 0)  # ignore
    assert tuple(rgb[1, 1]) == (119, 11, 32)  # bicycle
    assert tuple(rgb[1, 2]) == (70, 70, 70)  # building


# -------------------------------------------------------------- (d) saved predictions round-trip


def test_saved_predictions_round_trip_exactly(tmp_path):
    result = tmp_path / "runs" / "m" / "cell--a.json"
    pairs = [(Path(f"/data/img{i}.png"), Path(f"/data/lab{i}.png")) for i in range(3)]
    ds = type("DS", (), {"pairs": pairs, "name": "bdd100k", "root": Path("/data"), "split": "val"})()
    kept = [(0, RNG.integers(0, NUM_CLASSES, (37, 53), dtype=np.uint8)), (2, np.full((5, 7), 18, np.uint8))]
    kept[0][1][0, :5] = 255
    records = save_predictions(result, "bdd100k", ds, kept)
    assert [r["prediction"] for r in records] == ["cell--a.pred/bdd100k-0.png", "cell--a.pred/bdd100k-2.png"]
    assert records[1]["image"] == "/data/img2.png" and records[1]["label"] == "/data/lab2.png"
    assert (records[0]["dataset"], records[0]["root"], records[0]["split"]) == ("bdd100k", "/data", "val")
    for (_, pred), rec in zip(kept, records):
        with Image.open(result.parent / rec["prediction"]) as im:
            assert im.mode == "L" and im.format == "PNG"
            back = np.asarray(im)
        assert back.dtype == np.uint8 and (back == pred).all()
    assert sorted(p.name for p in (result.parent / "cell--a.pred").iterdir()) == ["bdd100k-0.png", "bdd100k-2.png"]


COMMITTED = Path(__file__).resolve().parents[1] / "results" / "plots"


@pytest.mark.parametrize("stem", ["mini-table1/miou-vs-params", "mini-table1/qualitative-dinov2-tiny-cityscapes",
                                  "mini-table2/miou-vs-params", "mini-table2/per-class-bdd100k-dinov2-tiny",
                                  "mini-table2/per-class-acdc-eva02-tiny"])
def test_the_committed_miniature_plots_are_real_pictures(stem):
    """What `fishertune plot` wrote for the miniature (README's figures): a PNG of some size with
    content, and a PDF beside it."""
    _check_png(COMMITTED / f"{stem}.png")
    _check_pdf(COMMITTED / f"{stem}.pdf")
