"""Stored per-class IoU of a small manifest, and the check that a change did not move it.

``fishertune regression update MANIFEST`` stores, for every cell of the manifest, the per-class IoU of
each target (percent) in ``results/regression/<results name>.json`` and lists what moved against the
numbers stored before (``git diff`` of that file shows the same, cell by cell). ``fishertune regression
check`` compares finished cells against it and lists every number that moved by more than the
tolerance; a cell missing on either side is a failure too (its config, hence its id, changed: update).
``--run`` runs the pending cells first, so one command checks a manifest from scratch (``tox -e
regression``: the four mini manifests; on a GPU runner e.g. ``benchmarks/table1.yaml --subset 100``).
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
# IoU points a class may move before `regression check` fails. Rerunning a mini cell with the same
# CPU thread count (the mini protocol fixes 2) gives bit-identical numbers on this 2-core CI machine;
# halving the learning rate moved 16 of the full cell's 57 per-class numbers by more than 0.5 points
# (up to 6.8; measured on an earlier version of the miniature). A different thread count or CPU changes the last bits, which 400 steps of a tiny random
# model amplify (sam-tiny freeze, GTAV -> Cityscapes mIoU: 11.81 with 2 threads, 11.88 with 1; 9.90 and
# 11.77 under the previous version's training stream), so
# stored numbers are only comparable on the kind of machine that wrote them; 0.5 is for that
# machine, above nothing and below any change worth noticing.
DEFAULT_TOLERANCE = 0.5


def collect(lm: LoadedManifest, results: str | Path, only: list[str] | None = None) -> dict[str, Any]:
    """Per-class IoU of every cell of the manifest (or of those ``only`` selects), from its finished results."""
    from fishertune.runner.run import select_cells

    store = ResultStore(results, lm.results_name)
    cells = {}
    for cell in select_cells(lm.cells(), only):
        r = store.read(cell.id)
        if r is None:
            raise UserError(f"cell {cell.id} has no result under {store.dir}; run `fishertune run {lm.path}` first")
        if r["status"] != "done":
            raise UserError(f"cell {cell.id} failed ({r.get('failure', {}).get('reason', 'no reason recorded')}); "
                            "it has no numbers to compare")
        cells[cell.id] = {
            "backbone": cell.backbone, "row": cell.row, "aggregate": r["aggregate"]["miou"],
            "targets": {t: {"miou": v["miou"], "per_class_iou": v["per_class_iou"]} for t, v in r["targets"].items()},
        }
    return {"manifest": lm.manifest.name, "version": lm.manifest.version, "cells": cells}


def stored_path(lm: LoadedManifest, stored: str | Path | None = None) -> Path:
    return Path(stored) if stored else REGRESSION_DIR / f"{lm.results_name}.json"


def write(lm: LoadedManifest, results: str | Path, out: str | Path | None = None) -> Path:
    path = stored_path(lm, out)
    atomic_write_text(path, json.dumps(collect(lm, results), indent=1, sort_keys=True) + "\n")
    return path


def update(lm: LoadedManifest, results: str | Path, tolerance: float, out: str | Path | None = None,
           only: list[str] | None = None) -> tuple[Path, list[str]]:
    """Store the finished cells' numbers on purpose and say what moved (by more than ``tolerance``)
    against what was stored before. With ``only``, the other stored cells are kept as they were; cells
    of the manifest no longer in the grid are dropped (their config changed)."""
    path = stored_path(lm, out)
    fresh = collect(lm, results, only)
    old = json.loads(path.read_text())["cells"] if path.is_file() else {}
    grid = {c.id for c in lm.cells()}
    compared = {c: v for c, v in old.items() if c in fresh["cells"]} if only else old
    moved = compare({"cells": compared}, fresh, tolerance) if path.is_file() else []
    cells = {**({c: v for c, v in old.items() if c in grid} if only else {}), **fresh["cells"]}
    atomic_write_text(path, json.dumps({**fresh, "cells": cells}, indent=1, sort_keys=True) + "\n")
    return path, moved


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


def check(lm: LoadedManifest, results: str | Path, tolerance: float, stored: str | Path | None = None,
          only: list[str] | None = None) -> list[str]:
    """Differences between the stored numbers and the finished results, over the cells ``only`` selects
    (all by default; stored cells outside the selection are not compared)."""
    path = stored_path(lm, stored)
    if not path.is_file():
        raise UserError(f"no stored regression numbers at {path}; create them with `fishertune regression write {lm.path}`")
    fresh = collect(lm, results, only)
    old = json.loads(path.read_text())
    if only:
        old = {**old, "cells": {c: v for c, v in old["cells"].items() if c in fresh["cells"]}}
    return compare(old, fresh, tolerance)
