"""Issue 20: `fishertune report` writes one self-contained HTML page per results folder: the data it
embeds is the results' (tables through the renderers' frames, heat maps, provenance), nothing is fetched
from outside, and the page renders in headless Chromium without console errors."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fishertune.cli import main
from fishertune.data import CLASSES
from fishertune.report.html import data_badges, parse_cell, report_data, write_reports
from fishertune.report.stats import estimate, welch
from fishertune.report.table2 import table2_frame
from fishertune.report.tables import _fmt, load_table_results, table1_frame

METHODS = {"full": 236033, "freeze": 0, "lora": 9216, "rein": 18881, "fishertune": 11800}


def _result(name: str, table: str, backbone: str, method: str, targets: list[str], source: str, base: float,
            status: str = "done", **manifest) -> dict:
    cell_id = f"{backbone}--{method}--{source}--0123456789"
    r = {"schema": 1, "status": status, "cell_id": cell_id, "backbone": backbone, "method": method, "row": method,
         "manifest": {"path": f"benchmarks/mini/{name}.yaml", "name": name, "version": 1, "table": table,
                      "data_kind": "miniature", "data_subset": None, **manifest},
         "config": {"source": source, "targets": targets, "seed": 42, "method": method,
                    "data": {"kind": "miniature", "synth_seed": 0, "synth_images": 12}},
         "seed": 42, "git": {"commit": "abc123", "dirty": False}, "versions": {"torch": "2.x"},
         "device": "cpu (test, 2 threads)", "processes": 1, "wall_time_s": 12.5 + base, "peak_memory_mb": 321.0}
    if status == "failed":
        return r | {"failure": {"reason": "non-finite loss (nan) at iteration 3", "iteration": 3}}
    per_target = {}
    for k, t in enumerate(targets):
        ious = {c: float(base + 3 * k + (i * 7 + len(method) * 5) % 40) for i, c in enumerate(CLASSES)}
        ious["train"] = None  # a class without IoU
        vals = [v for v in ious.values() if v is not None]
        per_target[t] = {"miou": sum(vals) / len(vals), "per_class_iou": ious}
    return r | {"targets": per_target,
                "aggregate": {"name": "mean_over_targets",
                              "miou": sum(t["miou"] for t in per_target.values()) / len(per_target)},
                "params": {"backbone_trainable": METHODS[method], "backbone_total": 236033, "head_trainable": 5000},
                "train": {"seconds": 10.0, "losses": [[50 * (i + 1), 30.0 / (i + 1) + base] for i in range(8)],
                          "source_images": 12, "resumed_from": 0},
                "model": {"path": f"{cell_id}.model", "bytes": 123456, "sha256": "0" * 64}}


def _write(root: Path, r: dict) -> None:
    path = root / r["manifest"]["name"] / f"{r['cell_id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r))


@pytest.fixture
def runs(tmp_path) -> Path:
    """Two results folders: a Table 1 grid (two families, a failed cell) and a Table 2 one."""
    root = tmp_path / "runs"
    for bb, base in (("clip-tiny", 8.0), ("dinov2-tiny", 10.0)):
        for m in ("full", "freeze", "lora", "rein", "fishertune"):
            _write(root, _result("t1", "table1", bb, m, ["cityscapes", "bdd100k", "mapillary"], "gtav", base))
    broken = _result("t1", "table1", "sam-tiny", "full", ["cityscapes", "bdd100k", "mapillary"], "gtav", 0, "failed")
    _write(root, broken)
    for bb in ("eva02-tiny", "dinov2-tiny"):
        for m in ("full", "rein"):
            _write(root, _result("t2", "table2", bb, m, ["bdd100k", "acdc"], "cityscapes", 5.0))
    return root


def _embedded(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert match, "no embedded data"
    return json.loads(match.group(1))


def test_cell_numbers_are_read_back_from_the_renderers_own_formats():
    assert parse_cell(_fmt(12.34, 55.1)) == (12.3, -42.8)
    assert parse_cell(_fmt(61.0, 55.06, "*")) == (61.0, 5.9)
    assert parse_cell(_fmt(7.25, None)) == (7.2, None)  # ours / - (the paper has no such row)
    assert parse_cell(_fmt(None, 55.1)) == (None, None)  # not run / paper
    assert parse_cell("0.79 / 0.79") == (0.79, None)  # parameters: ours / printed
    assert parse_cell("+1.2") == (1.2, 1.2) and parse_cell("-0.5") == (-0.5, -0.5)  # Table 2's difference row
    # over seeds: mean +- std on our side; the column against the reference row is no difference to the paper
    assert parse_cell(_fmt(12.34, 55.1, est=estimate([12.0, 12.68]))) == (12.3, -42.8)
    assert parse_cell(welch(estimate([50.0, 51.0, 52.0]), estimate([49.0, 49.5, 50.0])).format()) == (1.5, None)
    assert parse_cell(welch(estimate([50.0]), estimate([49.0])).format()) == (1.0, None)  # "+1.0 (n=1)"
    assert parse_cell("reference") == (None, None)
    assert parse_cell("42.0") == (42.0, None) and parse_cell("n/a") == (None, None) and parse_cell("-") == (None, None)


def test_the_data_kind_is_said_in_capitals():
    assert data_badges({"data_kind": "real"}) == ["REAL DATA"]
    assert data_badges({"data_kind": "miniature"}) == ["MINIATURE"]
    assert data_badges({"data_kind": "real", "data_generated": True, "tiny": True, "data_subset": 50}) == [
        "GENERATED DATA", "TINY OVERRIDE", "SUBSET 50"]


def test_the_page_embeds_the_tables_heat_maps_and_provenance_of_the_results(runs, tmp_path):
    paths = write_reports(runs, tmp_path / "report")
    assert [p.name for p in paths] == ["t1.html", "t2.html"]
    page = paths[0].read_text()
    data = _embedded(page)
    assert data == json.loads(json.dumps(report_data(runs / "t1"), sort_keys=True))

    # the banner: the data kind, loud
    assert data["data"]["badges"] == ["MINIATURE"] and not data["data"]["real"]
    assert 'class="banner warn"' in page and "MINIATURE: the generated miniature" in html.unescape(page)
    # Table 1: the very strings the Markdown renderer lays out, with the numbers behind them
    done = load_table_results(runs / "t1", "table1")
    frame, _ = table1_frame(done)
    (table,) = data["tables"]
    (block,) = table["blocks"]
    flat = frame.reset_index()
    assert block["columns"] == list(flat.columns)
    assert [[c["text"] for c in g["rows"][0]] for g in block["groups"]] == flat.astype(str).values.tolist()
    for group in block["groups"]:
        cells = dict(zip(block["columns"], group["rows"][0]))
        r = next(x for x in done if x["backbone"] == cells["Backbone"]["text"] and x["row"] == cells["Method"]["text"])
        assert group["cell_id"] == r["cell_id"]
        assert cells["Citys"]["sort"] == round(r["targets"]["cityscapes"]["miou"], 1)
        assert cells["Avg"]["sort"] == round(r["aggregate"]["miou"], 1)
        if "(" in cells["Citys"]["text"]:  # the paper has this row: the difference is coloured
            assert cells["Citys"]["diff"] is not None and cells["Citys"]["diff"] < 0
    # heat map: every finished cell's per-class IoU, class by class
    (heat_city, *_rest) = data["heatmaps"]
    assert heat_city["target"] == "cityscapes" and heat_city["classes"] == list(CLASSES)
    assert len(heat_city["rows"]) == len(done) == 10
    by_id = {r["cell_id"]: r for r in done}
    for row in heat_city["rows"]:
        assert row["iou"] == [by_id[row["cell_id"]]["targets"]["cityscapes"]["per_class_iou"][c] for c in CLASSES]
    # provenance: every cell, the failed one with its reason
    assert data["counts"] == {"done": 10, "failed": 1}
    failed = next(c for c in data["cells"] if c["status"] == "failed")
    assert failed["failure"]["reason"].startswith("non-finite loss") and failed["backbone"] == "sam-tiny"
    some = next(c for c in data["cells"] if c["cell_id"] == "clip-tiny--rein--gtav--0123456789")
    assert (some["git"]["commit"], some["device"], some["wall_time_s"], some["peak_memory_mb"]) == (
        "abc123", "cpu (test, 2 threads)", 20.5, 321.0)
    assert some["model"]["bytes"] == 123456 and some["train"]["losses"][0] == [50, 38.0]
    for c in data["cells"]:  # one click away: a folded section per cell, linked from the tables
        assert f'<details id="cell-{c["cell_id"]}"' in page
    assert 'href="#cell-clip-tiny--rein--gtav--0123456789"' in page


def test_table2_moves_its_three_rows_per_method_together(runs, tmp_path):
    data = report_data(runs / "t2")
    (table,) = data["tables"]
    assert [b["target"] for b in table["blocks"]] == ["bdd100k", "acdc"]
    frame, _ = table2_frame(load_table_results(runs / "t2", "table2"))
    for block in table["blocks"]:
        part = frame.xs(block["target"], level="Target").reset_index()
        assert sum(len(g["rows"]) for g in block["groups"]) == len(part)
        for g in block["groups"]:
            kinds = [row[block["columns"].index("Row")]["text"] for row in g["rows"]]
            assert kinds == ["ours", "paper", "ours - paper"]
            ours, paper, diff = g["rows"]
            road = block["columns"].index("Road")
            if diff[road]["sort"] is not None:  # the difference row is its own (coloured) difference
                assert diff[road]["diff"] == diff[road]["sort"]
                assert diff[road]["sort"] == pytest.approx(ours[road]["sort"] - paper[road]["sort"], abs=0.11)


def test_the_page_is_self_contained(runs, tmp_path):
    (page_path,) = write_reports(runs / "t1", tmp_path / "report")
    page = page_path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#|data:)""", page)  # only anchors and data: URIs
    assert "<link" not in page and "@import" not in page and "url(" not in page
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert images[0] == "training-loss" and "miou-vs-params" in images


def test_report_command_bad_input_is_one_line(tmp_path, capsys):
    assert main(["report", "--results", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["report", "--results", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "no result JSONs" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: install Debian's package (apt-get install chromium; .ci/run "
                                              "does when it runs as root on Debian) to render the report in a browser")
def test_the_page_renders_in_headless_chromium_without_console_errors(runs, tmp_path):
    (page,) = write_reports(runs / "t1", tmp_path / "report")
    shot = tmp_path / "shot.png"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
                           "--window-size=1280,1600", f"--screenshot={shot}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # the page writes nothing to the console: any line is an error
    assert 'data-ready="1"' in proc.stdout  # its script ran to the end
    with Image.open(shot) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape[:2] == (1600, 1280)
    assert rgb.std() > 20 and len(np.unique(rgb.reshape(-1, 3)[::5], axis=0)) > 50  # not blank
    banner = rgb[5:25, 600:700].reshape(-1, 3)  # the data kind, sticky at the top, in the warning colour
    assert (np.abs(banner.astype(int) - (0xB3, 0x26, 0x1E)).max(axis=1) <= 8).mean() > 0.5
