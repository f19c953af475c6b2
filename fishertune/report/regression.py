"""Stored numbers of small manifests and the check that a change moved them: a measuring instrument.

``fishertune regression update MANIFEST`` stores, per row of the grid (a backbone and a method row,
over the seeds that ran) and per target, the mean mIoU over seeds and the per-class IoU, with what
made them (machine, torch, threads) in ``results/regression/<results name>.json``. With ``--spread
DIR ...`` (the same cells run in other environments: another thread count, another torch minor
version in another venv, another CPU; or a stored record of the same manifest made on another machine,
whose per-seed values stand for that machine's runs of the cells whose ids are unchanged) it also stores,
per statistic, how much the environment moves it, and from that a **band**: the largest change the check
lets pass.

The band. Rerunning the same seeds elsewhere changes only float rounding; each environment's
deviation ``d`` from the stored run estimates ``2 sigma^2 = d^2`` for that statistic. The estimate of
one row is pooled with the mean over all rows of its kind (mIoU, or a class's IoU) as ``prior_weight``
pseudo-observations (a statistic seen in two environments is not known well enough to trust alone), and
the check of ``n`` fresh seeds against the stored mean of ``n`` allows
``band = max(floor, z * sigma * sqrt(2 / n))``; ``z = 3.5`` keeps the chance of a false alarm over the
hundred-odd statistics of a mini manifest near 5% (Bonferroni). Without ``--spread``, ``--bands-from
FILE`` lends the pooled ``sigma`` per statistic of another manifest's stored record (same protocol,
so the same rounding); without either, the seeds' own standard deviation stands in for ``sigma`` (an
upper bound: reseeding moves more than rounding).

What is compared: each row's per-target and aggregate mIoU (always) and the per-class IoU of the
classes whose ``sigma`` is at most ``class_max_sigma`` (stable classes; a class that flips between 0
and 40 when the last bits change says nothing), as means over the seeds both sides ran (the stored
file keeps every seed's value). ``check`` lists every statistic outside its band and every row missing
on either side or whose cells changed (its config, hence its cells' ids, changed: update).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from fishertune.errors import UserError
from fishertune.runner.manifest import LoadedManifest
from fishertune.runner.store import ResultStore, atomic_write_text

REGRESSION_DIR = Path("results") / "regression"
SCHEMA = 2
#: the band rule (see the module docstring); stored with the numbers it was applied to
RULE = {"z": 3.5, "floor_miou": 0.3, "floor_class": 1.0, "class_max_sigma": 2.0, "prior_weight": 2.0}


def _results(lm: LoadedManifest, results: str | Path, only: list[str] | None,
             missing_ok: bool = False) -> dict[str, dict[str, Any]]:
    """Finished results of the selected cells, by cell id; a missing (unless ``missing_ok``: skipped) or
    failed cell is a user error."""
    from fishertune.runner.run import select_cells

    store = ResultStore(results, lm.results_name)
    out = {}
    for cell in select_cells(lm.cells(), only):
        r = store.read(cell.id)
        if r is None and missing_ok:
            continue
        if r is None:
            raise UserError(f"cell {cell.id} has no result under {store.dir}; run `fishertune run {lm.path}` first")
        if r["status"] != "done":
            raise UserError(f"cell {cell.id} failed ({r.get('failure', {}).get('reason', 'no reason recorded')}); "
                            "it has no numbers to compare")
        out[cell.id] = r
    return out


def _record_results(lm: LoadedManifest, path: str | Path, only: list[str] | None) -> dict[str, dict[str, Any]]:
    """A stored record's per-seed values in the shape of results, by cell id, for the selected cells it holds:
    a spread from another machine whose runs are gone but whose record is kept (e.g. ``git show
    REV:results/regression/mini-table1.json``). Only its stored statistics take part (the stable classes and
    mIoU); each row is attributed to the machine and torch that made it."""
    from fishertune.runner.run import select_cells

    record = read(Path(path))
    if record.get("schema") != SCHEMA or record.get("manifest") != lm.manifest.name:
        raise UserError(f"{path}: not a stored regression record of {lm.manifest.name} (schema {SCHEMA}); give "
                        "a results folder or such a record to --spread")
    wanted = {c.id for c in select_cells(lm.cells(), only)}
    try:
        return _record_values(record, wanted)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"{path}: a damaged regression record ({type(e).__name__}: {e}); restore it from git") from None


def _record_values(record: dict[str, Any], wanted: set[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for row in record["rows"].values():
        env = row.get("made_with") or record.get("made_with") or {}
        for seed, cell_id in row["cells"].items():
            if cell_id not in wanted:
                continue
            value = {t: {stat: e["values"].get(seed) for stat, e in entries.items()}
                     for t, entries in row["targets"].items()}
            out[cell_id] = {
                "backbone": row["backbone"], "row": row["row"], "seed": int(seed), "cell_id": cell_id,
                "targets": {t: {"miou": v.get("miou"), "per_class_iou": {k: x for k, x in v.items() if k != "miou"}}
                            for t, v in value.items() if t != "aggregate"},
                "aggregate": {"miou": value.get("aggregate", {}).get("miou")},
                "device": env.get("device"), "versions": {"torch": env.get("torch"), "python": env.get("python")}}
    return out


def _statistics(r: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{target: {"miou": x, <class>: iou, ...}}`` of one result, plus ``aggregate``."""
    out = {t: {"miou": v["miou"], **v["per_class_iou"]} for t, v in r["targets"].items()}
    out["aggregate"] = {"miou": r["aggregate"]["miou"]}
    return out


def _rows(results: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Results grouped by row key ``backbone--row`` (the seeds of one grid row)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in results.values():
        rows.setdefault(f"{r['backbone']}--{r['row']}", []).append(r)
    return rows


def environment(r: dict[str, Any]) -> dict[str, Any]:
    """What made a result: its device string (CPU and threads), torch and Python versions."""
    return {"device": r.get("device"), "torch": r.get("versions", {}).get("torch"),
            "python": r.get("versions", {}).get("python")}


def pooled_sigma(record: dict[str, Any]) -> dict[str, float]:
    """Per statistic kind (``miou`` or a class name), the root mean square of the measured ``sigma`` over a
    stored record's rows and targets: the environment spread of one manifest, to lend to another of the
    same protocol (``update --bands-from``)."""
    squares: dict[str, list[float]] = {}
    for row in record["rows"].values():
        for entries in row["targets"].values():
            for stat, e in entries.items():
                if e.get("sigma") is not None:
                    squares.setdefault(stat, []).append(e["sigma"] ** 2)
    return {stat: math.sqrt(statistics.fmean(v)) for stat, v in squares.items()}


def build(lm: LoadedManifest, results: str | Path, spreads: list[str | Path] = (), only: list[str] | None = None,
          rule: dict[str, float] = RULE, lent: dict[str, float] | None = None) -> dict[str, Any]:
    """The stored record of the selected cells of ``results`` with the bands the ``spreads`` give, or, for
    statistics they do not cover, the ``lent`` sigma of another manifest (:func:`pooled_sigma`)."""
    main = _results(lm, results, only)
    # an environment variant may have run a part of the cells (e.g. one seed of each row): the spread is
    # measured on the cells both ran; a variant sharing none of them is a user error
    others = [_record_results(lm, s, only) if Path(s).is_file() else _results(lm, s, only, missing_ok=True)
              for s in spreads]
    for folder, other in zip(spreads, others):
        if not set(other) & set(main):
            raise UserError(f"{folder} holds none of the selected cells of {lm.manifest.name}; run them there "
                            f"first (e.g. `fishertune run {lm.path} --results {folder} --threads 2`)")
    # squared deviations per (row, target, statistic), and pooled per kind ("miou" or a class name)
    deviations: dict[tuple[str, str, str], list[float]] = {}
    for other in others:
        for cell_id, r in main.items():
            if cell_id not in other:
                continue
            a, b = _statistics(r), _statistics(other[cell_id])
            key_row = f"{r['backbone']}--{r['row']}"
            for target, values in a.items():
                for stat, x in values.items():
                    y = b[target].get(stat)
                    if x is None or y is None:
                        continue
                    deviations.setdefault((key_row, target, stat), []).append((x - y) ** 2 / 2)
    pooled: dict[str, list[float]] = {}
    for (_, _, stat), sq in deviations.items():
        pooled.setdefault(stat, []).extend(sq)
    prior = {stat: statistics.fmean(v) for stat, v in pooled.items()}

    def sigma(row: str, target: str, stat: str, seed_values: list[float]) -> float | None:
        sq = deviations.get((row, target, stat))
        if sq is not None:
            w = rule["prior_weight"]
            return math.sqrt((sum(sq) + w * prior[stat]) / (len(sq) + w))
        if lent and stat in lent:
            return lent[stat]
        if len(seed_values) > 1:
            return statistics.stdev(seed_values)
        return None

    groups = {}
    for row, members in _rows(main).items():
        members.sort(key=lambda r: r["seed"])
        stats = [_statistics(r) for r in members]
        targets = {}
        for target in stats[0]:
            entry = {}
            for stat in stats[0][target]:
                values = [s[target][stat] for s in stats if s[target].get(stat) is not None]
                if len(values) != len(stats):  # absent in some seed: not a stable statistic
                    continue
                s = sigma(row, target, stat, values)
                is_miou = stat == "miou"
                # a class without a known spread, or too unstable, is not stored; a fresh record (class_max_sigma
                # infinite) keeps every class, whatever its seeds, so that each stored one finds its value
                if not is_miou and math.isfinite(rule["class_max_sigma"]) and (s is None or s > rule["class_max_sigma"]):
                    continue
                entry[stat] = {"values": {str(r["seed"]): v for r, v in zip(members, values)}, "sigma": s}
            targets[target] = entry
        # what made this row, and which variants ran any of its cells (a row may come from another update)
        spread_from = []
        for other in others:
            hit = next((other[r["cell_id"]] for r in members if r["cell_id"] in other), None)
            if hit is not None and environment(hit) not in spread_from:
                spread_from.append(environment(hit))
        groups[row] = {"backbone": members[0]["backbone"], "row": members[0]["row"],
                       "cells": {str(r["seed"]): r["cell_id"] for r in members}, "targets": targets,
                       "made_with": environment(members[0]), "spread_from": spread_from}
    made = [environment(next(iter(main.values())))] + [environment(next(iter(o.values()))) for o in others if o]
    return {"schema": SCHEMA, "manifest": lm.manifest.name, "version": lm.manifest.version, "rule": dict(rule),
            "made_with": made[0], "spread_from": made[1:], "rows": groups}


def band(entry: dict[str, Any], stat: str, n: int, rule: dict[str, float]) -> float:
    """The largest change of ``stat`` the check lets pass for a mean over ``n`` fresh seeds."""
    floor = rule["floor_miou"] if stat == "miou" else rule["floor_class"]
    s = entry.get("sigma")
    if s is None:
        return floor
    return max(floor, rule["z"] * s * math.sqrt(2 / n))


def compare(stored: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """Every stored statistic of a row present in ``fresh`` that moved beyond its band, and every row or
    seed present on one side only."""
    return _compared(stored, fresh)[0]


def _compared(stored: dict[str, Any], fresh: dict[str, Any]) -> tuple[list[str], list[tuple[float, str]]]:
    """``compare``'s problems, and every compared statistic's (move / band, description)."""
    if stored.get("schema") != SCHEMA:
        raise UserError(f"stored regression numbers of schema {stored.get('schema')}, this version reads {SCHEMA}; "
                        "store them again with `fishertune regression update`")
    rule = stored["rule"]
    problems, moves = [], []
    for row in sorted(set(stored["rows"]) | set(fresh["rows"])):
        if row not in fresh["rows"]:
            problems.append(f"{row}: stored but not in this run")
            continue
        if row not in stored["rows"]:
            problems.append(f"{row}: new row with no stored numbers (regression update to store them)")
            continue
        old, new = stored["rows"][row], fresh["rows"][row]
        seeds = sorted(set(old["cells"]) & set(new["cells"]), key=int)
        if not seeds:
            problems.append(f"{row}: no seed in common with the stored ones ({', '.join(old['cells'])}); run those "
                            "seeds, or update")
            continue
        changed = [s for s in seeds if old["cells"][s] != new["cells"][s]]
        if changed:
            problems.append(f"{row}: seed {changed[0]} is cell {new['cells'][changed[0]]} now, "
                            f"{old['cells'][changed[0]]} when stored: its config changed; update")
            continue
        for target, entries in old["targets"].items():
            for stat, e in entries.items():
                value = new["targets"].get(target, {}).get(stat)
                if value is None:
                    problems.append(f"{row} {target} {stat}: stored, absent now")
                    continue
                before = statistics.fmean(e["values"][s] for s in seeds)
                now = statistics.fmean(value["values"][s] for s in seeds)
                b = band(e, stat, len(seeds), rule)
                what = (f"{row} {target} {stat}: {before:.2f} -> {now:.2f} ({now - before:+.2f}, band "
                        f"{b:.2f}, {len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
                moves.append((abs(now - before) / b, what))
                if abs(now - before) > b:
                    problems.append(what)
    return problems, moves


def fresh_record(lm: LoadedManifest, results: str | Path, only: list[str] | None = None) -> dict[str, Any]:
    """The selected cells' means in the stored record's shape (every class kept, no sigma)."""
    return build(lm, results, only=only, rule={**RULE, "class_max_sigma": math.inf})


def stored_path(lm: LoadedManifest, stored: str | Path | None = None) -> Path:
    return Path(stored) if stored else REGRESSION_DIR / f"{lm.results_name}.json"


def read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read stored regression numbers ({e}); restore it from git or store new "
                        "ones with `fishertune regression update`") from None


def update(lm: LoadedManifest, results: str | Path, spreads: list[str | Path] = (), out: str | Path | None = None,
           only: list[str] | None = None, bands_from: str | Path | None = None) -> tuple[Path, list[str]]:
    """Store the finished cells' numbers and bands on purpose, and say what moved beyond the old bands.
    With ``only``, the other stored rows are kept as they were; each row names what made it (``made_with``,
    and ``spread_from``: the variants that ran its cells), the record's own only the last update's. With
    ``bands_from`` (another manifest's stored record, of the same protocol), statistics without a measured
    spread take its pooled sigma."""
    path = stored_path(lm, out)
    lent = pooled_sigma(read(Path(bands_from))) if bands_from else None
    new = build(lm, results, spreads, only, lent=lent)
    if bands_from:
        new["bands_from"] = str(bands_from)
    moved: list[str] = []
    if path.is_file():
        old = read(path)
        if old.get("schema") == SCHEMA:
            moved = compare({**old, "rows": {k: v for k, v in old["rows"].items() if k in new["rows"]}}, new)
            if only:
                grid = {f"{c.backbone}--{c.row}" for c in lm.cells()}
                kept = {k: v for k, v in old["rows"].items() if k in grid and k not in new["rows"]}
                # the record's made_with and spread_from are this update's; every row carries its own, and a
                # row kept from a record written before rows did takes that record's
                for v in kept.values():
                    v.setdefault("made_with", old.get("made_with"))
                    v.setdefault("spread_from", old.get("spread_from", []))
                new["rows"] = {**kept, **new["rows"]}
                if kept and "bands_from" in old and "bands_from" not in new:  # the rows kept keep their lent bands
                    new["bands_from"] = old["bands_from"]
    atomic_write_text(path, json.dumps(new, indent=1, sort_keys=True) + "\n")
    return path, moved


def check(lm: LoadedManifest, results: str | Path, stored: str | Path | None = None,
          only: list[str] | None = None) -> list[str]:
    """Statistics of the finished cells ``only`` selects that moved beyond the stored bands (stored rows
    outside the selection are not compared)."""
    return check_report(lm, results, stored, only)[0]


def check_report(lm: LoadedManifest, results: str | Path, stored: str | Path | None = None,
                 only: list[str] | None = None) -> tuple[list[str], int, str | None]:
    """:func:`check`'s problems, how many statistics it compared, and the one that came closest to its band
    (the largest move as a share of its band): whether a check passed by a wide margin or narrowly."""
    problems, moves = _compared(*_check_pair(lm, results, stored, only))
    return problems, len(moves), (max(moves)[1] if moves else None)


def _check_pair(lm: LoadedManifest, results: str | Path, stored: str | Path | None,
                only: list[str] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stored record (its rows cut to the selection) and the fresh one that :func:`check` compares."""
    path = stored_path(lm, stored)
    if not path.is_file():
        raise UserError(f"no stored regression numbers at {path}; create them with "
                        f"`fishertune regression update {lm.path}`")
    old = read(path)
    fresh = fresh_record(lm, results, only)
    if only:
        old = {**old, "rows": {k: v for k, v in old.get("rows", {}).items() if k in fresh["rows"]}}
    return old, fresh
