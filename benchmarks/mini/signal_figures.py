"""The miniature's own figures as an instrument: results/perf/mini-signal.md.

    python benchmarks/mini/signal_figures.py [--results results/runs] [--other-python /path/to/other-venv/bin/python]

Four figures, each measured by running cells of the mini manifests with the suite's own runner (cells
already finished are reused, so after the main job this runs only what it adds):

1. **Pretraining matters**: each family's frozen tiny foundation model against the same architecture
   frozen at random initialisation (``benchmarks/mini/signal-random.yaml``), same head, budget and
   data, over seeds 42, 43, 44; the ratio of their average mIoU (target: at least 2). Beside it (1b) the same pair with a
   linear probe instead of the Mask2Former head (``probe.yaml``, ``probe-random.yaml``): what the
   frozen features hold linearly, apart from what the head learns to make of them. And (1c) both pairs
   again on the miniature with its classes' looks shuffled (``looks-shuffled*.yaml``: each image gives
   its classes one another's colour and texture, the labels unchanged): what the frozen features are
   worth once a patch's look no longer tells its class.
2. **Signal**: the best cell of the mini Table 1 (target: an average mIoU of at least 35), and how many
   classes the main job's cells predict (issue 16: its qualitative plots should show more than four).
3. **Seed spread**: the standard deviation over 3 seeds of the average mIoU of full, freeze and
   fishertune on two families (target: at most 1.0).
4. **Environment spread**: the same cells (seed 42) with 1 and with 2 CPU threads, and with another
   torch minor version (``--other-python``: the python of a second venv with that torch); how far each
   cell's average moves (target: at most 0.5).
5. Figures 3 and 4 again on the miniature with shuffled looks (``looks-shuffled-table1.yaml``), for
   the two families whose pretraining is worth most there: whether that miniature is a steadier instrument.
6. Figures 3 and 4 again with the cells trained and evaluated in float64 (``table1-fp64.yaml``,
   ``train.precision: fp64``): whether the environment spread is float32 rounding, and what float64 costs
   (each cell's ``wall_time_s`` beside the float32 cell's, and the whole grid's when both have run).
7. What the main job's budget buys: the whole grid, figure 1's pairs and figures 3 and 4 again at 100
   iterations instead of 200 (``signal-budget100.yaml``, ``signal-budget100-random.yaml``): the main job
   inside issue 16's 10-minute target, against the 200 iterations it spends for its signal.
8. What the best-cell target would cost: the best cell's row (full fine-tuning) on EVA02 and CLIP at 400,
   800 and 1,600 iterations (``signal-budget400.yaml``, ``-800``, ``-1600``) beside 100 and 200: how the
   average mIoU grows with the steps, and what each budget costs against the protocol's 200, from the
   cells' own times (a fixed part plus a part per step); at 1,600 also from random initialisation
   (``signal-budget1600-random.yaml``): what pretraining is worth there. Plotted to
   ``results/plots/mini-signal/budget.png``. And (8b) EVA02's full and freeze rows, pretrained and random,
   at 1,600 iterations on the shuffled-looks miniature (``looks-shuffled-budget1600*.yaml``): whether one
   miniature meets both signal targets at some budget.
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
#: figure 1c's manifests: the freeze row on the miniature with shuffled class looks, pretrained and random, two heads
LOOKS_MANIFESTS = ("looks-shuffled", "looks-shuffled-random", "looks-shuffled-probe", "looks-shuffled-probe-random")
#: figure 5: the spread figures again on the shuffled-looks miniature, for the families pretraining helps most there
LOOKS_TABLE1 = MINI / "looks-shuffled-table1.yaml"
LOOKS_SPREAD_BACKBONES = ("eva02-tiny", "mae-tiny")
#: figure 6: the mini Table 1 grid in float64
FP64_TABLE1 = MINI / "table1-fp64.yaml"
#: figure 7: the mini Table 1 grid and the random-init freeze row at 100 iterations instead of 200
BUDGET100 = MINI / "signal-budget100.yaml"
BUDGET100_RANDOM = MINI / "signal-budget100-random.yaml"
#: figure 8: the best cell's row at longer budgets
LONG_BUDGETS = (400, 800, 1600)
LONG_BUDGET_BACKBONES = ("eva02-tiny", "clip-tiny")
LONG_BUDGET_RANDOM = MINI / "signal-budget1600-random.yaml"
#: figure 8b: EVA02's full and freeze rows on the shuffled-looks miniature at 1,600 iterations, pretrained and random
LOOKS_LONG = MINI / "looks-shuffled-budget1600.yaml"
LOOKS_LONG_RANDOM = MINI / "looks-shuffled-budget1600-random.yaml"


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
        pre, rnd, ratio_text, ratio = _pair(probe, probe_random, b)
        if ratio is not None:
            ratios.append(ratio)
        lines.append(f"| {b} | {pre} | {rnd} | {ratio_text} | {_pair(main_rows, random_rows, b)[2]} |")
    if ratios:
        lines += ["", f"Probe ratio at or above 2: {sum(x >= TARGETS['ratio'] for x in ratios)} of {len(ratios)} "
                      f"(mean {statistics.fmean(ratios):.2f})."]
    return lines + [""]


def _seeds(rows: list[dict], backbone: str, row: str) -> dict[int, float]:
    """Average mIoU by seed (42, 43, 44) of one row of one family."""
    return {r["seed"]: r["aggregate"]["miou"] for r in rows
            if r["backbone"] == backbone and r["row"] == row and r["seed"] in (42, 43, 44)}


def _mean_std(values, count: bool = False) -> str:
    """'mean +- std' of the values to one decimal ('mean' alone for one value, '-' for none); with ``count``,
    how many follow when there are several."""
    v = list(values)
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.1f}"
    return f"{statistics.fmean(v):.1f} +- {statistics.stdev(v):.1f}" + (f" ({len(v)} seeds)" if count else "")


def _pair(pre_rows: list[dict], rnd_rows: list[dict], backbone: str) -> tuple[str, str, str, float | None]:
    """Pretrained and random-init frozen cells over their seeds: 'mean +- std' of each, and the ratio of the
    means with the range of the per-seed ratios (seed s pretrained over seed s random)."""
    pre, rnd = _seeds(pre_rows, backbone, "freeze"), _seeds(rnd_rows, backbone, "freeze")
    if not pre or not rnd:
        return _mean_std(pre.values()), _mean_std(rnd.values()), "-", None
    ratio = statistics.fmean(pre.values()) / statistics.fmean(rnd.values())
    per_seed = [pre[s] / rnd[s] for s in sorted(pre.keys() & rnd.keys())]
    spread = f" [{min(per_seed):.2f}, {max(per_seed):.2f}]" if len(per_seed) > 1 else ""
    return _mean_std(pre.values()), _mean_std(rnd.values()), f"{ratio:.2f}{spread}", ratio


def _looks_lines(rows: dict[str, list[dict]]) -> list[str]:
    """Figure 1c: figure 1's and 1b's pairs on the miniature with shuffled class looks, over seeds 42-44,
    beside the same ratios with the classes' own looks. ``rows``: results by manifest stem."""
    n_seeds = len({r["seed"] for r in rows["looks-shuffled"]})
    lines = ["### 1c. The same pairs when a patch's look no longer tells its class", "",
             "The miniature with its classes' looks shuffled (`benchmarks/mini/looks-shuffled*.yaml`, "
             "`data.synth_looks: shuffled`): every image gives its classes one another's colour and texture, the "
             "scenes and labels unchanged, so only shape, position and context tell the classes apart. The tiny "
             "models are the same, pretrained in the world of the classes' own looks. Average mIoU as mean +- std "
             f"over {n_seeds} seed(s); ratio: of the means, frozen pretrained over frozen random init, with the range "
             "of the per-seed ratios; \"own looks\": the same ratio with the classes' own looks (figures 1 and 1b).", "",
             "| family | Mask2Former: pretrained | random init | ratio | own looks | "
             "linear probe: pretrained | random init | ratio | own looks |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    pairs = (("looks-shuffled", "looks-shuffled-random", "table1", "signal-random"),
             ("looks-shuffled-probe", "looks-shuffled-probe-random", "probe", "probe-random"))
    ratios: dict[str, list[float]] = {"Mask2Former": [], "linear probe": []}
    for b in sorted({r["backbone"] for r in rows["looks-shuffled"]}):
        cells = []
        for (pre, rnd, own_pre, own_rnd), name in zip(pairs, ratios):
            p, r, ratio_text, ratio = _pair(rows[pre], rows[rnd], b)
            if ratio is not None:
                ratios[name].append(ratio)
            cells += [p, r, ratio_text, _pair(rows[own_pre], rows[own_rnd], b)[2].split(" ")[0]]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    summary = [f"With shuffled looks, {name} ratio at or above 2: {sum(x >= TARGETS['ratio'] for x in valid)} of "
               f"{len(valid)} (mean {statistics.fmean(valid):.2f})." for name, valid in ratios.items() if valid]
    return lines + ["", " ".join(summary), ""]


def _predicted_classes_lines(rows: list[dict], folder: Path) -> list[str]:
    """How many of the 19 classes the main job's cells predict: over every evaluation image (the columns of
    each target's confusion matrix with a pixel), and on the images each cell keeps (``<cell>.pred/``, the
    qualitative plots' images), beside how many the labels of the evaluation images hold."""
    import numpy as np
    from PIL import Image

    def spread(values: list[int]) -> str:
        return f"{min(values)}-{max(values)} (median {statistics.median(values):g})"

    evaluated, kept, present = [], [], []
    for r in rows:
        confusion = {t: np.asarray(v["confusion"]) for t, v in r["targets"].items()}
        evaluated.append(int(sum((c.sum(axis=0) > 0) for c in confusion.values()).astype(bool).sum()))
        present.append(int(sum((c.sum(axis=1) > 0) for c in confusion.values()).astype(bool).sum()))
        classes: set[int] = set()
        for recs in r.get("predictions", {}).values():
            for rec in recs:
                with Image.open(folder / rec["prediction"]) as im:
                    classes |= set(np.unique(np.asarray(im)).tolist())
        kept.append(len(classes - {255}))
    if not rows:
        return []
    return [f"Classes predicted by the {len(rows)} cells of the main job (seed 42), of the {present[0]} the evaluation "
            f"labels hold: on all evaluation images {spread(evaluated)}; on the images each cell keeps for the "
            f"qualitative plots {spread(kept)}.", ""]


def _seed_spread(rows: list[dict], backbones: tuple[str, ...]) -> list[tuple[str, str, list[float], float]]:
    """Each spread cell's average mIoU over seeds 42-44 (those finished) and their standard deviation."""
    out = []
    for b in backbones:
        for row in SPREAD_ROWS:
            values = [v for v in (_avg(rows, b, row, s) for s in (42, 43, 44)) if v is not None]
            out.append((b, row, values, statistics.stdev(values) if len(values) > 1 else float("nan")))
    return out


def _seed_spread_lines(rows: list[dict], backbones: tuple[str, ...]) -> list[str]:
    """Figure 3's table: each spread cell's average mIoU over seeds 42-44 and their standard deviation."""
    lines = ["| cell | seeds 42, 43, 44 | mean | std |", "| --- | --- | --- | --- |"]
    stds = []
    for b, row, values, sd in _seed_spread(rows, backbones):
        stds.append(sd)
        lines.append(f"| {b} {row} | {', '.join(f'{v:.2f}' for v in values)} | {statistics.fmean(values):.2f} | "
                     f"{sd:.2f} |")
    return lines + ["", f"Largest: {max(stds):.2f}.", ""]


def _env_spread_lines(rows: list[dict], threads: Path, other: Path | None, manifest: Path,
                      backbones: tuple[str, ...]) -> list[str]:
    """Figure 4's table: how far each spread cell's seed-42 average moves with 2 threads and another torch."""
    import torch

    variants = [("2 threads instead of 1", _results(threads, manifest))]
    if other is not None:
        other_rows = _results(other, manifest)
        variants.append((f"torch {other_rows[0]['versions']['torch']} instead of {torch.__version__}", other_rows))
    lines = ["| cell | this run | " + " | ".join(name for name, _ in variants) + " |",
             "| --- | --- | " + " | ".join("---" for _ in variants) + " |"]
    worst = {name: 0.0 for name, _ in variants}
    for b in backbones:
        for row in SPREAD_ROWS:
            base = _avg(rows, b, row)
            cells = []
            for name, variant in variants:
                v = _avg(variant, b, row)
                worst[name] = max(worst[name], abs(v - base))
                cells.append(f"{v:.2f} ({v - base:+.2f})")
            lines.append(f"| {b} {row} | {base:.2f} | " + " | ".join(cells) + " |")
    lines += [""] + [f"Largest move with {name}: {w:.2f}" + (f" (exactly {w:.1e})." if w < 0.005 else ".")
                     for name, w in worst.items()]
    if other is None:
        lines.append("Another torch minor version: not measured in this run (give --other-python).")
    return lines + [""]


def _fp64_lines(fp32_rows: list[dict], fp64_rows: list[dict], backbones: tuple[str, ...]) -> list[str]:
    """How far float64 moves the seed-42 cells from their float32 values, and what it costs: each spread cell's
    wall time (one thread, two cells at once) in both, and the whole grid's summed cell time when both ran."""
    def times(rows: list[dict]) -> dict[tuple[str, str], float]:
        return {(r["backbone"], r["row"]): r["wall_time_s"] for r in rows if r["seed"] == 42}

    t32, t64 = times(fp32_rows), times(fp64_rows)
    lines = ["What it costs, per cell (`wall_time_s`; one thread, two cells at once):", "",
             "| cell | float32 (s) | float64 (s) | ratio |", "| --- | --- | --- | --- |"]
    for b in backbones:
        for row in SPREAD_ROWS:
            a, c = t32.get((b, row)), t64.get((b, row))
            if a and c:
                lines.append(f"| {b} {row} | {a:.0f} | {c:.0f} | {c / a:.2f} |")
    both = t32.keys() & t64.keys()
    avg32, avg64 = ({(r["backbone"], r["row"]): r["aggregate"]["miou"] for r in rows if r["seed"] == 42}
                    for rows in (fp32_rows, fp64_rows))
    moves = [avg64[k] - avg32[k] for k in sorted(avg32.keys() & avg64.keys())]
    if len(moves) > 1:
        best = max(avg64, key=avg64.get)
        lines = [f"Float64 minus float32, average mIoU of the {len(moves)} cells both grids ran with seed 42: mean "
                 f"{statistics.fmean(moves):+.2f}, standard deviation {statistics.stdev(moves):.2f}, largest "
                 f"{max(moves, key=abs):+.2f}. The best float64 cell: {best[0]} {best[1]}, {avg64[best]:.1f}.", ""] + lines
    if len(t64) == len(t32) and both == t32.keys():
        a, c = sum(t32[k] for k in both), sum(t64[k] for k in both)
        lines += ["", f"The whole grid ({len(both)} cells, seed 42): {a / 60:.1f} cell-minutes in float32, {c / 60:.1f} "
                      f"in float64 ({c / a:.2f}x)."]
    else:
        lines += ["", f"The whole float64 grid has not run ({len(t64)} of {len(t32)} cells): "
                      "`fishertune run benchmarks/mini/table1-fp64.yaml`."]
    return lines + [""]


def _budget_lines(main_rows: list[dict], random_rows: list[dict], short_rows: list[dict],
                  short_random_rows: list[dict]) -> list[str]:
    """Figure 7's summary: the figures 1-3 at 100 iterations beside the main job's 200, and whether the cheaper
    grid orders the cells as the main job does (Spearman's rho over the cells both ran with seed 42; scipy).
    No times: the two grids' cells ran on different days, and this shared machine's speed drifts by more than
    the difference; what 100 iterations save is timed with the two in turn (README)."""
    from scipy.stats import spearmanr

    def seed42(rows: list[dict]) -> dict[tuple[str, str], dict]:
        return {(r["backbone"], r["row"]): r for r in rows if r["seed"] == 42}

    long, short = seed42(main_rows), seed42(short_rows)

    def best(cells: dict[tuple[str, str], dict]) -> str:
        k = max(cells, key=lambda k: cells[k]["aggregate"]["miou"])
        return f"{cells[k]['aggregate']['miou']:.1f} ({k[0]} {k[1]})"

    def stds(rows: list[dict]) -> list[float]:
        return [sd for *_, sd in _seed_spread(rows, SPREAD_BACKBONES) if sd == sd]  # finished with 2+ seeds

    families = sorted({r["backbone"] for r in random_rows} | {r["backbone"] for r in short_random_rows})
    ratios = {name: [_pair(pre, rnd, b)[3] for b in families]
              for name, pre, rnd in (("100", short_rows, short_random_rows), ("200", main_rows, random_rows))}
    lines = ["| figure | target | 100 iterations | 200 iterations (the main job) |", "| --- | --- | --- | --- |",
             f"| cells of the grid (seed 42) | | {len(short)} | {len(long)} |",
             f"| best cell, average mIoU | >= {TARGETS['best']:.0f} | {best(short) if short else '-'} | {best(long)} |"]
    ratio_cells = []
    for name in ("100", "200"):
        got = [x for x in ratios[name] if x is not None]
        ratio_cells.append(f"{min(got):.2f}-{max(got):.2f}, mean {statistics.fmean(got):.2f}" if got else "-")
    lines.append(f"| frozen pretrained / random init, per family (3 seeds) | >= {TARGETS['ratio']:.0f} | "
                 + " | ".join(ratio_cells) + " |")
    std_cells = [f"{max(v):.2f} (of {len(v)} cells)" if v else "-" for v in (stds(short_rows), stds(main_rows))]
    lines.append(f"| largest seed std (figure 3's cells) | <= {TARGETS['seed_std']:.1f} | " + " | ".join(std_cells) + " |")
    lines.append("")
    lines += ["| family | ratio at 100 iterations | ratio at 200 |", "| --- | --- | --- |"]
    for b in families:
        lines.append(f"| {b} | {_pair(short_rows, short_random_rows, b)[2]} | {_pair(main_rows, random_rows, b)[2]} |")
    both = sorted(long.keys() & short.keys())
    if len(both) > 2:
        a = [long[k]["aggregate"]["miou"] for k in both]
        c = [short[k]["aggregate"]["miou"] for k in both]
        rho = spearmanr(a, c)
        moves = [y - x for x, y in zip(a, c)]
        lines += ["", f"The {len(both)} cells both grids ran (seed 42): 100 minus 200 iterations, mean "
                      f"{statistics.fmean(moves):+.2f}, standard deviation {statistics.stdev(moves):.2f}; Spearman's rho "
                      f"between the two grids' cell averages {rho.statistic:.2f} (p = {rho.pvalue:.2g}): how far the "
                      "cheaper grid orders the cells as the main job does."]
    return lines + [""]


def _long_budget_lines(by_budget: dict[int, list[dict]], random_rows: list[dict], plot: Path | None) -> list[str]:
    """Figure 8: full fine-tuning's average mIoU (seed 42, or the mean over the seeds that ran) against the
    iterations, and what each budget costs against the protocol's 200. The cost comes from each long-budget
    cell's own split of its ``wall_time_s`` into training (``train.seconds``, so much per iteration) and the
    rest (building, evaluating), taken at the same moment, so that this machine's drift between cells
    cancels: the rest is worth ``k`` iterations, and ``n`` iterations cost ``(k + n) / (k + 200)`` of the 200. ``random_rows``: the longest budget's cells
    from random initialisation, what the pretraining is worth there."""
    budgets = sorted(by_budget)
    cells = {(n, r["backbone"]): r for n in budgets for r in by_budget[n]
             if r["row"] == "full" and r["seed"] == 42 and r["backbone"] in LONG_BUDGET_BACKBONES}
    split = [(n, cells[n, b]["wall_time_s"] - cells[n, b]["train"]["seconds"], cells[n, b]["train"]["seconds"] / n)
             for n in LONG_BUDGETS for b in LONG_BUDGET_BACKBONES if (n, b) in cells]
    k = statistics.median(rest / step for _, rest, step in split) if split else None
    seeds = {(n, b): list(_seeds(by_budget[n], b, "full").values()) for n in budgets for b in LONG_BUDGET_BACKBONES}
    seeds = {key: v for key, v in seeds.items() if v}

    lines = ["| iterations | " + " | ".join(f"{b} full" for b in LONG_BUDGET_BACKBONES) + " | a full cell's cost against 200 |",
             "| --- | " + " | ".join("---" for _ in LONG_BUDGET_BACKBONES) + " | --- |"]
    # average mIoU: seed 42, or the mean +- std where more seeds ran (the dots of the plot)
    for n in budgets:
        got = [_mean_std(seeds.get((n, b), []), count=True) for b in LONG_BUDGET_BACKBONES]
        cost = f"{(k + n) / (k + 200):.2f}x" if k is not None else "-"
        lines.append(f"| {n} | " + " | ".join(got) + f" | {cost} |")
    lines.append("")
    if split:
        steps = [step * 1000 for *_, step in split]
        rests = [rest for _, rest, _ in split]
        lines.append(f"Each of the {len(split)} long-budget cells split into training, {min(steps):.0f}-{max(steps):.0f} ms "
                     f"per iteration, and the rest (building, evaluating), {min(rests):.1f}-{max(rests):.1f} s: the rest is "
                     f"worth {k:.0f} iterations (median), so n iterations cost (k + n) / (k + 200) of the main job's 200. "
                     "That is a full cell's multiple; the cells that estimate first (FisherTune, ChildTune) have a larger "
                     "fixed part, so the whole grid's multiple is somewhat lower (figure 7's timed pair: 0.67 at 100).")
    best = {b: [(n, statistics.fmean(seeds[n, b])) for n in budgets if (n, b) in seeds] for b in LONG_BUDGET_BACKBONES}
    for b, curve in best.items():
        reached = [n for n, v in curve if v >= TARGETS["best"]]
        if reached:
            v = seeds[reached[0], b]
            over = (f"the mean of {len(v)} seeds, std {statistics.stdev(v):.1f}, range {min(v):.1f}-{max(v):.1f}"
                    if len(v) > 1 else "one seed")
            lines.append(f"{b} full reaches {TARGETS['best']:.0f} at {reached[0]} iterations: "
                         f"{statistics.fmean(v):.1f} ({over}).")
        elif len(curve) >= 2:
            (n0, v0), (n1, v1) = curve[-2], curve[-1]
            lines.append(f"{b} full does not reach {TARGETS['best']:.0f}: {v1:.1f} at {n1} iterations, "
                         f"{v1 - v0:+.1f} over the last doubling ({n0} to {n1}).")
    longest = max(LONG_BUDGETS)
    for b in LONG_BUDGET_BACKBONES:
        rnd, pre = _seeds(random_rows, b, "full"), _seeds(by_budget.get(longest, []), b, "full")
        both = sorted(rnd.keys() & pre.keys())
        if both:
            p, r = statistics.fmean(pre[x] for x in both), statistics.fmean(rnd[x] for x in both)
            lines.append(f"{b} full from random initialisation at {longest} iterations: {_mean_std((rnd[x] for x in both), count=True)} "
                         f"against {_mean_std((pre[x] for x in both), count=True)} pretrained (seed{'s' if len(both) > 1 else ''} "
                         f"{', '.join(map(str, both))}), so the tiny foundation model is worth {p / r:.2f}x random "
                         "weights there.")
    lines.append("")
    if plot is not None and best:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from fishertune.report.plots import save_figure

        fig = Figure(figsize=(5.0, 3.4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for b, curve in best.items():
            if curve:
                (line,) = ax.plot([n for n, _ in curve], [v for _, v in curve], marker="o", label=f"{b} full")
                if rnd := list(_seeds(random_rows, b, "full").values()):
                    ax.scatter([longest] * len(rnd), rnd, marker="o", s=40, facecolors="none",
                               edgecolors=line.get_color(), zorder=3, label=f"{b} full, random init")
                spread = [(n, v) for n in budgets if len(v := seeds.get((n, b), [])) > 1]
                ax.scatter([n for n, v in spread for _ in v], [x for _, v in spread for x in v], s=8, color="grey",
                           zorder=3, label=None)
        ax.axhline(TARGETS["best"], color="grey", linestyle="--", linewidth=1, label="issue 16's target")
        ax.axvline(200, color="grey", linestyle=":", linewidth=1, label="the main job's 200")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, labels=[str(n) for n in budgets])
        ax.minorticks_off()
        ax.set_xlabel("training iterations (batch 8, crops of 64 px)")
        ax.set_ylabel("average mIoU over the 3 targets")
        ax.legend(fontsize=8)
        png, _ = save_figure(fig, plot)
        lines += [f"Plot: `{png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}` (and `.pdf`).", ""]
    return lines


def _looks_long_budget_lines(short: dict[str, list[dict]], long: dict[str, list[dict]]) -> list[str]:
    """Figure 8b: on the shuffled-looks miniature, EVA02's full and freeze rows pretrained and at random
    initialisation, at the protocol's 200 iterations (figures 1c and 5) and at 1,600: whether the budget that
    meets the best-cell target keeps the ratio that shuffled looks give. Seed 42 throughout, the seed the
    1,600-iteration cells ran. ``short``/``long``: ``{"pretrained": rows, "random": rows}`` per budget; at 200
    the full row's pretrained cell comes from ``looks-shuffled-table1.yaml``, its random one did not run."""
    lines = ["| eva02-tiny, shuffled looks, seed 42 | 200: pretrained | random init | ratio | "
             "1600: pretrained | random init | ratio |", "| --- | --- | --- | --- | --- | --- | --- |"]
    ratios = {}
    for row in ("full", "freeze"):
        cells = []
        for rows in (short, long):
            pre, rnd = (_avg(rows[k], "eva02-tiny", row) for k in ("pretrained", "random"))
            ratio = pre / rnd if pre is not None and rnd else None
            ratios[row, rows is long] = ratio
            cells += [f"{v:.1f}" if v is not None else "-" for v in (pre, rnd)] + [f"{ratio:.2f}" if ratio else "-"]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("")
    full = _avg(long["pretrained"], "eva02-tiny", "full")
    if full is not None and ratios.get(("freeze", True)):
        lines += [f"At 1,600 iterations with shuffled looks the best row reaches {full:.1f} (target "
                  f"{TARGETS['best']:.0f}) and the frozen pair's ratio is {ratios['freeze', True]:.2f} (target "
                  f"{TARGETS['ratio']:.0f}), against {ratios.get(('freeze', False)) or float('nan'):.2f} at 200.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(ROOT / "results" / "runs"), help="results root (default: %(default)s)")
    p.add_argument("--other-python", help="python of a second venv with another torch minor version")
    p.add_argument("--out", default=str(ROOT / "results" / "perf" / "mini-signal.md"),
                   help="where the report goes (default: %(default)s)")
    p.add_argument("--no-run", action="store_true",
                   help="run no cell: write the report from the results already under --results (and its "
                        "-threads2 and -other-torch siblings)")
    args = p.parse_args(argv)
    from fishertune.runner.store import atomic_write_text

    started = time.perf_counter()
    results = Path(args.results)
    here = sys.executable
    table1 = MINI / "table1.yaml"
    run = (lambda *_, **__: None) if args.no_run else _run

    run(here, table1, results, ["*"])  # the main job (reused when done)
    run(here, MINI / "signal-random.yaml", results, ["*"])
    run(here, MINI / "probe.yaml", results, ["*"])
    run(here, MINI / "probe-random.yaml", results, ["*"])
    for stem in LOOKS_MANIFESTS:  # figure 1c, over 3 seeds, beside the own-looks pairs over the same seeds
        run(here, MINI / f"{stem}.yaml", results, ["*"], ["--seeds", "3"])
    for manifest in (table1, MINI / "signal-random.yaml", MINI / "probe.yaml", MINI / "probe-random.yaml"):
        run(here, manifest, results, ["*--freeze--*"], ["--seeds", "3"])
    threads = results.parent / f"{results.name}-threads2"
    other = results.parent / f"{results.name}-other-torch"
    other = other if args.other_python or (args.no_run and other.is_dir()) else None
    run(here, BUDGET100, results, ["*"])  # figure 7: the grid at 100 iterations, and its pairs over 3 seeds
    run(here, BUDGET100_RANDOM, results, ["*"], ["--seeds", "3"])
    run(here, BUDGET100, results, ["*--freeze--*"], ["--seeds", "3"])
    for n in LONG_BUDGETS:  # figure 8: the best cell's row at more steps, and its family's 3 seeds at the most
        run(here, MINI / f"signal-budget{n}.yaml", results, ["*"])
    run(here, LONG_BUDGET_RANDOM, results, ["*"])
    run(here, MINI / f"signal-budget{max(LONG_BUDGETS)}.yaml", results, [f"{LONG_BUDGET_BACKBONES[0]}--full--*"],
         ["--seeds", "3"])
    run(here, LOOKS_LONG, results, ["*"])  # figure 8b
    run(here, LOOKS_LONG_RANDOM, results, ["*"])
    for manifest, backbones in ((table1, SPREAD_BACKBONES), (LOOKS_TABLE1, LOOKS_SPREAD_BACKBONES),
                                (FP64_TABLE1, SPREAD_BACKBONES), (BUDGET100, SPREAD_BACKBONES)):
        cells = [f"{b}--{r}--*" for b in backbones for r in SPREAD_ROWS]
        run(here, manifest, results, cells, ["--seeds", "3"])
        run(here, manifest, threads, cells, ["--threads", "2", "--jobs", "1"])
        if other is not None:
            run(args.other_python, manifest, other, cells)

    if args.no_run:  # the report reads every one of these; without their cells it has nothing to say
        read = (table1, MINI / "signal-random.yaml", MINI / "probe.yaml", MINI / "probe-random.yaml",
                *(MINI / f"{stem}.yaml" for stem in LOOKS_MANIFESTS), LOOKS_TABLE1, FP64_TABLE1, BUDGET100,
                BUDGET100_RANDOM, *(MINI / f"signal-budget{n}.yaml" for n in LONG_BUDGETS), LONG_BUDGET_RANDOM,
                LOOKS_LONG, LOOKS_LONG_RANDOM)
        missing = [m.name for m in read if not _results(results, m)]
        if missing:
            print(f"signal_figures.py: --no-run, but {results} holds no finished cell of {', '.join(missing)}; "
                  "run without --no-run to run what is missing", file=sys.stderr)
            return 2

    import torch

    main_rows = _results(results, table1)
    random_rows = _results(results, MINI / "signal-random.yaml")
    lines = ["# The miniature as an instrument", "",
             f"Written by `python benchmarks/mini/signal_figures.py` ("
             + ("`--no-run`: from finished cells" if args.no_run else
                f"{time.perf_counter() - started:.0f} s for what it ran on top of finished cells")
             + f"), torch {torch.__version__}, {main_rows[0]['device']}.", ""]

    lines += ["## 1. Frozen pretrained vs frozen random initialisation (target: ratio >= 2)", "",
              "Average mIoU of the freeze row, mean +- std over seeds 42, 43, 44; ratio: of the means, with the range "
              "of the per-seed ratios (seed s pretrained over seed s at random initialisation).", "",
              "| family | frozen pretrained | frozen random init | ratio |", "| --- | --- | --- | --- |"]
    ratios = []
    for b in sorted({r["backbone"] for r in random_rows}):
        pre, rnd, ratio_text, ratio = _pair(main_rows, random_rows, b)
        if ratio is not None:
            ratios.append(ratio)
        lines.append(f"| {b} | {pre} | {rnd} | {ratio_text} |")
    lines += ["", f"Mean ratio {statistics.fmean(ratios):.2f}; families at or above 2: "
                  f"{sum(x >= TARGETS['ratio'] for x in ratios)} of {len(ratios)}.", ""]
    probe_rows, probe_random_rows = _results(results, MINI / "probe.yaml"), _results(results, MINI / "probe-random.yaml")
    lines += _probe_lines(main_rows, random_rows, probe_rows, probe_random_rows)
    lines += _looks_lines({"table1": main_rows, "signal-random": random_rows, "probe": probe_rows,
                           "probe-random": probe_random_rows}
                          | {stem: _results(results, MINI / f"{stem}.yaml") for stem in LOOKS_MANIFESTS})

    best = max((r for r in main_rows if r["seed"] == 42), key=lambda r: r["aggregate"]["miou"])
    lines += ["## 2. The best mini Table 1 cell (target: >= 35)", "",
              f"{best['backbone']} {best['row']}: average mIoU {best['aggregate']['miou']:.1f} "
              "(" + ", ".join(f"{t} {v['miou']:.1f}" for t, v in best["targets"].items()) + ").", ""]
    lines += _predicted_classes_lines([r for r in main_rows if r["seed"] == 42], results / "mini-table1")

    lines += ["## 3. Seed spread: standard deviation of the average mIoU over 3 seeds (target: <= 1.0)", ""]
    lines += _seed_spread_lines(main_rows, SPREAD_BACKBONES)
    lines += ["## 4. Environment spread: the same cells, seed 42, elsewhere (target: each moves <= 0.5)", ""]
    lines += _env_spread_lines(main_rows, threads, other, table1, SPREAD_BACKBONES)
    looks_rows = _results(results, LOOKS_TABLE1)
    lines += ["## 5. Seed and environment spread on the miniature with shuffled looks", "",
              f"Figures 3 and 4 for full, freeze and FisherTune on {' and '.join(LOOKS_SPREAD_BACKBONES)}, the families "
              "whose pretraining is worth most there (figure 1c), from `benchmarks/mini/looks-shuffled-table1.yaml`.", ""]
    lines += _seed_spread_lines(looks_rows, LOOKS_SPREAD_BACKBONES)
    lines += _env_spread_lines(looks_rows, threads, other, LOOKS_TABLE1, LOOKS_SPREAD_BACKBONES)
    fp64_rows = _results(results, FP64_TABLE1)
    lines += ["## 6. Seed and environment spread in float64", "",
              "Figures 3 and 4 for the same cells trained and evaluated in float64 (`benchmarks/mini/table1-fp64.yaml`, "
              "`train.precision: fp64`, fishertune/precision.py): the same protocol, data, models and seeds; only the "
              "dtype differs. The environment spread of figure 4 is float32 rounding that the short training "
              "amplifies; float64 makes the same rounding differences 2^29 times smaller.", ""]
    lines += _seed_spread_lines(fp64_rows, SPREAD_BACKBONES)
    lines += _env_spread_lines(fp64_rows, threads, other, FP64_TABLE1, SPREAD_BACKBONES)
    lines += _fp64_lines(main_rows, fp64_rows, SPREAD_BACKBONES)
    short_rows = _results(results, BUDGET100)
    lines += ["## 7. What the main job's budget buys: 100 iterations against 200", "",
              "Figures 1-4 again with the whole protocol at 100 iterations instead of the main job's 200 "
              "(`benchmarks/mini/signal-budget100.yaml`, `signal-budget100-random.yaml`; the learning-rate schedule "
              "spans the shorter run): the same data, tiny models, head and seeds. Issue 16 asks for a main job within "
              "10 minutes and allows up to 20 where the signal needs it; this is what the second 100 steps buy.", ""]
    lines += _budget_lines(main_rows, random_rows, short_rows, _results(results, BUDGET100_RANDOM))
    lines += _seed_spread_lines(short_rows, SPREAD_BACKBONES)
    lines += _env_spread_lines(short_rows, threads, other, BUDGET100, SPREAD_BACKBONES)
    by_budget = {100: short_rows, 200: main_rows} | {n: _results(results, MINI / f"signal-budget{n}.yaml")
                                                     for n in LONG_BUDGETS}
    lines += ["## 8. What the best-cell target would cost: the best cell's row at more steps", "",
              f"Full fine-tuning, the row of the best mini Table 1 cell, on {' and '.join(LONG_BUDGET_BACKBONES)} at "
              f"{', '.join(map(str, LONG_BUDGETS))} iterations (`benchmarks/mini/signal-budget{{400,800,1600}}.yaml`; the "
              "learning-rate schedule spans each run) beside the 100 of figure 7 and the main job's 200: the same data, "
              "tiny models and head; seed 42, and 43 and 44 where named. Average mIoU over the three targets (issue 16's target: 35).", ""]
    lines += _long_budget_lines(by_budget, _results(results, LONG_BUDGET_RANDOM),
                                ROOT / "results" / "plots" / "mini-signal" / "budget")
    lines += ["### 8b. The same budget on the miniature with shuffled looks", "",
              "EVA02's full and freeze rows, pretrained and from random initialisation, on the miniature of figure 1c "
              "(`benchmarks/mini/looks-shuffled-budget1600.yaml`, `looks-shuffled-budget1600-random.yaml`) at 1,600 "
              "iterations, beside the same cells at the protocol's 200 (figures 1c and 5): whether one miniature "
              "meets both signal targets at some budget.", ""]
    lines += _looks_long_budget_lines(
        {"pretrained": _results(results, MINI / "looks-shuffled.yaml") + looks_rows,
         "random": _results(results, MINI / "looks-shuffled-random.yaml")},
        {"pretrained": _results(results, LOOKS_LONG), "random": _results(results, LOOKS_LONG_RANDOM)})
    out = Path(args.out)
    atomic_write_text(out, "\n".join(lines) + "\n")  # the runner's writer: a killed run leaves the old report
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
