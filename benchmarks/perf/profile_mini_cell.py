"""Where a mini Table 1 cell's time goes, and how to use two cores: results/perf/mini-profile.md.

    python benchmarks/perf/profile_mini_cell.py [--cell 'sam-tiny--full--*'] [--steps 40]

Measured on the cell as the runner builds it (``prepare_cell``, the method's ``before_training``):

* one training step split into data loading (decode, augmentation, batching), forward with the loss
  (of which Mask2Former's Hungarian matching, scipy on the host), backward, and the optimizer step,
  averaged over ``--steps`` steps after two warm-up steps, with 1 and with 2 intra-op threads;
* evaluation of the three targets (sliding windows), with 1 and 2 threads;
* two whole short cells (``--cell-iterations``) run one after the other with 2 threads each, against
  the same two cells at once in two processes of 1 thread each (``fishertune run --jobs 2``), as wall
  time: how the main job should use a 2-core machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "benchmarks" / "mini" / "table1.yaml"


def step_profile(pattern: str, threads: int, steps: int) -> dict[str, float]:
    import torch

    from fishertune.engine.evaluate import evaluate
    from fishertune.engine.optim import build_optimizer
    from fishertune.engine.train import LossModule, source_batches
    from fishertune.heads import matcher
    from fishertune.runner.data import open_datasets
    from fishertune.runner.manifest import load_manifest
    from fishertune.runner.run import prepare_cell, select_cells

    torch.set_num_threads(threads)
    lm = load_manifest(MANIFEST)
    cell = select_cells(lm.cells(), [pattern])[0]
    m = lm.manifest
    source, targets = open_datasets(m, progress=False)
    device = torch.device("cpu")
    seg, method, ctx, transform, _ = prepare_cell(lm, cell, source, device)
    method.before_training(seg, ctx)
    opt = build_optimizer(seg, lr=m.train.lr, weight_decay=m.train.weight_decay, sparse=method.sparse_indices(seg),
                          scaled=seg.backbone_weights, lr_mult=m.train.backbone_lr_mult)
    matching = [0.0]
    original = matcher.HungarianMatcher.__call__

    def timed(self, *a, **k):
        t = time.perf_counter()
        out = original(self, *a, **k)
        matching[0] += time.perf_counter() - t
        return out

    matcher.HungarianMatcher.__call__ = timed
    model = LossModule(seg)
    batches = iter(source_batches(source, transform, cell.seed, m.train.batch_size, 0, 0, steps + 2))
    parts = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for i in range(steps + 2):
        if i == 2:
            parts = dict.fromkeys(parts, 0.0)
            matching[0] = 0.0
        t0 = time.perf_counter()
        images, labels = next(batches)
        t1 = time.perf_counter()
        loss = model(images, labels)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward(seg, i)
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[k] += dt
    matcher.HungarianMatcher.__call__ = original
    out = {k: 1000 * v / steps for k, v in parts.items()}
    out["matching"] = 1000 * matching[0] / steps
    out["step"] = sum(out[k] for k in ("data", "forward", "backward", "optimizer"))
    t = time.perf_counter()
    for name, dataset in targets.items():
        evaluate(seg, dataset, tuple(m.eval.test_sizes[name]), m.eval.crop_size, m.eval.stride, m.execution.eval_batch,
                 device)
    out["evaluation_s"] = time.perf_counter() - t
    out["iterations"] = m.train.iterations
    return out


def cells_wall(cells: list[str], iterations: int, parallel: bool) -> float:
    """Wall time of running ``cells`` (ids of the mini Table 1, shortened to ``iterations``) from scratch."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "table1.yaml"
        text = MANIFEST.read_text().replace("include: protocol.yaml", f"include: {MANIFEST.parent}/protocol.yaml")
        manifest.write_text(text + f"train: {{iterations: {iterations}}}\n")
        cmd = [sys.executable, "-m", "fishertune.cli", "run", str(manifest), "--results", f"{tmp}/runs", "--no-render",
               "--only", *cells] + (["--jobs", "2", "--threads", "1"] if parallel else ["--jobs", "1", "--threads", "2"])
        t = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", default="sam-tiny--full--*", help="the cell profiled (default: %(default)s)")
    p.add_argument("--steps", type=int, default=40, help="training steps timed (default: %(default)s)")
    p.add_argument("--cell-iterations", type=int, default=60, help="iterations of the two whole cells (default: "
                   "%(default)s)")
    p.add_argument("--out", default=str(ROOT / "results" / "perf" / "mini-profile.md"))
    args = p.parse_args(argv)
    import json

    profiles = {}
    for threads in (1, 2):  # each in a fresh process, so that the thread pools do not mix
        code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks' / 'perf')!r}); "
                f"from profile_mini_cell import step_profile; "
                f"print(json.dumps(step_profile({args.cell!r}, {threads}, {args.steps})))")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
        profiles[threads] = json.loads(out.strip().splitlines()[-1])
    pair = ["sam-tiny--full--*", "dinov2-tiny--full--*"]
    serial = cells_wall(pair, args.cell_iterations, parallel=False)
    parallel = cells_wall(pair, args.cell_iterations, parallel=True)
    import torch

    from fishertune.runner.environment import cpu_name

    lines = ["# Where a mini cell's time goes", "",
             f"Written by `python benchmarks/perf/profile_mini_cell.py --cell '{args.cell}'` on {cpu_name()}, torch "
             f"{torch.__version__}.", "",
             "| per training step (ms) | 1 thread | 2 threads |", "| --- | --- | --- |"]
    for key in ("data", "forward", "matching", "backward", "optimizer", "step"):
        label = {"matching": "of which Hungarian matching", "step": "**step**"}.get(key, key)
        lines.append(f"| {label} | {profiles[1][key]:.1f} | {profiles[2][key]:.1f} |")
    it = profiles[1]["iterations"]
    cell_s = {t: it * profiles[t]["step"] / 1000 + profiles[t]["evaluation_s"] for t in (1, 2)}
    lines += [f"| evaluation of the 3 targets (s) | {profiles[1]['evaluation_s']:.1f} | "
              f"{profiles[2]['evaluation_s']:.1f} |",
              f"| a cell's {it} iterations + evaluation (s) | {cell_s[1]:.0f} | {cell_s[2]:.0f} |", "",
              f"Two whole cells ({', '.join(f'`{c}`' for c in pair)}, {args.cell_iterations} iterations each, from a "
              f"fresh process): one after the other with 2 threads each {serial:.1f} s; both at once, 1 thread each "
              f"(`--jobs 2`) {parallel:.1f} s ({serial / parallel:.2f}x)."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
