"""``fishertune report``: one self-contained HTML page per results folder, for a person to read.

A results folder is ``<results>/<results name>/``, the result JSONs of one manifest. Its page
(``<out>/<results name>.html``, rendered by jinja2 from ``fishertune/templates/report.html.j2``) shows

* the data kind in a banner at the top (real, generated, miniature, subset, tiny override), in the
  words of the figures' titles (:func:`fishertune.report.plots.data_line`);
* every table of the manifest, from the same frames the Markdown and LaTeX renderers lay out
  (:data:`fishertune.report.tables.FRAMES`): each cell's text as rendered (``ours / paper (ours -
  paper)``), sortable by any column (a click on its header; Table 2's three rows per method move
  together), each difference to the paper coloured (red below, green above, stronger with size);
* per target, the per-class IoU as a heat map, one row per cell (backbone x method) and one column per
  class;
* every figure of ``fishertune plot`` (the training-loss curves of every cell included), drawn afresh
  from the results;
* every cell's provenance (config, commit, versions, device, wall time, peak memory, training, kept
  model; a failed cell's reason) in a folded section, one click away (a table row's method opens it).

No server and no network: the CSS and the small sorting script are inline, the figures are PNGs in
``data:`` URIs. The data the page shows is also embedded as JSON (``<script type="application/json"
id="report-data">``), the same :func:`report_data` the tests check.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from fishertune.data.labels import CLASSES
from fishertune.errors import UserError
from fishertune.report.plots import _backbone_order, _row_order, data_line, plot_results
from fishertune.report.table2 import ROWS
from fishertune.report.tables import FRAMES, caption, load_table_results
from fishertune.runner.store import atomic_write_text, iter_results

DEFAULT_OUT = Path("results") / "report"
#: index columns of the frames: text, not numbers
TEXT_COLUMNS = ("Target", "Backbone", "Method", "Row")
NUMBER = r"[+-]?\d+(?:\.\d+)?"
#: the figures' order on the page (by name prefix)
FIGURE_ORDER = ("training-loss", "miou-vs-params", "per-class", "qualitative")
#: a difference to the paper of this many points or more gets the strongest colour
FULL_COLOUR = 10.0


def parse_cell(text: str) -> tuple[float | None, float | None]:
    """``(ours, ours - paper)`` of a number cell as the renderers write it: ``ours / paper (diff)``,
    ``ours / -``, ``not run / paper``, a plain number, or a signed number alone (Table 2's difference
    row, which is its own difference). Either is None where the cell has none."""
    text = text.strip()
    start = re.match(NUMBER, text)
    value = float(start.group()) if start else None
    paren = re.search(rf"\(({NUMBER})\)\s*$", text)
    if paren:
        return value, float(paren.group(1))
    if re.fullmatch(r"[+-]\d+(?:\.\d+)?", text):
        return value, value
    return value, None


def _table_blocks(table: str, results: list[dict]) -> list[dict[str, Any]]:
    """The table as the page shows it: per target block (Table 2) or one block, its columns and its
    groups of rows (one row each; Table 2: ours, paper, difference), every cell ``{text, sort, diff}``."""
    frame, _ = FRAMES[table](results)
    cell_of: dict[tuple[str, str], str] = {}  # a row's cell (its first seed's, when it has several)
    for r in sorted(results, key=lambda r: r.get("seed") or 0):
        cell_of.setdefault((r["backbone"], r["row"]), r["cell_id"])
    if "Target" in frame.index.names:
        blocks = [(t, frame.xs(t, level="Target")) for t in dict.fromkeys(frame.index.get_level_values("Target"))]
    else:
        blocks = [(None, frame)]
    size = len(ROWS) if table == "table2" else 1
    out = []
    for target, block in blocks:
        flat = block.reset_index()
        columns = [str(c) for c in flat.columns]
        groups = []
        for start in range(0, len(flat), size):
            first = flat.iloc[start]
            label = first["Method"] if "Method" in flat.columns else first["Row"]
            rows = []
            for i in range(start, min(start + size, len(flat))):
                row = []
                for col in columns:
                    text = str(flat.iloc[i][col])
                    if col in TEXT_COLUMNS:
                        shown = text if i == start or col == "Row" else ""
                        row.append({"text": shown, "sort": text, "diff": None})
                    else:
                        value, diff = parse_cell(text)
                        row.append({"text": text, "sort": value, "diff": None if col.startswith("Params") else diff})
                rows.append(row)
            groups.append({"cell_id": cell_of.get((first["Backbone"], label)), "rows": rows})
        link = columns.index("Method") if "Method" in columns else columns.index("Row")
        out.append({"target": target, "columns": columns, "groups": groups, "link": link})
    return out


def _heatmaps(done: list[dict]) -> list[dict[str, Any]]:
    """Per target, the per-class IoU of every finished cell (rows: backbone x method, in the tables' order)."""
    targets = list(dict.fromkeys(t for r in done for t in r["config"]["targets"]))
    backbones = _backbone_order(done)
    ordered = sorted(done, key=lambda r: (backbones.index(r["backbone"]), _row_order(r), r.get("seed") or 0,
                                          r["cell_id"]))
    seeds: dict[tuple[str, str], set] = {}
    for r in done:
        seeds.setdefault((r["backbone"], r["row"]), set()).add(r.get("seed"))
    maps = []
    for target in targets:
        rows = [{"backbone": r["backbone"], "row": r["row"], "cell_id": r["cell_id"], "seed": r.get("seed"),
                 "label": r["row"] + ("" if len(seeds[(r["backbone"], r["row"])]) == 1 else f" (seed {r.get('seed')})"),
                 "miou": r["targets"][target]["miou"],
                 "iou": [r["targets"][target]["per_class_iou"].get(c) for c in CLASSES]}
                for r in ordered if target in r.get("targets", {})]
        if rows:
            maps.append({"target": target, "classes": list(CLASSES), "rows": rows})
    return maps


def _provenance(path: Path, r: dict) -> dict[str, Any]:
    """What a person needs to judge or rerun one cell."""
    train = r.get("train") or {}
    return {"cell_id": r.get("cell_id"), "result": path.name, "backbone": r.get("backbone"), "row": r.get("row"),
            "method": r.get("method"), "status": r.get("status", "done"), "seed": r.get("seed"),
            "aggregate_miou": (r.get("aggregate") or {}).get("miou"),
            "targets": {t: v["miou"] for t, v in (r.get("targets") or {}).items()},
            "config": r.get("config"), "git": r.get("git"), "versions": r.get("versions"), "device": r.get("device"),
            "processes": r.get("processes"), "wall_time_s": r.get("wall_time_s"),
            "peak_memory_mb": r.get("peak_memory_mb"),
            "train": {k: train.get(k) for k in ("seconds", "source_images", "source_subset", "resumed_from", "losses")},
            "params": r.get("params"), "model": r.get("model"), "failure": r.get("failure")}


def data_badges(manifest: dict[str, Any]) -> list[str]:
    """The data kind in capitals: REAL DATA, GENERATED DATA or MINIATURE, then TINY OVERRIDE and SUBSET N."""
    if manifest.get("data_kind") == "miniature":
        badges = ["MINIATURE"]
    elif manifest.get("data_generated"):
        badges = ["GENERATED DATA"]
    else:
        badges = ["REAL DATA"]
    if manifest.get("tiny"):
        badges.append("TINY OVERRIDE")
    if manifest.get("data_subset"):
        badges.append(f"SUBSET {manifest['data_subset']}")
    return badges


def report_data(folder: Path) -> dict[str, Any]:
    """Everything one results folder's page shows, the figures aside (see the module docstring)."""
    folder = Path(folder)
    records = [(path, r) for path, r in iter_results(folder) if path.parent == folder]
    if not records:
        raise UserError(f"{folder}: no result JSONs here; run `fishertune run MANIFEST` first or pass --results DIR")
    done = [r for _, r in records if r.get("status", "done") == "done"]
    tables = []
    for table in dict.fromkeys(r["manifest"]["table"] for r in done):
        results = load_table_results(folder, table)  # refuses mixed manifests, versions, data kinds
        if table not in FRAMES:
            continue
        _, notes = FRAMES[table](results)
        # the frames compare with each backbone's full row when there is one, and the renderers say so
        reference = "full" if table != "table2" and "full" in {r["row"] for r in results} else None
        tables.append({"table": table, "caption": caption(table, results, reference), "notes": notes,
                       "blocks": _table_blocks(table, results)})
    everything = [r for _, r in records]
    man = (done or everything)[0]["manifest"]
    backbones = _backbone_order(everything)
    cells = sorted((_provenance(p, r) for p, r in records),
                   key=lambda c: (backbones.index(c["backbone"]), _row_order(c), c["cell_id"]))
    badges = data_badges(man)
    return {"folder": folder.name, "manifest": man, "data": {"badges": badges, "real": badges == ["REAL DATA"],
                                                             "line": data_line(everything)},
            "tables": tables, "heatmaps": _heatmaps(done), "cells": cells,
            "counts": {"done": len(done), "failed": len(everything) - len(done)}}


def _figures(folder: Path, say) -> list[dict[str, str]]:
    """Every figure `fishertune plot` draws for the folder, as PNG ``data:`` URIs (drawn into a temporary
    directory; the figures that could not be drawn are told to ``say``)."""
    if not any(r.get("status", "done") == "done" for _, r in iter_results(folder)):
        return []
    with tempfile.TemporaryDirectory() as tmp:
        written = [p for p in plot_results(folder, tmp, say=say) if p.suffix == ".png"]
        written.sort(key=lambda p: (next((i for i, s in enumerate(FIGURE_ORDER) if p.stem.startswith(s)),
                                         len(FIGURE_ORDER)), p.stem))
        return [{"name": p.stem, "src": "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()}
                for p in written]


def _diff_style(diff: float | None) -> str:
    """Background of a difference to the paper: red below, green above, stronger with its size."""
    if diff is None:
        return ""
    strength = min(abs(diff) / FULL_COLOUR, 1.0)
    hue = 130 if diff > 0 else 0
    return f"background: hsl({hue}, 70%, {95 - 30 * strength:.0f}%)"


def _iou_style(value: float | None) -> str:
    """A heat map cell: viridis over 0..100 IoU, text that stays readable on it."""
    if value is None:
        return "background: #f4f4f4; color: #999"
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    rgba = colormaps["viridis"](max(0.0, min(value, 100.0)) / 100.0)
    text = "#000" if value > 55 else "#fff"
    return f"background: {to_hex(rgba)}; color: {text}"


def _embedded_json(data: Any) -> str:
    """JSON for a ``<script type="application/json">`` element (``</`` escaped so it cannot end it)."""
    return json.dumps(data, sort_keys=True).replace("</", "<\\/")


def render_page(data: dict[str, Any], figures: list[dict[str, str]], notes: list[str]) -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape
    from markupsafe import Markup

    env = Environment(loader=PackageLoader("fishertune", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["diff_style"] = _diff_style
    env.filters["iou_style"] = _iou_style
    env.filters["pretty"] = lambda obj: json.dumps(obj, indent=1, sort_keys=True)
    return env.get_template("report.html.j2").render(data=data, figures=figures, notes=notes,
                                                     data_json=Markup(_embedded_json(data)))


def results_folders(results: str | Path) -> list[Path]:
    """Every folder under ``results`` (itself included) that holds result JSONs directly."""
    folders = sorted({path.parent for path, _ in iter_results(results)})
    if not folders:
        raise UserError(f"no result JSONs under {results}; run `fishertune run MANIFEST` first or pass --results DIR")
    return folders


def write_reports(results: str | Path, out: str | Path | None = None) -> list[Path]:
    """One page per results folder under ``results``: ``<out>/<folder name>.html`` (default
    ``results/report/``), each written atomically; returns their paths."""
    out = Path(out) if out else DEFAULT_OUT
    folders = results_folders(results)
    names = [f.name for f in folders]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"{results} holds several results folders named {twice[0]}; point --results at one of them")
    written = []
    for folder in folders:
        notes: list[str] = []
        data = report_data(folder)
        figures = _figures(folder, notes.append)
        path = out / f"{folder.name}.html"
        atomic_write_text(path, render_page(data, figures, notes))
        for note in notes:
            print(f"{folder.name}: {note}" if not note.startswith(folder.name) else note, file=sys.stderr)
        written.append(path)
    return written
