"""Plant faults one at a time and see which the regression check flags: the check's sensitivity (and a control, its specificity).

    python benchmarks/mini/faults.py [--stored results/regression/mini-table1.json] [--out results/perf/mini-faults.md]
    python benchmarks/mini/faults.py --stored results/regression/mini-table1-fp64.json --out results/perf/mini-faults-fp64.md

Each fault is a small code change a careless edit could make (LoRA's update lost, FisherTune's mask
no longer chosen by its scores, a target's labels mixed up, the evaluation's windows moved, the head's
learning rate cut, Rein's tokens no longer feeding the queries). For each, a fresh process applies it
as a patch, runs the mini Table 1 cells it touches with the seeds the stored numbers hold (in the
manifest the record was made from: ``table1.yaml``, or ``table1-fp64.yaml`` for the float64 record), and
``fishertune regression check`` compares them with the stored numbers and their bands. The report
says, per fault, whether the check flagged it and what moved most. Nothing in the suite is changed:
the patches live only in the processes this script starts.

One control is not a fault: ``loss-ulp`` multiplies the training loss by 1 + the machine epsilon of the
cell's dtype, so every gradient of every step moves by about one unit in its last place, as a harmless
refactor that reorders float sums would move them. A check that flags it reports rounding, not a
regression: the specificity the faults' sensitivity is worth with. (The report also says whether the
control changed the logged losses at all, against the same cells run unchanged.)

The companion of ``tests/test_end_to_end.py``'s specificity (the unchanged suite passes the same check)
and of the environment variants measured into the bands (``fishertune regression update --spread``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MINI = ROOT / "benchmarks" / "mini"


@dataclass(frozen=True)
class Fault:
    name: str
    what: str
    cells: tuple[str, ...]  # cell globs of the mini Table 1 that the fault touches (among the CI cells)
    control: bool = False  # a harmless change the check should let pass, not a fault


FAULTS = (
    Fault("lora-off", "LoRA's update scaled to 0 (its parametrisation returns the frozen weight)", ("sam-tiny--lora--*",)),
    Fault("fishertune-random-mask", "FisherTune's DR-FIM mask replaced by a random mask of the same size",
          ("sam-tiny--fishertune--*",)),
    Fault("label-swap", "Cityscapes' labels with road and sidewalk swapped (one target's label mapping)",
          ("sam-tiny--freeze--*",)),
    Fault("eval-stride", "evaluation windows placed with the stride set to the window (no overlap)",
          ("sam-tiny--freeze--*",)),
    Fault("head-lr-div10", "the decode head's learning rate divided by 10", ("sam-tiny--freeze--*",)),
    Fault("rein-link-cut", "Rein's token-to-query link cut (the queries no longer read the tokens)",
          ("sam-tiny--rein--*",)),
    Fault("loss-ulp", "control, no fault: the training loss times 1 + the dtype's machine epsilon (every gradient "
          "moved by about one unit in its last place)", ("sam-tiny--full--*",), control=True),
)


def _usage_error(message: str) -> None:
    """Bad input: one line on stderr and exit code 2, nothing run or written."""
    print(f"faults.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def manifest_of(record: dict) -> Path:
    """The mini manifest a stored record was made from (its ``manifest`` names the manifest's ``name``)."""
    from fishertune.runner.manifest import load_manifest

    for path in sorted(MINI.glob("*.yaml")):
        if path.name != "protocol.yaml" and load_manifest(path).manifest.name == record["manifest"]:
            return path
    _usage_error(f"no manifest under {MINI} is named {record.get('manifest')!r}, which the stored record names; "
                 "give --stored a record made by `fishertune regression update` from a mini manifest")


def plant(name: str) -> None:
    """Apply fault ``name`` to this process (monkeypatches of the suite's own functions)."""
    if name == "lora-off":
        from baselines import lora

        lora.LoRAParametrization.forward = lambda self, weight: weight
    elif name == "fishertune-random-mask":
        import torch

        from fishertune.fisher import method, select

        original = method.FisherTune.before_training

        def random_mask(self, segmentor, ctx):
            original(self, segmentor, ctx)
            k = sum(t.numel() for t in self.mask.values())
            self.mask = select.select("random", segmentor.backbone, k, generator=torch.Generator().manual_seed(ctx.seed))

        method.FisherTune.before_training = random_mask
    elif name == "label-swap":
        from fishertune.data import datasets

        original = datasets.SegDataset.__getitem__

        def swapped(self, i):
            sample = original(self, i)
            if self.name == "cityscapes":
                label = sample["label"].copy()
                road, sidewalk = label == 0, label == 1
                label[road], label[sidewalk] = 1, 0
                sample = {**sample, "label": label}
            return sample

        datasets.SegDataset.__getitem__ = swapped
    elif name == "eval-stride":
        from fishertune.engine import evaluate

        original = evaluate.window_origins
        evaluate.window_origins = lambda length, crop, stride: original(length, crop, crop)
    elif name == "head-lr-div10":
        from fishertune.engine import optim

        original = optim.param_groups

        def slower_head(model, weight_decay, scaled=(), lr_mult=1.0):
            head = {id(p) for p in model.head.parameters()}
            out = []
            for g in original(model, weight_decay, scaled, lr_mult):
                for is_head in (False, True):
                    params = [p for p in g["params"] if (id(p) in head) == is_head]
                    if params:
                        out.append({**g, "params": params, "lr_mult": g["lr_mult"] * (0.1 if is_head else 1.0)})
            return out

        optim.param_groups = slower_head
    elif name == "rein-link-cut":
        import torch

        from fishertune.heads import query_link

        original = query_link.QueryLink.forward

        def cut(self, batch_size):
            feat, embed = original(self, batch_size)
            return torch.zeros_like(feat), torch.zeros_like(embed)

        query_link.QueryLink.forward = cut
    elif name == "loss-ulp":
        import torch

        from fishertune import segmentor

        original = segmentor.Segmentor.loss

        def one_ulp(self, images, labels):
            loss = original(self, images, labels)
            return loss * (1 + torch.finfo(loss.dtype).eps)

        segmentor.Segmentor.loss = one_ulp
    else:
        raise SystemExit(f"unknown fault {name!r}; known: {', '.join(f.name for f in FAULTS)}")


def _run_one(fault: str, manifest: str, results: str, seeds: int, patterns: list[str]) -> None:
    """In a fresh process: plant ``fault``, then run the cells (one process, the manifest's threads)."""
    plant(fault)
    from fishertune.runner.manifest import load_manifest
    from fishertune.runner.run import run_manifest

    lm = load_manifest(manifest, {"seeds": seeds})
    run_manifest(lm, results, only=patterns, progress=False, jobs=1)


def _shown(path: Path) -> Path:
    """``path`` relative to the repository where it lies inside it, for the report."""
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _control_moves(changed: Path, unchanged: Path) -> str:
    """How far the cells under ``changed`` are from the same cells (same ids) under ``unchanged``: the largest
    relative difference of their logged training losses (0: the change did not touch the arithmetic), and the
    largest move of an average mIoU and of a class's IoU."""
    worst, miou, iou, compared = 0.0, 0.0, 0.0, 0
    for path in sorted(changed.glob("*.json")):
        other = unchanged / path.name
        if not other.is_file():
            continue
        a, b = (json.loads(x.read_text()) for x in (path, other))
        for (_, x), (_, y) in zip(a["train"]["losses"], b["train"]["losses"]):
            worst = max(worst, abs(x - y) / max(abs(y), 1e-300))
        miou = max(miou, abs(a["aggregate"]["miou"] - b["aggregate"]["miou"]))
        for t, res in a["targets"].items():
            for c, v in res["per_class_iou"].items():
                w = b["targets"][t]["per_class_iou"].get(c)
                if v is not None and w is not None:
                    iou = max(iou, abs(v - w))
        compared += 1
    if not compared:
        return "no unchanged cell to compare with"
    return (f"{compared} cell(s), logged losses {'identical' if worst == 0 else f'differ by up to {worst:.1e} relative'}, "
            f"average mIoU moved by up to {miou:.2f}, a class's IoU by up to {iou:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stored", default=str(ROOT / "results" / "regression" / "mini-table1.json"),
                   help="the stored numbers to check against (default: %(default)s)")
    p.add_argument("--out", default=str(ROOT / "results" / "perf" / "mini-faults.md"), help="report (Markdown)")
    p.add_argument("--only", nargs="+", metavar="FAULT", help="only these faults")
    p.add_argument("--parallel", type=int, default=2, help="faults run at once (default: %(default)s)")
    p.add_argument("--reuse", metavar="DIR", help="check the fault runs an earlier call left in DIR (its "
                   "faults-*/ folder) against the stored bands again, without running them")
    p.add_argument("--results", default=str(ROOT / "results" / "runs"), help="results root holding the unchanged "
                   "cells, to show that a control changed the arithmetic at all (default: %(default)s)")
    args = p.parse_args(argv)
    from fishertune.report import regression
    from fishertune.runner.store import atomic_write_text
    from fishertune.runner.manifest import load_manifest

    stored_path = Path(args.stored).resolve()
    shown = _shown(stored_path)
    try:
        stored = json.loads(stored_path.read_text())
    except (OSError, ValueError) as e:
        _usage_error(f"cannot read the stored record {args.stored}: {e}; give --stored a regression record "
                     "such as results/regression/mini-table1.json")
    unknown = sorted(set(args.only or ()) - {f.name for f in FAULTS})
    if unknown:
        _usage_error(f"unknown fault(s) {', '.join(unknown)} in --only; known: {', '.join(f.name for f in FAULTS)}")
    manifest = manifest_of(stored)
    seeds = max(len(r["cells"]) for r in stored["rows"].values())
    faults = [f for f in FAULTS if not args.only or f.name in args.only]
    work = Path(args.reuse) if args.reuse else Path(tempfile.mkdtemp(prefix="faults-"))
    rows, started = [], time.perf_counter()
    pending = [] if args.reuse else list(faults)
    running: list[tuple[Fault, subprocess.Popen, float]] = []
    finished: dict[str, float] = {f.name: float("nan") for f in faults} if args.reuse else {}
    while pending or running:
        while pending and len(running) < args.parallel:
            f = pending.pop(0)
            cmd = [sys.executable, __file__, "_run", f.name, str(manifest), str(work / f.name), str(seeds), *f.cells]
            running.append((f, subprocess.Popen(cmd, cwd=ROOT), time.perf_counter()))
        time.sleep(2)
        for item in list(running):
            f, proc, t0 = item
            if proc.poll() is not None:
                if proc.returncode:
                    raise SystemExit(f"fault {f.name}: its run failed (exit {proc.returncode})")
                finished[f.name] = time.perf_counter() - t0
                running.remove(item)
    lm = load_manifest(manifest, {"seeds": seeds})
    notes = []
    for f in faults:
        problems = regression.check(lm, work / f.name, args.stored, only=list(f.cells))
        moved = [p for p in problems if "->" in p]
        if f.control:
            notes.append(f"`{f.name}` against the unchanged cells under {_shown(Path(args.results))}: "
                         + _control_moves(work / f.name / lm.results_name, Path(args.results) / lm.results_name))
        top = sorted(moved, key=lambda p: -abs(float(p.split("(")[-1].split(",")[0])))[:3]
        rows.append((f, bool(problems), len(problems), top, finished[f.name]))
        print(f"{f.name}: {'FLAGGED' if problems else 'not flagged'} ({len(problems)} statistic(s))")
    flagged = sum(hit for f, hit, *_ in rows if not f.control)
    planted = sum(not f.control for f, *_ in rows)
    controls = [(f, hit) for f, hit, *_ in rows if f.control]
    title = f"# Planted faults: what the regression check flags ({flagged} of {planted})"
    if controls:
        title += f"; harmless controls flagged: {sum(hit for _, hit in controls)} of {len(controls)}"
    lines = [title, "",
             f"Written by `python benchmarks/mini/faults.py --stored {shown}` "
             f"(manifest `{manifest.relative_to(ROOT)}`; {seeds} seed(s) per cell, the stored bands; made with "
             f"{stored['made_with']['device']}, torch {stored['made_with']['torch']}, bands from "
             f"{len(stored['spread_from'])} environment variants); "
             + (f"runs reused from {work}, re-checked." if args.reuse else f"{time.perf_counter() - started:.0f} s in all."), "",
             "| change | what | cells | flagged | statistics beyond their band | largest moves |",
             "| --- | --- | --- | --- | --- | --- |"]
    for f, hit, n, top, _ in rows:
        lines.append(f"| `{f.name}` | {f.what} | {', '.join(f'`{c}`' for c in f.cells)} | "
                     f"{'yes' if hit else 'no'} | {n} | {'<br>'.join(top) if top else '-'} |")
    if notes:
        lines += ["", "Whether each control changed the arithmetic at all (the training losses it logged against the "
                      "same cells run unchanged): " + "; ".join(notes) + "."]
    out = Path(args.out)
    atomic_write_text(out, "\n".join(lines) + "\n")  # the runner's writer: a killed run leaves the old report
    print(f"wrote {out}: {flagged} of {planted} planted faults flagged"
          + (f", {sum(hit for _, hit in controls)} of {len(controls)} harmless controls" if controls else ""))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        _run_one(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6:])
        sys.exit(0)
    sys.exit(main())
