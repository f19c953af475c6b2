"""Full-size smoke on the CPU: every full-size family from a checkpoint in its release's layout, every method,
one training step at batch 1 and crop 512; writes ``results/perf/full-size-cpu.md``.

    nice -n 19 python benchmarks/perf/full_size_cpu.py          # Table 1's five families x every method
    python benchmarks/perf/full_size_cpu.py --backbones dinov2-l --methods full freeze --out /tmp/smoke.md
    nice -n 19 python benchmarks/perf/full_size_cpu.py --resume   # keep the rows measured, run the others

``--resume`` continues a report made on the same machine (CPU model, cores, PyTorch, threads, as its header
names them) and refuses one made elsewhere: step times of two CPUs in one table compare neither.

For each backbone the checkpoint is written once (random weights, in the layout of the official release:
``fishertune.backbones.official``) into a temporary folder, deleted after its methods. Each backbone x method
then runs in a process of its own, one at a time, so that its peak resident memory is its own:

* build: ``runner.run.prepare_cell`` on a manifest over ``benchmarks/table1.yaml`` naming that checkpoint (the
  family's loader reads and converts it, Rein's Mask2Former, the method's ``apply``);
* estimate: the method's ``before_training``; FisherTune and ChildTune on **two images** (FisherTune with its
  direct estimator: the variational one keeps about ten fp32 copies of the blocks' parameters), since the
  smoke times the step, not the estimate (``fishertune cost`` counts the estimate at its configured size);
* step: ``engine.train.train`` for one iteration at batch 1 in the protocol's fp32 (one synthetic 1024x512
  street-like frame through Rein's augmentation, forward and Mask2Former's losses with the matching, backward,
  the optimizer's step), in wall and CPU seconds;
* peak RSS: the process's peak resident memory over everything, and during the step alone (the peak reset
  before it, Linux's ``clear_refs``; with the checkpoint's tensors freed, the step's peak is the model, its
  gradients and optimizer state, and the step's activations).

PyTorch uses its default intra-op threads (the machine's cores). The wall times follow what else runs on the
machine (the file records the load average before and after); the CPU seconds do less so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import cells

OUT = cells.ROOT / "results" / "perf" / "full-size-cpu.md"


def one_cell(manifest: Path, cell_id: str) -> dict:
    """Build, estimate and train one step of ``cell_id`` of ``manifest`` here; what it cost."""
    from fishertune.engine.train import train
    from fishertune.runner.manifest import load_manifest
    from fishertune.runner.run import prepare_cell, select_cells
    from fishertune.tuning import parameter_counts

    lm = load_manifest(manifest)
    (cell,) = select_cells(lm.cells(), [cell_id])
    m = lm.manifest
    source = cells.SyntheticSource(n=2)
    device = torch.device("cpu")

    def clock():
        return time.perf_counter(), time.process_time()

    start = clock()
    segmentor, method, ctx, transform, _ = prepare_cell(lm, cell, source, device)
    built = clock()
    method.before_training(segmentor, ctx)
    estimated = clock()
    whole = cells.peak_rss_gb()
    reset = cells.reset_peak_rss()
    stats = train(segmentor, method, source, transform, iterations=m.train.iterations, batch_size=m.train.batch_size,
                  lr=m.train.lr, weight_decay=m.train.weight_decay, poly_power=m.train.poly_power,
                  warmup=m.train.warmup_iterations, seed=m.seed, device=device, num_workers=m.execution.num_workers,
                  log_every=1, precision=m.train.precision)
    stepped = clock()
    return {"backbone": cell.backbone, "method": cell.row, **parameter_counts(segmentor, method),
            "build_s": built[0] - start[0], "estimate_s": estimated[0] - built[0],
            "step_s": stepped[0] - estimated[0], "step_cpu_s": stepped[1] - estimated[1],
            "loss": stats.losses[0][1], "peak_rss_gb": max(whole, cells.peak_rss_gb()),
            "step_peak_rss_gb": cells.peak_rss_gb() if reset else None}


#: the report's table columns, in order: what :func:`read_rows` gives back
COLUMNS = ("backbone", "method", "checkpoint_gb", "backbone_trainable", "build_s", "estimate_s", "step_s",
           "step_cpu_s", "loss", "peak_rss_gb", "step_peak_rss_gb")


def read_rows(path: Path) -> list[dict]:
    """The measured rows of an earlier report at ``path`` (its table; failures are not rows), for ``--resume``:
    the values as the table prints them, so that the report renders them again the same."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        if not line.startswith("| `"):
            continue
        values = dict(zip(COLUMNS, (c.strip().strip("`") for c in line.strip().strip("|").split("|"))))
        row = {k: float(v) for k, v in values.items() if k not in ("backbone", "method", "backbone_trainable",
                                                                    "step_peak_rss_gb")}
        rows.append({**row, "backbone": values["backbone"], "method": values["method"],
                     "backbone_trainable": float(values["backbone_trainable"].rstrip("M")) * 1e6,
                     "step_peak_rss_gb": None if values["step_peak_rss_gb"] == "-" else float(values["step_peak_rss_gb"])})
    return rows


def machine() -> str:
    """Where the steps are timed, as the report's header names it: cores, CPU model, PyTorch, threads."""
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (f"a {os.cpu_count()}-core CPU ({cpu}), PyTorch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op threads")


def read_machine(path: Path) -> str | None:
    """The machine an earlier report at ``path`` names in its header (:func:`machine`), or None."""
    found = re.search(r"\) on (a \d+-core CPU .*? intra-op threads); load average", path.read_text())
    return found.group(1) if found else None


def run(backbones: list[str], methods: list[str], out: Path, resume: bool = False) -> Path:
    from fishertune.backbones.official import write_official
    from fishertune.runner.manifest import load_manifest
    from fishertune.runner.store import atomic_write_text

    if resume and out.exists() and read_machine(out) not in (None, machine()):
        print(f"error: --resume: {out} was measured on {read_machine(out)}; this run is on {machine()}: a table "
              f"of step times from two machines compares neither; run without --resume to measure every row here, "
              f"or write elsewhere with --out FILE", file=sys.stderr)
        raise SystemExit(2)
    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()[0]
    try:
        rows, failures = (read_rows(out) if resume else []), []
    except (ValueError, KeyError) as e:
        print(f"error: --resume: {out} has a table row this script cannot read ({e}); run without --resume to "
              f"measure every row again", file=sys.stderr)
        raise SystemExit(2) from None
    kept = len(rows)
    done = {(r["backbone"], r["method"]) for r in rows}
    for backbone in backbones:
        if all((backbone, m) in done for m in methods):
            continue
        folder = Path(tempfile.mkdtemp(prefix=f"smoke-{backbone}-"))
        try:
            t = time.perf_counter()
            path = write_official(backbone, folder)
            written = time.perf_counter() - t
            manifest = cells.write_manifest(folder / "smoke.yaml", [backbone], methods, {backbone: path}, batch=1)
            for cell in load_manifest(manifest).cells():
                if (cell.backbone, cell.row) in done:
                    continue
                print(f"[smoke] {cell.id}", flush=True)
                proc = subprocess.run([sys.executable, __file__, "--cell", str(manifest), cell.id],
                                      capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
                if proc.returncode:
                    failures.append((cell.id, (proc.stderr.strip().splitlines() or ["?"])[-1]))
                    print(f"[smoke] failed: {failures[-1][1]}", flush=True)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append({**row, "checkpoint_gb": path.stat().st_size / 2**30, "write_s": written})
                print(f"[smoke] step {row['step_s']:.1f} s, peak RSS {row['peak_rss_gb']:.1f} GB", flush=True)
                # after every row, so that a run stopped part-way keeps what it measured (marked partial)
                atomic_write_text(out, render(rows, failures, started, load_before, os.getloadavg()[0], backbones,
                                              methods, total=len(backbones) * len(methods), kept=kept))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    atomic_write_text(out, render(rows, failures, started, load_before, os.getloadavg()[0], backbones, methods,
                                  kept=kept))
    return out


def render(rows: list[dict], failures: list, started: datetime, load_before: float, load_after: float,
           backbones: list[str], methods: list[str], total: int | None = None, kept: int = 0) -> str:
    """The Markdown report; with ``total``, a run still under way (or stopped) that has done ``len(rows)`` of
    ``total`` rows says so in its first lines; ``kept`` rows came from an earlier run (``--resume``)."""
    order = {(b, m): i for i, (b, m) in enumerate((b, m) for b in backbones for m in methods)}
    rows = sorted(rows, key=lambda r: order.get((r["backbone"], r["method"]), len(order)))
    command = ("python benchmarks/perf/full_size_cpu.py --backbones " + " ".join(backbones)
               + " --methods " + " ".join(methods))
    lines = [
        "# Full-size smoke on the CPU: one training step of every family x method",
        "",
        *([f"**Partial**: {len(rows) + len(failures)} of {total} rows so far (the run was under way or stopped "
           "when this was written).", ""] if total is not None else []),
        *([f"Resumed (`--resume`): {kept} rows were measured by an earlier run of this command on the same machine "
           "and kept; the header's start time and load averages are this run's.", ""] if kept else []),
        f"Written by `{command}` (started {started:%Y-%m-%d %H:%M UTC}) on {machine()}; load average "
        f"{load_before:.1f} before and {load_after:.1f} after (the machine was shared: wall times follow the load, "
        "CPU seconds less so). Nothing here is typed by hand; how each figure is measured: the script's docstring.",
        "",
        "Each backbone's checkpoint is written in its official release's layout with random weights "
        "(`fishertune.backbones.official`) and read by its family's loader; Rein's Mask2Former head, crop 512, "
        "batch 1, fp32, one process per row. **FisherTune and ChildTune estimate on two images** (FisherTune with "
        "its direct estimator): the smoke times their step, not their estimate (`fishertune cost` counts that).",
        "",
        "| backbone | method | checkpoint GB | trainable backbone | build s | estimate s | step s | step CPU s "
        "| loss | peak RSS GB | during the step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['backbone']}` | `{r['method']}` | {r['checkpoint_gb']:.2f} | "
                     f"{r['backbone_trainable'] / 1e6:.2f}M | {r['build_s']:.1f} | {r['estimate_s']:.1f} | "
                     f"{r['step_s']:.1f} | {r['step_cpu_s']:.1f} | {r['loss']:.2f} | {r['peak_rss_gb']:.1f} | "
                     + ("-" if r["step_peak_rss_gb"] is None else f"{r['step_peak_rss_gb']:.1f}") + " |")
    if failures:
        lines += ["", "Failed:", ""] + [f"- `{cell}`: {why}" for cell, why in failures]
    return "\n".join(lines) + "\n"


def main() -> int:
    from fishertune.report.params import full_size_backbones
    from fishertune.runner.manifest import load_manifest
    from fishertune.tuning import registered_methods

    table1 = load_manifest(cells.TABLE1).manifest
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", nargs="+", default=list(table1.backbones), choices=full_size_backbones(),
                   help="full-size backbones (default: Table 1's, one per family)")
    p.add_argument("--methods", nargs="+", default=list(table1.methods), choices=registered_methods(),
                   help="methods (default: Table 1's)")
    p.add_argument("--out", type=Path, default=OUT, help="the Markdown written (default: results/perf/full-size-cpu.md)")
    p.add_argument("--resume", action="store_true", help="keep the rows the report at --out already has and run "
                                                          "only the others (its failures again); refused when that "
                                                          "report was measured on another machine")
    p.add_argument("--cell", nargs=2, metavar=("MANIFEST", "CELL_ID"), help=argparse.SUPPRESS)  # a child's job
    args = p.parse_args()
    if args.cell:
        print(json.dumps(one_cell(Path(args.cell[0]), args.cell[1])))
        return 0
    print(f"wrote {run(args.backbones, args.methods, args.out, args.resume)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
