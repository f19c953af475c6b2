"""``fishertune status``: where each cell of a manifest stands, read from the results directory alone."""

from __future__ import annotations

import socket
import statistics
import time
from dataclasses import dataclass

from fishertune.engine.checkpoint import Checkpoint
from fishertune.errors import UserError
from fishertune.runner.lock import holder
from fishertune.runner.manifest import Cell, LoadedManifest
from fishertune.runner.store import ResultStore


@dataclass
class CellState:
    cell: Cell
    state: str  # done | running | failed | pending
    detail: str
    miou: float | None = None  # a finished cell's aggregate mIoU


def _ago(t: float) -> str:
    s = max(time.time() - t, 0)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def _checkpoint_note(store: ResultStore, cell: Cell) -> str:
    try:
        it = Checkpoint(store.checkpoint_path(cell.id), 0).iteration()
    except UserError as e:
        return f"; unreadable checkpoint: {e}"
    return "" if it is None else f"; checkpoint after iteration {it}"


def cell_states(lm: LoadedManifest, results: str, only: list[str] | None = None) -> list[CellState]:
    from fishertune.runner.run import select_cells

    store = ResultStore(results, lm.results_name)
    out = []
    for cell in select_cells(lm.cells(), only):
        r = store.read(cell.id)
        if r is not None and r.get("status", "done") == "done":
            miou = r["aggregate"]["miou"]
            out.append(CellState(cell, "done", f"mIoU {miou:.1f}, {r['wall_time_s'] / 60:.1f} min", miou))
            continue
        if r is not None:
            f = r.get("failure", {})
            out.append(CellState(cell, "failed", f.get("reason", "no reason recorded")))
            continue
        who = holder(store.lock_path(cell.id))
        if who is not None:
            host = who.get("host", "?")
            where = "this machine" if host == socket.gethostname() else host
            since = f", started {_ago(who['started'])}" if "started" in who else ""
            out.append(CellState(cell, "running", f"process {who.get('pid', '?')} on {where}{since}, heartbeat "
                                 f"{_ago(who['heartbeat'])}{_checkpoint_note(store, cell)}"))
            continue
        out.append(CellState(cell, "pending", _checkpoint_note(store, cell).removeprefix("; ")))
    return out


def format_states(lm: LoadedManifest, states: list[CellState]) -> str:
    """One line per cell; with several seeds, the cells of one backbone and row grouped under a line with
    their seeds and the mean +- standard deviation of the finished ones' mIoU."""
    width = max(len(s.cell.id) for s in states)
    lines = []
    if len(lm.manifest.seed_list) > 1:
        groups: dict[tuple[str, str], list[CellState]] = {}
        for st in states:
            groups.setdefault((st.cell.backbone, st.cell.row), []).append(st)
        for (backbone, row), members in groups.items():
            done = [m.miou for m in members if m.state == "done"]
            summary = ", ".join(f"{sum(m.state == k for m in members)} {k}" for k in ("done", "running", "failed",
                                                                                          "pending")
                                if any(m.state == k for m in members))
            if done:
                spread = f" +- {statistics.stdev(done):.1f}" if len(done) > 1 else ""
                summary += f"; mIoU {statistics.fmean(done):.1f}{spread} over {len(done)}"
            lines.append(f"{backbone} {row}: seeds {' '.join(str(m.cell.seed) for m in members)}: {summary}")
            lines += [f"  {m.state:8s} seed {m.cell.seed:<6d} {m.cell.id:{width}s}  {m.detail}".rstrip() for m in members]
    else:
        lines = [f"{s.state:8s} {s.cell.id:{width}s}  {s.detail}".rstrip() for s in states]
    counts = {k: sum(s.state == k for s in states) for k in ("done", "running", "failed", "pending")}
    lines.append(f"{lm.results_name}: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return "\n".join(lines)
