"""The miniature's own figures as an instrument: results/perf/mini-signal.md.

    python benchmarks/mini/signal_figures.py [--results results/runs] [--other-python /path/to/other-venv/bin/python]

Four figures, each measured by running cells of the mini manifests with the suite's own runner (cells
already finished are reused, so after the main job this runs only what it adds):

1. **Pretraining matters**: each family's frozen tiny foundation model against the same architecture
   frozen at random initialisation (``benchmarks/mini/signal-random.yaml``), same head, budget and
   data; the ratio of their average mIoU (target: at least 2). Beside it (1b) the same pair with a
   linear probe instead of the Mask2Former head (``probe.yaml``, ``probe-random.yaml``): what the
   frozen features hold linearly, apart from what the head learns to make of them.
2. **Signal**: the best cell of the mini Table 1 (target: an average mIoU of at least 35).
3. **Seed spread**: the standard deviation over 3 seeds of the average mIoU of full, freeze and
   fishertune on two families (target: at most 1.0).
4. **Environment spread**: the same cells (seed 42) with 1 and with 2 CPU threads, and with another
   torch minor version (``--other-python``: the python of a second venv with that torch); how far each
   cell's average moves (target: at most 0.5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MINI = ROOT / "benchmarks" / "mini"
#: the rows and families of the spread figures
SPREAD_ROWS = ("full", "freeze", "fishertune")
SPREAD_BACKBONES = ("sam-tiny", "dinov2-tiny")
TARGETS = {"ratio": 2.0, "best": 35.0, "seed_std": 1.0, "env": 0.5}


def _run(python: str, manifest: Path, results: Path, only: list[str], extra: list[str] = ()) -> None:
    cmd = [python, "-m", "fishertune.cli", "run", str(manifest), "--results", str(results), "--no-render",
           "--only", *only, *extra]
    subprocess.run(cmd, cwd=ROOT, check=True)


def _results(results: Path, manifest: Path) -> list[dict]:
    """The finished results of ``manifest``'s cells (its seeds and 3) under ``results``: only the cells of
    today's configuration, not older ones of the same row (a changed protocol leaves those beside them)."""
    from fishertune.runner.manifest import load_manifest

    lm = load_manifest(manifest, {"seeds": 3})
    ids = {c.id for c in lm.cells()}
    found = [json.loads(p.read_text()) for p in sorted((results / lm.results_name).glob("*.json"))]
    return [r for r in found if r.get("status") == "done" and r.get("cell_id") in ids]


def _avg(rows: list[dict], backbone: str, row: str, seed: int | None = 42) -> float | None:
    for r in rows:
        if r["backbone"] == backbone and r["row"] == row and (seed is None or r["seed"] == seed):
            return r["aggregate"]["miou"]
    return None


def _probe_lines(main_rows: list[dict], random_rows: list[dict], probe: list[dict], probe_random: list[dict]) -> list[str]:
    """Figure 1b: the same pairs with a linear head (``probe.yaml``, ``probe-random.yaml``), beside figure 1's."""
    lines = ["### 1b. The same pairs with a linear probe instead of the Mask2Former head", "",
             "What the frozen features hold linearly (`benchmarks/mini/probe.yaml`: BatchNorm and a 1x1 convolution "
             "on the four feature maps, `fishertune/heads/linear.py`; same protocol, budget and data), beside what "
             "the mini protocol's Mask2Former head makes of them (figure 1).", "",
             "| family | probe: pretrained | probe: random init | probe ratio | Mask2Former ratio |",
             "| --- | --- | --- | --- | --- |"]
    ratios = []
    for b in sorted({r["backbone"] for r in probe}):
        pre, rnd = _avg(probe, b, "freeze"), _avg(probe_random, b, "freeze")
        m_pre, m_rnd = _avg(main_rows, b, "freeze"), _avg(random_rows, b, "freeze")
        ratio = pre / rnd if pre is not None and rnd else None
        m_ratio = m_pre / m_rnd if m_pre is not None and m_rnd else None
        ratios.append(ratio)
        fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
        lines.append(f"| {b} | {fmt(pre, '.1f')} | {fmt(rnd, '.1f')} | {fmt(ratio, '.2f')} | {fmt(m_ratio, '.2f')} |")
    valid = [x for x in ratios if x is not None]
    if valid:
        lines += ["", f"Probe ratio at or above 2: {sum(x >= TARGETS['ratio'] for x in valid)} of {len(valid)} "
                      f"(mean {statistics.fmean(valid):.2f})."]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(ROOT / "results" / "runs"), help="results root (default: %(default)s)")
    p.add_argument("--other-python", help="python of a second venv with another torch minor version")
    p.add_argument("--out", default=str(ROOT / "results" / "perf" / "mini-signal.md"))
    args = p.parse_args(argv)
    from fishertune.runner.store import atomic_write_text

    started = time.perf_counter()
    results = Path(args.results)
    here = sys.executable
    table1 = MINI / "table1.yaml"
    spread_cells = [f"{b}--{r}--*" for b in SPREAD_BACKBONES for r in SPREAD_ROWS]

    _run(here, table1, results, ["*"])  # the main job (reused when done)
    _run(here, MINI / "signal-random.yaml", results, ["*"])
    _run(here, MINI / "probe.yaml", results, ["*"])
    _run(here, MINI / "probe-random.yaml", results, ["*"])
    _run(here, table1, results, spread_cells, ["--seeds", "3"])
    threads = results.parent / f"{results.name}-threads2"
    _run(here, table1, threads, spread_cells, ["--threads", "2", "--jobs", "1"])
    other = None
    if args.other_python:
        other = results.parent / f"{results.name}-other-torch"
        _run(args.other_python, table1, other, spread_cells)

    import torch

    main_rows = _results(results, table1)
    random_rows = _results(results, MINI / "signal-random.yaml")
    lines = ["# The miniature as an instrument", "",
             f"Written by `python benchmarks/mini/signal_figures.py` ({time.perf_counter() - started:.0f} s for what it ran "
             f"on top of finished cells), torch {torch.__version__}, {main_rows[0]['device']}.", ""]

    lines += ["## 1. Frozen pretrained vs frozen random initialisation (target: ratio >= 2)", "",
              "| family | frozen pretrained | frozen random init | ratio |", "| --- | --- | --- | --- |"]
    ratios = []
    for r in sorted(random_rows, key=lambda r: r["backbone"]):
        pre = _avg(main_rows, r["backbone"], "freeze")
        ratio = pre / r["aggregate"]["miou"] if pre and r["aggregate"]["miou"] else None
        ratios.append(ratio)
        lines.append(f"| {r['backbone']} | {pre:.1f} | {r['aggregate']['miou']:.1f} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'} |")
    valid = [x for x in ratios if x is not None]
    lines += ["", f"Mean ratio {statistics.fmean(valid):.2f}; families at or above 2: "
                  f"{sum(x >= TARGETS['ratio'] for x in valid)} of {len(valid)}.", ""]
    lines += _probe_lines(main_rows, random_rows, _results(results, MINI / "probe.yaml"),
                          _results(results, MINI / "probe-random.yaml"))

    best = max((r for r in main_rows if r["seed"] == 42), key=lambda r: r["aggregate"]["miou"])
    lines += ["## 2. The best mini Table 1 cell (target: >= 35)", "",
              f"{best['backbone']} {best['row']}: average mIoU {best['aggregate']['miou']:.1f} "
              "(" + ", ".join(f"{t} {v['miou']:.1f}" for t, v in best["targets"].items()) + ").", ""]

    lines += ["## 3. Seed spread: standard deviation of the average mIoU over 3 seeds (target: <= 1.0)", "",
              "| cell | seeds 42, 43, 44 | mean | std |", "| --- | --- | --- | --- |"]
    stds = []
    for b in SPREAD_BACKBONES:
        for row in SPREAD_ROWS:
            values = [_avg(main_rows, b, row, s) for s in (42, 43, 44)]
            values = [v for v in values if v is not None]
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            stds.append(sd)
            lines.append(f"| {b} {row} | {', '.join(f'{v:.2f}' for v in values)} | {statistics.fmean(values):.2f} | "
                         f"{sd:.2f} |")
    lines += ["", f"Largest: {max(stds):.2f}.", ""]

    lines += ["## 4. Environment spread: the same cells, seed 42, elsewhere (target: each moves <= 0.5)", ""]
    variants = [("2 threads instead of 1", _results(threads, table1))]
    if other is not None:
        other_rows = _results(other, table1)
        variants.append((f"torch {other_rows[0]['versions']['torch']} instead of {torch.__version__}", other_rows))
    header = "| cell | this run | " + " | ".join(name for name, _ in variants) + " |"
    lines += [header, "| --- | --- | " + " | ".join("---" for _ in variants) + " |"]
    worst = {name: 0.0 for name, _ in variants}
    for b in SPREAD_BACKBONES:
        for row in SPREAD_ROWS:
            base = _avg(main_rows, b, row)
            cells = []
            for name, rows in variants:
                v = _avg(rows, b, row)
                worst[name] = max(worst[name], abs(v - base))
                cells.append(f"{v:.2f} ({v - base:+.2f})")
            lines.append(f"| {b} {row} | {base:.2f} | " + " | ".join(cells) + " |")
    lines += [""] + [f"Largest move with {name}: {w:.2f}." for name, w in worst.items()]
    if other is None:
        lines.append("Another torch minor version: not measured in this run (give --other-python).")
    out = Path(args.out)
    atomic_write_text(out, "\n".join(lines) + "\n")  # the runner's writer: a killed run leaves the old report
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
