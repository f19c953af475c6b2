"""How many variational steps the miniature's FisherTune estimate needs: results/perf/mini-estimate-steps.md.

    python benchmarks/mini/estimate_steps.py [--backbones sam-tiny dinov2-tiny] [--steps 40 20 20@0.5 direct] [--seeds 42 43]

The variational estimate is the dearest part of a mini FisherTune cell: each step is a forward and backward
pass of a training batch on x and on x', twice (antithetic draws), so 40 steps cost about 160 passes
against the 200 of the cell's training, where at full size (200 steps against 40k iterations) it is about
2%. Fewer steps are only a fair scale model if the mask they select is as good as the longer estimate's,
within what the estimate's own randomness changes anyway. So, per backbone, the DR-FIM mask of Table 1's
FisherTune cell is selected for every (steps, seed) pair (the seed draws the estimate's batches and its
noise) and two masks are compared by the share of the k selected elements they have in common:

* between seeds at the same steps: the estimate's own noise (the floor any shorter estimate is held to);
* between steps at the same seed: what the shorter estimate changes.

No cell is trained: this measures the selection, not which method wins. Each (backbone, steps, seed) runs
in a process of its own with one thread, as a mini cell does, without the estimate cache; ``--jobs`` at once.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = ROOT / "benchmarks" / "mini" / "protocol.yaml"
OUT = ROOT / "results" / "perf" / "mini-estimate-steps.md"


def estimator_config(variant: str) -> str:
    """``direct`` (squared per-image gradients), ``STEPS`` (the variational estimate with that many steps),
    ``STEPS@LR`` (and that Adam learning rate of ln Lambda), each optionally followed by ``/sampled`` or
    ``/fisher`` (the variational estimate's ``curvature``), as the method's YAML config."""
    if variant == "direct":
        return "estimator: direct"
    head, _, curvature = variant.partition("/")
    steps, _, lr = head.partition("@")
    return (f"variational: {{steps: {int(steps)}" + (f", lr: {float(lr)}" if lr else "")
            + (f", curvature: {curvature}" if curvature else "") + "}")


def select_mask(backbone: str, variant: str, seed: int) -> tuple[dict, float]:
    """The DR-FIM mask of the mini Table 1 FisherTune cell of ``backbone`` with the estimate ``variant``
    (:func:`estimator_config`) and ``seed``, and the seconds its estimate and selection took."""
    import torch

    from fishertune.runner.data import open_datasets
    from fishertune.runner.manifest import load_manifest
    from fishertune.runner.run import prepare_cell

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "steps.yaml"
        how = estimator_config(variant)
        manifest.write_text(
            f"version: 1\nname: estimate-steps\ntable: table1\ninclude: {PROTOCOL}\nbackbones: [{backbone}]\n"
            f"methods: [{{name: fishertune, config: {{{how}, cache: false}}}}]\n"
            f"seed: {seed}\nsource: gtav\ntargets: [cityscapes]\n")
        lm = load_manifest(manifest)
        (cell,) = lm.cells()
        source, _ = open_datasets(lm.manifest, progress=False)
        seg, method, ctx, _, _ = prepare_cell(lm, cell, source, torch.device("cpu"))
        started = time.perf_counter()
        method.before_training(seg, ctx)
        return {n: set(t.tolist()) for n, t in method.mask.items()}, time.perf_counter() - started


def label(variant: str) -> str:
    if variant == "direct":
        return variant
    head, _, curvature = variant.partition("/")
    steps, _, lr = head.partition("@")
    return f"variational {steps} steps" + (f" lr {lr}" if lr else "") + (f" {curvature}" if curvature else "")


def shared(a: dict, b: dict) -> float:
    """Share of the selected elements two masks of the same size have in common."""
    k = sum(len(v) for v in a.values())
    return sum(len(a[n] & b[n]) for n in a) / k


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--backbones", nargs="+", default=["sam-tiny", "dinov2-tiny"])
    p.add_argument("--steps", nargs="+", default=["40", "20", "20@0.5", "direct"],
                   help="estimates compared: STEPS or STEPS@LR of the variational one (the protocol's lr otherwise), "
                        "each optionally with /sampled or /fisher (its curvature; the protocol's otherwise), or "
                        "direct (default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 43], help="estimate seeds (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="estimates at once, one process and thread each (default: "
                                                       "%(default)s)")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    import torch

    from fishertune.progress import bar
    from fishertune.runner.store import atomic_write_text

    runs = list(itertools.product(a.backbones, a.steps, a.seeds))
    masks, seconds = {}, {}
    from fishertune.fisher.method import FisherTuneConfig

    budget = FisherTuneConfig().budget
    with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(select_mask, *key): key for key in runs}
        for future in bar(as_completed(futures), total=len(futures), desc="estimates", unit="estimate"):
            masks[futures[future]], seconds[futures[future]] = future.result()
    lines = ["# How many variational steps the mini FisherTune estimate needs", "",
             f"Written by `{' '.join(['python benchmarks/mini/estimate_steps.py', *(argv if argv is not None else sys.argv[1:])])}`"
             f" ({platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, 1 thread). Share of the k selected elements (DR-FIM, Table 1's mini "
             "FisherTune cell) that two masks have in common; the estimate's seed draws its batches and noise. "
             f"Two masks drawn at random share the budget's fraction of their elements on average (here "
             f"{budget:.3f}).", "",
             "| backbone | compared | shared |", "|---|---|---:|"]
    for backbone in a.backbones:
        for steps in a.steps:
            for s1, s2 in itertools.combinations(a.seeds, 2):
                lines.append(f"| {backbone} | {label(steps)}: seed {s1} vs seed {s2} | "
                             f"{shared(masks[backbone, steps, s1], masks[backbone, steps, s2]):.3f} |")
        for s1, s2 in itertools.combinations(a.steps, 2):
            for seed in a.seeds:
                lines.append(f"| {backbone} | seed {seed}: {label(s1)} vs {label(s2)} | "
                             f"{shared(masks[backbone, s1, seed], masks[backbone, s2, seed]):.3f} |")
    lines += ["", "| backbone | estimate | seconds (estimate and selection, mean over seeds) |", "|---|---|---:|"]
    for backbone in a.backbones:
        for steps in a.steps:
            mean = sum(seconds[backbone, steps, s] for s in a.seeds) / len(a.seeds)
            lines.append(f"| {backbone} | {label(steps)} | {mean:.1f} |")
    atomic_write_text(Path(a.out), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
