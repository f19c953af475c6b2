"""``fishertune compare A B``: two result sets side by side, each difference with its interval.

What someone adding a baseline or changing a method runs before and after: the cells of both folders
are matched by manifest name, backbone and row (the cell ids may differ, since a changed config changes
them), their seeds grouped, and per target (and for the aggregate) the difference ``B - A`` of the means
is given with Welch's interval over seeds (:mod:`fishertune.report.stats`); a difference is marked when
its interval excludes 0. Rows with one seed on a side show the difference and ``n=1``: run them with
``--seeds 3`` to test them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fishertune.errors import UserError
from fishertune.report.stats import LEVEL, TEST_NAME, estimate, welch
from fishertune.report.tables import latest_configs
from fishertune.runner.store import iter_results

Key = tuple[str, str, str]  # manifest name, backbone, row


def grouped(results: str | Path, manifest: str | None = None) -> dict[Key, list[dict[str, Any]]]:
    """Finished results under ``results`` grouped by (manifest name, backbone, row): one list of seeds each,
    of one configuration (the newest: :func:`~fishertune.report.tables.latest_configs`)."""
    out: dict[Key, list[dict[str, Any]]] = {}
    found = [(path, r) for path, r in iter_results(results)
             if r.get("status", "done") == "done" and "manifest" in r
             and (manifest is None or r["manifest"]["name"] == manifest)]
    for r in latest_configs(found):
        out.setdefault((r["manifest"]["name"], r["backbone"], r["row"]), []).append(r)
    return out


def compare_rows(a: str | Path, b: str | Path, manifest: str | None = None, level: float = LEVEL) -> list[dict[str, Any]]:
    """One row per (manifest, backbone, row, target) present on both sides, plus one for the aggregate."""
    left, right = grouped(a, manifest), grouped(b, manifest)
    common = [k for k in left if k in right]
    if not common:
        which = f" of manifest {manifest!r}" if manifest else ""
        raise UserError(f"no finished cells{which} are in both {a} and {b} (matched by manifest name, backbone and "
                        "row); run the same manifest into both folders first")
    rows = []
    for key in common:
        targets = [t for t in left[key][0]["targets"] if all(t in r["targets"] for r in left[key] + right[key])]
        for target in [*targets, "aggregate"]:
            def values(side):
                return [r["aggregate"]["miou"] if target == "aggregate" else r["targets"][target]["miou"]
                        for r in side]

            ea, eb = estimate(values(left[key])), estimate(values(right[key]))
            d = welch(eb, ea, level)
            rows.append({"manifest": key[0], "backbone": key[1], "row": key[2], "target": target,
                         "a": ea, "b": eb, "difference": d})
    return rows


def format_rows(rows: list[dict[str, Any]], a: str, b: str, level: float = LEVEL) -> str:
    """A Markdown table of :func:`compare_rows` and a line saying how many differences exceed the noise."""
    from tabulate import tabulate

    body = [[r["manifest"], r["backbone"], r["row"], r["target"], r["a"].format(), r["b"].format(),
             r["difference"].format()] for r in rows]
    table = tabulate(body, headers=["manifest", "backbone", "row", "target", f"A: {a}", f"B: {b}",
                                    f"B - A [{level:.0%} interval]"], tablefmt="github", disable_numparse=True)
    tested = [r for r in rows if r["difference"].tested]
    beyond = [r for r in tested if r["difference"].significant]
    untested = len(rows) - len(tested)
    summary = (f"{len(beyond)} of {len(tested)} tested differences exceed the noise ({TEST_NAME}, {level:.0%})"
               + (f"; {untested} with one seed on a side are not tested (run them with --seeds 3)" if untested else ""))
    return f"{table}\n\n{summary}\n"
