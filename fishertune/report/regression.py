"""Stored per-class IoU of a small manifest, and the check that a change did not move it.

``fishertune regression write MANIFEST`` stores, for every cell of the manifest, the per-class IoU of
each target (percent) in ``results/regression/<manifest name>.json``. ``fishertune regression check``
compares a fresh run against it and lists every number that moved by more than the tolerance; a cell
missing on either side is a failure too (its config, hence its id, changed: store the new numbers).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fishertune.errors import UserError
from fishertune.runner.manifest import LoadedManifest
from fishertune.runner.store import ResultStore, atomic_write_text

REGRESSION_DIR = Path("results") / "regression"
# IoU points a class may move before `regression check` fails. Measured on the 2-core CI machine with
# the mini Table 1: run with 1 and with 2 CPU threads (different floating-point summation orders
# through 400 training steps), no class differs by more than 0.04 points; halving the learning rate
# moves 16 of the full cell's 57 per-class numbers by more than 0.5 points (up to 6.8). 0.5 sits an
# order of magnitude above the numerical noise and below the effect of any change worth noticing.
DEFAULT_TOLERANCE = 0.5


def collect(lm: LoadedManifest, results: str | Path, only: list[str] | None = None) -> dict[str, Any]:
    """Per-class IoU of every cell of the manifest (or of those ``only`` selects), from its finished results."""
    from fishertune.runner.run import select_cells

    store = ResultStore(results, lm.results_name)
    cells = {}
    for cell in select_cells(lm.cells(), only):
        path = store.path(cell.id)
        if not path.is_file():
            raise UserError(f"cell {cell.id} has no result under {store.dir}; run `fishertune run {lm.path}` first")
        r = json.loads(path.read_text())
        cells[cell.id] = {
            "backbone": cell.backbone, "row": cell.row, "aggregate": r["aggregate"]["miou"],
            "targets": {t: {"miou": v["miou"], "per_class_iou": v["per_class_iou"]} for t, v in r["targets"].items()},
        }
    return {"manifest": lm.manifest.name, "version": lm.manifest.version, "cells": cells}


def write(lm: LoadedManifest, results: str | Path, out: str | Path | None = None) -> Path:
    path = Path(out) if out else REGRESSION_DIR / f"{lm.results_name}.json"
    atomic_write_text(path, json.dumps(collect(lm, results), indent=1, sort_keys=True) + "\n")
    return path


def compare(stored: dict[str, Any], fresh: dict[str, Any], tolerance: float) -> list[str]:
    """Every difference larger than ``tolerance`` IoU points, and every cell or class that differs in kind."""
    problems = []
    for cell_id in sorted(set(stored["cells"]) | set(fresh["cells"])):
        if cell_id not in fresh["cells"]:
            problems.append(f"{cell_id}: stored but not in this run")
            continue
        if cell_id not in stored["cells"]:
            problems.append(f"{cell_id}: new cell with no stored numbers (regression write to store them)")
            continue
        a, b = stored["cells"][cell_id]["targets"], fresh["cells"][cell_id]["targets"]
        for target in sorted(set(a) | set(b)):
            if target not in a or target not in b:
                problems.append(f"{cell_id} {target}: target present on one side only")
                continue
            for cls, old in a[target]["per_class_iou"].items():
                new = b[target]["per_class_iou"].get(cls)
                if (old is None) != (new is None):
                    problems.append(f"{cell_id} {target} {cls}: {old} -> {new}")
                elif old is not None and not math.isclose(old, new, abs_tol=tolerance):
                    problems.append(f"{cell_id} {target} {cls}: {old:.2f} -> {new:.2f} ({new - old:+.2f})")
    return problems


def check(lm: LoadedManifest, results: str | Path, tolerance: float, stored_path: str | Path | None = None,
          only: list[str] | None = None) -> list[str]:
    """Differences between the stored numbers and the finished results, over the cells ``only`` selects
    (all by default; stored cells outside the selection are not compared)."""
    path = Path(stored_path) if stored_path else REGRESSION_DIR / f"{lm.results_name}.json"
    if not path.is_file():
        raise UserError(f"no stored regression numbers at {path}; create them with `fishertune regression write {lm.path}`")
    fresh = collect(lm, results, only)
    stored = json.loads(path.read_text())
    if only:
        stored = {**stored, "cells": {c: v for c, v in stored["cells"].items() if c in fresh["cells"]}}
    return compare(stored, fresh, tolerance)
