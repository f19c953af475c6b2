"""Plant faults one at a time and see which the regression check flags: the check's sensitivity.

    python benchmarks/mini/faults.py [--stored results/regression/mini-table1.json] [--out results/perf/mini-faults.md]

Each fault is a small code change a careless edit could make (LoRA's update lost, FisherTune's mask
no longer chosen by its scores, a target's labels mixed up, the evaluation's windows moved, the head's
learning rate cut, Rein's tokens no longer feeding the queries). For each, a fresh process applies it
as a patch, runs the mini Table 1 cells it touches with the seeds the stored numbers hold, and
``fishertune regression check`` compares them with the stored numbers and their bands. The report
says, per fault, whether the check flagged it and what moved most. Nothing in the suite is changed:
the patches live only in the processes this script starts.

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
MANIFEST = ROOT / "benchmarks" / "mini" / "table1.yaml"


@dataclass(frozen=True)
class Fault:
    name: str
    what: str
    cells: tuple[str, ...]  # cell globs of the mini Table 1 that the fault touches (among the CI cells)


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
)


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
    else:
        raise SystemExit(f"unknown fault {name!r}; known: {', '.join(f.name for f in FAULTS)}")


def _run_one(fault: str, results: str, seeds: int, patterns: list[str]) -> None:
    """In a fresh process: plant ``fault``, then run the cells (one process, the manifest's threads)."""
    plant(fault)
    from fishertune.runner.manifest import load_manifest
    from fishertune.runner.run import run_manifest

    lm = load_manifest(MANIFEST, {"seeds": seeds})
    run_manifest(lm, results, only=patterns, progress=False, jobs=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stored", default=str(ROOT / "results" / "regression" / "mini-table1.json"),
                   help="the stored numbers to check against (default: %(default)s)")
    p.add_argument("--out", default=str(ROOT / "results" / "perf" / "mini-faults.md"), help="report (Markdown)")
    p.add_argument("--only", nargs="+", metavar="FAULT", help="only these faults")
    p.add_argument("--parallel", type=int, default=2, help="faults run at once (default: %(default)s)")
    p.add_argument("--reuse", metavar="DIR", help="check the fault runs an earlier call left in DIR (its "
                   "faults-*/ folder) against the stored bands again, without running them")
    args = p.parse_args(argv)
    from fishertune.runner.store import atomic_write_text


    from fishertune.report import regression
    from fishertune.runner.manifest import load_manifest

    stored = json.loads(Path(args.stored).read_text())
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
            cmd = [sys.executable, __file__, "_run", f.name, str(work / f.name), str(seeds), *f.cells]
            running.append((f, subprocess.Popen(cmd, cwd=ROOT), time.perf_counter()))
        time.sleep(2)
        for item in list(running):
            f, proc, t0 = item
            if proc.poll() is not None:
                if proc.returncode:
                    raise SystemExit(f"fault {f.name}: its run failed (exit {proc.returncode})")
                finished[f.name] = time.perf_counter() - t0
                running.remove(item)
    lm = load_manifest(MANIFEST, {"seeds": seeds})
    for f in faults:
        problems = regression.check(lm, work / f.name, args.stored, only=list(f.cells))
        moved = [p for p in problems if "->" in p]
        top = sorted(moved, key=lambda p: -abs(float(p.split("(")[-1].split(",")[0])))[:3]
        rows.append((f, bool(problems), len(problems), top, finished[f.name]))
        print(f"{f.name}: {'FLAGGED' if problems else 'not flagged'} ({len(problems)} statistic(s))")
    flagged = sum(r[1] for r in rows)
    lines = [f"# Planted faults: what the regression check flags ({flagged} of {len(rows)})", "",
             f"Written by `python benchmarks/mini/faults.py` against `{Path(args.stored).relative_to(ROOT)}` "
             f"({seeds} seeds per cell, the stored bands; made with {stored['made_with']['device']}, torch "
             f"{stored['made_with']['torch']}, bands from {len(stored['spread_from'])} environment variants); "
             + (f"runs reused from {work}, re-checked." if args.reuse else f"{time.perf_counter() - started:.0f} s in all."), "",
             "| fault | what | cells | flagged | statistics beyond their band | largest moves |",
             "| --- | --- | --- | --- | --- | --- |"]
    for f, hit, n, top, _ in rows:
        lines.append(f"| `{f.name}` | {f.what} | {', '.join(f'`{c}`' for c in f.cells)} | "
                     f"{'yes' if hit else 'no'} | {n} | {'<br>'.join(top) if top else '-'} |")
    out = Path(args.out)
    atomic_write_text(out, "\n".join(lines) + "\n")  # the runner's writer: a killed run leaves the old report
    print(f"wrote {out}: {flagged} of {len(rows)} planted faults flagged")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        _run_one(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])
        sys.exit(0)
    sys.exit(main())
