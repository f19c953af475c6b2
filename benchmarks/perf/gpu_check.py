"""The first GPU's check: what a full-size cell costs on it, in under 8 minutes (one H100 or H200).

    python benchmarks/perf/gpu_check.py                        # writes results/perf/<gpu>.md and .json
    python benchmarks/perf/gpu_check.py --budget 300           # a shorter budget (seconds, the whole script)
    python benchmarks/perf/gpu_check.py --device cpu --tiny --families dinov2-tiny --mini-iterations 4 \\
        --compile-backend eager --out /tmp/dry.md              # the CPU dry run (tests/test_gpu_check.py)

For each of Table 1's five families (``--families``), a checkpoint is written in its release's layout with
random weights (``fishertune.backbones.official``, in parallel processes, before CUDA starts) and the cell
``<family>--full`` of Rein's protocol (Mask2Former, crop 512, batch 4) is built from it as a run builds it
(``runner.run.prepare_cell``), in bf16 autocast (``train.precision: bf16``):

1. **eager**: images/s at batch 4 (the median of ``--steps`` steps after 3 of warm-up, the street-like labels
   of 4 batches in turn, each a training step as ``engine.train.train`` takes it); TFLOP/s (one step's FLOPs,
   ``FlopCounterMode``, times steps/s) and its fraction of the device's dense bf16 peak; the peak memory of a
   step (``torch.cuda.max_memory_allocated``); the host synchronisations of a step
   (``torch.cuda.set_sync_debug_mode("warn")``: the count of warnings; the Hungarian matching's are expected,
   one per decoder layer and image, and the targets' one);
2. **the largest batch** that fits, doubling from 4 (a power of two times 4, at most 512), with its images/s,
   TFLOP/s and peak memory;
3. **evaluation**: sliding windows per second on one image of BDD100K's test size, and **the projected time of
   one Table 1 cell** (``report.perf.project_cell``: 40k iterations of batch 4 at the eager images/s, every
   target's windows at that rate; data loading not counted);
4. **a mini cell** (``benchmarks/mini/table1.yaml``, ``dinov2-tiny`` full, 400 steps, on the miniature it
   synthesises) on the device against its CPU numbers in ``results/regression/mini-table1.json``: mIoU per target
   and the largest per-class difference (a report: float order differs between devices, and 400 steps of a
   tiny model amplify it; the regression tolerance is for the machine that wrote the numbers);
5. **compiled** (``execution.compile``: ``torch.compile`` of the loss module), while the budget allows, family by
   family: the seconds the first 4 steps took (compilation, recompiles for other label shapes included), then
   images/s; a family the remaining budget cannot cover (1.3 x the first one's compile time, or 2 minutes
   before that one) is listed as skipped.

The record names the device, PyTorch, CUDA and the wall time; nothing in it is typed by hand. On the CPU
(``--device cpu``) there is no allocator, sync mode or largest batch: those columns stay empty.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

import cells

MINI = cells.ROOT / "benchmarks" / "mini" / "table1.yaml"
REGRESSION = cells.ROOT / "results" / "regression" / "mini-table1.json"
MAX_BATCH = 512
COMPILE_STEPS = 4  # the first compiled steps, one per label batch: compilation and recompiles
FIRST_COMPILE_GUESS_S = 120.0  # before the first family's compile time is known


def write_checkpoints(names: list[str], folder: Path) -> dict[str, Path]:
    """Each family's release-layout file, written in parallel processes (spawned: no CUDA state shared)."""
    from fishertune.backbones.official import write_official

    with ProcessPoolExecutor(max_workers=len(names), mp_context=get_context("spawn")) as pool:
        futures = {name: pool.submit(write_official, name, folder) for name in names}
        return {name: f.result() for name, f in futures.items()}


def _median_rate(times: list[float], n: int) -> float:
    return n / statistics.median(times)


class Cell:
    """A built cell (``prepare_cell``) with its optimizer and label batches, stepped as ``engine.train`` steps."""

    def __init__(self, lm, cell, device: torch.device, precision: str, source):
        from fishertune.data import NUM_CLASSES
        from fishertune.engine.optim import build_optimizer
        from fishertune.report.perf import street_batch
        from fishertune.runner.run import prepare_cell

        m = lm.manifest
        self.device, self.precision, self.batch, self.crop = device, precision, m.train.batch_size, m.train.crop_size
        start = time.perf_counter()
        self.model, self.method, ctx, _, _ = prepare_cell(lm, cell, source, device)
        self.build_s = time.perf_counter() - start
        self.method.before_training(self.model, ctx)
        self.model.train()
        self.optimizer = build_optimizer(self.model, m.train.lr, m.train.weight_decay,
                                         sparse=self.method.sparse_indices(self.model))
        self.batches = [tuple(t.to(device) for t in street_batch(self.batch, self.crop, NUM_CLASSES, seed))
                        for seed in range(4)]
        self.loss_fn = self.model.loss
        self.steps = 0

    def step(self, batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        images, labels = batch or self.batches[self.steps % len(self.batches)]
        cells.train_step(self.loss_fn, self.model, self.method, self.optimizer, images, labels, self.device,
                         self.precision, self.steps)
        self.steps += 1

    def sized(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        from fishertune.data import NUM_CLASSES
        from fishertune.report.perf import street_batch

        return tuple(t.to(self.device) for t in street_batch(n, self.crop, NUM_CLASSES, n))


def eager_figures(cell: Cell, steps: int, peak_tflops: float | None) -> dict[str, Any]:
    from fishertune.report.perf import flop_counter

    cuda = cell.device.type == "cuda"
    for _ in range(3):
        cell.step()
    counter = flop_counter()
    with counter:
        cell.step()
    gflop = counter.get_total_flops() / 1e9
    times = [cells.timed(cell.step, cell.device) for _ in range(steps)]
    ips = _median_rate(times, cell.batch)
    out = {"build_s": round(cell.build_s, 1), "batch": cell.batch, "gflop_per_step": round(gflop, 1), "images_per_s": round(ips, 2),
           "tflops": round(gflop / cell.batch * ips / 1e3, 2)}
    if peak_tflops:
        out["peak_fraction"] = round(out["tflops"] / peak_tflops, 3)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cell.step()
        cells.sync(cell.device)
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                cell.step()
                cells.sync(cell.device)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out["syncs_per_step"] = sum("synchroniz" in str(w.message) for w in caught)
        big = cells.largest_batch(lambda b: cell.step(cell.sized(b)), cell.batch, MAX_BATCH, cell.device,
                                  clear=lambda: cell.optimizer.zero_grad(set_to_none=True))
        big["tflops_largest_batch"] = round(gflop / cell.batch * big["images_per_s_largest_batch"] / 1e3, 2)
        if peak_tflops:
            big["peak_fraction_largest_batch"] = round(big["tflops_largest_batch"] / peak_tflops, 3)
        out |= big
    return out


def eval_figures(cell: Cell, lm) -> tuple[dict[str, Any], float]:
    from fishertune.data import NUM_CLASSES
    from fishertune.engine.evaluate import slide_logits, window_origins
    from fishertune.engine.train import autocast

    m = lm.manifest
    w, h = m.eval.test_sizes["bdd100k"] if "bdd100k" in m.eval.test_sizes else (1280, 720)
    crop, stride = m.eval.crop_size, m.eval.stride
    windows = len(window_origins(h, crop, stride)) * len(window_origins(w, crop, stride))
    image = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1)).to(cell.device)
    cell.model.eval()

    def slide():
        with autocast(cell.device, cell.precision):
            slide_logits(cell.model, image, NUM_CLASSES, crop, stride, m.execution.eval_batch)

    slide()
    times = [cells.timed(slide, cell.device) for _ in range(5)]
    cell.model.train()
    rate = _median_rate(times, windows)
    return {"eval_windows_per_s": round(rate, 2)}, rate


def compiled_figures(cell: Cell, steps: int, backend: str | None) -> dict[str, Any]:
    from fishertune.engine.train import LossModule

    torch._dynamo.reset()
    cell.loss_fn = torch.compile(LossModule(cell.model), **({"backend": backend} if backend else {}))
    start = time.perf_counter()
    for _ in range(COMPILE_STEPS):
        cell.step()
    cells.sync(cell.device)
    compile_s = time.perf_counter() - start
    times = [cells.timed(cell.step, cell.device) for _ in range(steps)]
    return {"compile_s": round(compile_s, 1), "images_per_s_compiled": round(_median_rate(times, cell.batch), 2)}


def mini_cell(device: torch.device, iterations: int | None, results: Path) -> dict[str, Any]:
    """The mini Table 1's ``dinov2-tiny`` full cell here, against the stored CPU numbers of the same cell."""
    from fishertune.runner.manifest import load_manifest
    from fishertune.runner.run import run_manifest, select_cells

    lm = load_manifest(MINI, {"train": {"iterations": iterations}} if iterations else None)
    (cell,) = select_cells(lm.cells(), ["dinov2-tiny--full--*"])
    start = time.perf_counter()
    run_manifest(lm, str(results), only=[cell.id], device=device.type, progress=False)
    result = json.loads((results / lm.results_name / f"{cell.id}.json").read_text())
    stored = json.loads(REGRESSION.read_text()).get("rows", {})  # regression schema 2: rows of seeds
    seed = str(cell.seed)
    cpu = stored.get(f"{cell.backbone}--{cell.row}")
    cpu = cpu if cpu is not None and seed in cpu["cells"] else None
    out: dict[str, Any] = {"cell": cell.id, "iterations": lm.manifest.train.iterations,
                           "seconds": round(time.perf_counter() - start, 1), "stored_cell": cpu is not None,
                           "same_cell_as_stored": cpu is not None and cpu["cells"][seed] == cell.id}
    for target, r in result["targets"].items():
        row = {"miou": round(r["miou"], 2)}
        theirs = cpu["targets"].get(target) if cpu is not None else None
        if theirs:
            row["miou_cpu"] = round(theirs["miou"]["values"][seed], 2)
            diffs = [abs(a - theirs[k]["values"][seed]) for k, a in r["per_class_iou"].items()
                     if a is not None and k in theirs and k != "miou"]
            row["max_class_diff"] = round(max(diffs), 2) if diffs else None
        out[target] = row
    return out


def run(args) -> dict[str, Any]:
    from fishertune.report.perf import bf16_peak_tflops, project_cell, real_protocol
    from fishertune.runner.manifest import load_manifest

    started = time.perf_counter()
    deadline = started + args.budget
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    if args.tiny:
        manifest = MINI
        source = cells.SyntheticSource(n=4, size=(128, 64))
        written = 0.0
    else:
        weights = write_checkpoints(args.families, tmp / "weights")  # before CUDA starts
        written = time.perf_counter() - started
        manifest = cells.write_manifest(tmp / "gpu-check.yaml", args.families, ["full"], weights, batch=4,
                                        crop=args.crop, precision=args.precision)
        source = cells.SyntheticSource(n=4, size=(1024, 512))
    device = torch.device(args.device)
    lm = load_manifest(manifest, {"train": {"precision": args.precision}})
    chosen = {c.backbone: c for c in lm.cells() if c.method == "full" and c.backbone in args.families}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = bf16_peak_tflops(name) if device.type == "cuda" and args.precision == "bf16" else None
    protocol = real_protocol(lm.manifest, "")
    families: dict[str, dict[str, Any]] = {}
    for backbone in args.families:
        print(f"[gpu-check] {backbone}: eager", flush=True)
        cell = Cell(lm, chosen[backbone], device, args.precision, source)
        fig = eager_figures(cell, args.steps, peak)
        ev, rate = eval_figures(cell, lm)
        proj = project_cell(protocol, fig["images_per_s"], rate)
        families[backbone] = fig | ev | {"projected_cell_h": round(proj["total_s"] / 3600, 2)}
        del cell
        _free(device)
    print("[gpu-check] mini cell", flush=True)
    mini = mini_cell(device, args.mini_iterations, tmp / "runs")
    guess, measured = FIRST_COMPILE_GUESS_S, False
    for backbone in args.families:
        if time.perf_counter() + 1.3 * guess > deadline:
            families[backbone]["compile"] = "skipped: the budget left would not cover it"
            continue
        print(f"[gpu-check] {backbone}: compiled", flush=True)
        cell = Cell(lm, chosen[backbone], device, args.precision, source)
        fig = compiled_figures(cell, args.steps, args.compile_backend)
        fig["compile_speedup"] = round(fig["images_per_s_compiled"] / families[backbone]["images_per_s"], 3)
        families[backbone] |= fig
        if not measured:
            guess, measured = fig["compile_s"], True
        del cell
        _free(device)
    return {"device": name, "device_slug": _slug(device, name), "torch": torch.__version__,
            "cuda": torch.version.cuda, "precision": args.precision, "bf16_peak_tflops": peak,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "manifest": lm.manifest.name,
            "tiny": args.tiny,
            "budget_s": args.budget, "checkpoints_written_s": round(written, 1),
            "wall_s": round(time.perf_counter() - started, 1), "families": families, "mini": mini,
            "command": " ".join(["python benchmarks/perf/gpu_check.py", *sys.argv[1:]])}


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _slug(device: torch.device, name: str) -> str:
    from fishertune.report.perf import device_slug

    return device_slug("cuda", name) if device.type == "cuda" else device_slug("cpu")


PERCENT = {"peak_fraction", "peak_fraction_largest_batch"}


def render(rec: dict[str, Any]) -> str:
    def cell(v, key: str = "") -> str:
        return "-" if v is None else (f"{v:.1%}" if key in PERCENT else str(v))

    cols = [("build s", "build_s"), ("images/s", "images_per_s"), ("TFLOP/s", "tflops"),
            ("of bf16 peak", "peak_fraction"), ("peak GB", "peak_memory_gb"), ("syncs/step", "syncs_per_step"),
            ("largest batch", "largest_batch"), ("images/s there", "images_per_s_largest_batch"),
            ("TFLOP/s there", "tflops_largest_batch"), ("of peak there", "peak_fraction_largest_batch"),
            ("peak GB there", "peak_memory_gb_largest_batch"),
            ("eval windows/s", "eval_windows_per_s"), ("cell h (projected)", "projected_cell_h"),
            ("compile s", "compile_s"), ("images/s compiled", "images_per_s_compiled"),
            ("compiled / eager", "compile_speedup")]
    lines = [f"# GPU check on {rec['device']} ({rec['date']})", "",
             f"Written by `{rec['command']}` in {rec['wall_s']:.0f} s (budget {rec['budget_s']} s; checkpoints "
             f"written in {rec['checkpoints_written_s']:.0f} s); PyTorch {rec['torch']} (CUDA {rec['cuda']} build), "
             f"{rec['precision']} autocast, `{rec['manifest']}`'s protocol with full fine-tuning, "
             + ("the miniature's tiny backbones (a dry run of the script)" if rec["tiny"] else
                "random weights from files in each release's layout")
             + ". How each figure is measured: `benchmarks/perf/gpu_check.py`'s docstring.", "",
             "| backbone | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for backbone, f in rec["families"].items():
        lines.append(f"| `{backbone}` | " + " | ".join(
            cell(f.get(k), k) if k != "compile_s" or not isinstance(f.get("compile"), str) else "skipped"
            for _, k in cols) + " |")
    mini = rec["mini"]
    lines += ["", f"Mini cell `{mini['cell']}` ({mini['iterations']} steps, {mini['seconds']:.0f} s) here against "
              "its CPU numbers in `results/regression/mini-table1.json`"
              + ("" if mini["stored_cell"] else " (no stored cell of that backbone and method)") + ":", "",
              "| target | mIoU here | mIoU stored (CPU) | largest per-class difference |", "|---|---|---|---|"]
    for target, r in mini.items():
        if isinstance(r, dict):
            lines.append(f"| {target} | {r['miou']} | {cell(r.get('miou_cpu'))} | {cell(r.get('max_class_diff'))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from fishertune.runner.manifest import load_manifest
    from fishertune.runner.store import atomic_write_text

    table1 = list(load_manifest(cells.TABLE1).manifest.backbones)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", help=f"backbones (default: Table 1's, {' '.join(table1)}; with --tiny: "
                   "the tiny variants)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: the dry run (default: cuda)")
    p.add_argument("--tiny", action="store_true", help="the miniature's cells (tiny backbones, no checkpoints): "
                   "checks the script, not a GPU")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="training autocast (default: bf16)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (default: 10)")
    p.add_argument("--crop", type=int, help="training crop (default: the protocol's 512; smaller only for a dry run "
                   "of the full-size families on the CPU)")
    p.add_argument("--budget", type=float, default=420, help="seconds for the whole script; compilation runs only "
                   "while they last (default: 420)")
    p.add_argument("--mini-iterations", type=int, help="the mini cell's iterations (default: its manifest's 400)")
    p.add_argument("--compile-backend", help="torch.compile's backend (default: inductor; eager for a dry run)")
    p.add_argument("--out", type=Path, help="the Markdown (and .json beside it); default: "
                   "results/perf/<device>.md")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no GPU (torch.cuda.is_available() is False); --device cpu runs the dry run")
    args.families = args.families or ([f"{b.split('-')[0]}-tiny" for b in table1] if args.tiny else table1)
    rec = run(args)
    out = args.out or cells.ROOT / "results" / "perf" / f"{rec['device_slug']}.md"
    atomic_write_text(out.with_suffix(".md"), render(rec))
    atomic_write_text(out.with_suffix(".json"), json.dumps(rec, indent=1) + "\n")
    print(f"wrote {out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
