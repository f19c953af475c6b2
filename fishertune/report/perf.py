"""The per-method performance record that ``benchmarks/perf/test_methods.py`` writes.

The benchmark measures; this module names the device, projects the cost of one table cell from the
measured rates and writes ``results/perf/<device>.json`` and ``.md``. Nothing here measures or
holds a measured number: every figure in the files comes from the benchmark's run.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fishertune.data.transforms import TestResize
from fishertune.engine.evaluate import window_origins

SCHEMA = 1

#: dense bf16 tensor-core peak (TFLOP/s, no sparsity) from NVIDIA's data sheets, matched against
#: ``torch.cuda.get_device_name()`` in this order (the first match wins); an unknown device gets no fraction
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("A100", 312.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The data sheet's dense bf16 peak of ``device_name``, or None when the table does not know it."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def flop_counter() -> "torch.utils.flop_counter.FlopCounterMode":
    """``FlopCounterMode`` (matrix products, convolutions, attention) that also counts the CPU's fused attention
    (``_scaled_dot_product_flash_attention_for_cpu`` and its backward, which PyTorch's table leaves out, so that
    a count on the CPU or on fake CPU tensors holds attention as a count on CUDA does)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    return fc.FlopCounterMode(display=False, custom_mapping={  # arguments as shapes, in the ops' order
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *_, out_shape=None, **__: fc.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *_, out_shape=None, **__: fc.sdpa_backward_flop_count(grad, q, k, v)})


def device_slug(kind: str, name: str = "", cores: int | None = None) -> str:
    """``cpu-<cores>c`` on the CPU; the GPU's name lowercased with dashes (``nvidia-h100-80gb-hbm3``)."""
    if kind == "cpu":
        return f"cpu-{cores or os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def windows_per_image(size: tuple[int, int], test_size: tuple[int, int], crop: int, stride: int) -> int:
    """Sliding windows evaluation runs on an image of ``size`` (w, h): :class:`TestResize` to ``test_size``,
    then :func:`window_origins` along each axis."""
    w, h = TestResize(test_size).output_size(*size)
    return len(window_origins(h, crop, stride)) * len(window_origins(w, crop, stride))


@dataclass
class Target:
    """One evaluation set of a table cell: how many images, and windows per image (may be a mean)."""

    name: str
    images: int
    windows_per_image: float
    note: str = ""


@dataclass
class Protocol:
    """What one table cell runs, for :func:`project_cell`."""

    name: str
    iterations: int
    batch: int
    targets: list[Target]
    #: per method: images its ``before_training`` reads (FisherTune's estimate, ChildTune's Fisher pass)
    estimation_images: dict[str, int] = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "iterations": self.iterations, "batch": self.batch,
                "targets": [t.__dict__ for t in self.targets], "estimation_images": self.estimation_images,
                "note": self.note}


def project_cell(protocol: Protocol, images_per_s: float, windows_per_s: float,
                 estimation_s_per_image: float | None = None, method: str = "") -> dict[str, float]:
    """Seconds of one cell: ``iterations x batch / images_per_s`` of training, the estimation the method
    makes before it (images x seconds per image), and every target's windows at ``windows_per_s``."""
    train = protocol.iterations * protocol.batch / images_per_s
    windows = sum(t.images * t.windows_per_image for t in protocol.targets)
    evaluate = windows / windows_per_s
    estimate = 0.0
    if method in protocol.estimation_images and estimation_s_per_image is not None:
        estimate = protocol.estimation_images[method] * estimation_s_per_image
    return {"train_s": train, "estimation_s": estimate, "eval_s": evaluate, "eval_windows": windows,
            "total_s": train + estimate + evaluate}


#: the real evaluation frames (w, h) per target: Cityscapes 2048x1024, BDD100K 1280x720, ACDC 1920x1080;
#: Mapillary's vary (mostly 4:3, some 16:9) and are counted at its test size (3 windows at 1024x512, where a 4:3
#: frame gives 2): an upper bound
REAL_FRAMES = {"cityscapes": (2048, 1024), "bdd100k": (1280, 720), "acdc": (1920, 1080)}


def cell_protocol(m, sizes: dict[str, list[tuple[int, int]]], counts: dict[str, int], source_images: int,
                  note: str) -> Protocol:
    """A cell of manifest ``m``: its iterations and batch, its targets' windows (the mean over ``sizes``), the
    images the estimating methods read (FisherTune's configured images; ChildTune's, else the whole source)."""
    from fishertune.fisher.method import FisherTuneConfig

    targets = []
    for name in m.targets:
        per = [windows_per_image(s, tuple(m.eval.test_sizes[name]), m.eval.crop_size, m.eval.stride)
               for s in sizes[name]]
        targets.append(Target(name, counts[name], sum(per) / len(per),
                              f"images of {', '.join(f'{w}x{h}' for w, h in sizes[name])}"))
    fisher = FisherTuneConfig(**m.method_configs.get("fishertune", {}))
    child = m.method_configs.get("childtune", {}).get("images") or source_images
    return Protocol(m.name, m.train.iterations, m.train.batch_size, targets,
                    {"fishertune": fisher.images, "childtune": child}, note)


def real_protocol(m, note: str) -> Protocol:
    """:func:`cell_protocol` on the real data sets: their official image counts and frame sizes."""
    from fishertune.data.verify import OFFICIAL_COUNTS

    sizes = {t: [REAL_FRAMES.get(t, tuple(m.eval.test_sizes[t]))] for t in m.targets}
    counts = {t: sum(n for split, n in OFFICIAL_COUNTS[t].items() if split.split("/")[0] == "val") for t in m.targets}
    return cell_protocol(m, sizes, counts, OFFICIAL_COUNTS[m.source]["train"], note)


def street_batch(n: int, crop: int, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random images and street-like labels: a class per cell of a 4x4 grid (so up to 16 classes per
    image, as real crops hold about 10 to 15, each a mask Mask2Former matches), the top rows ignored."""
    gen = torch.Generator().manual_seed(seed)
    cell = crop // 4
    images = torch.randn(n, 3, crop, crop, generator=gen)
    labels = torch.randint(0, num_classes, (n, 4, 4), generator=gen)
    labels = labels.repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    labels[:, : crop // 8] = 255
    return images, labels


# ------------------------------------------------------------------------------------------ writing
def _fmt(value: Any) -> str:
    """Integers with thousands separators; floats to 3 significant digits (1 decimal from 10, none from 100)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def render_markdown(record: dict[str, Any]) -> str:
    """The record as Markdown: the setting, one row per method, the estimation and the cell projection."""
    dev, setup, methods = record["device"], record["setup"], record["methods"]
    cuda = dev["kind"] == "cuda"
    lines = [f"# Per-method cost on {dev['name']} ({record['date']})", "",
             f"Model `{setup['model']}`: {setup['backbone']} + {setup['head']}, crop {setup['crop']}, batch "
             f"{setup['batch']}, {setup['precision']}; PyTorch {record['torch']}"
             + ("" if cuda else f", {dev['threads']} intra-op thread(s), load average {record['load_average_1min']}")
             + ". Written by `benchmarks/perf/test_methods.py`; ratios are to `full` in the same run.", ""]

    def table(cols: list[str], rows: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(r) + " |" for r in rows]

    def percent(frac: float | None) -> str:
        return "-" if frac is None else f"{100 * frac:.1f}%"

    cols = ["method", "trainable backbone params", "step ms", "step / full", "images/s"]
    cols += ["TFLOP/s", "of bf16 peak"] if cuda else []
    cols += ["GFLOP per step", "eval windows/s", "eval / full"]
    rows = []
    for name, m in methods.items():
        row = [f"`{name}`", _fmt(m.get("trainable_backbone_params")), _fmt(m.get("step_ms")),
               _ratio(m.get("step_ratio")), _fmt(m.get("images_per_s"))]
        row += [_fmt(m.get("tflops")), percent(m.get("bf16_peak_fraction"))] if cuda else []
        row += [_fmt(m.get("gflop_per_step")), _fmt(m.get("eval_windows_per_s")), _ratio(m.get("eval_ratio"))]
        rows.append(row)
    lines += ["Training step (batch %d) and evaluation:" % setup["batch"], ""] + table(cols, rows)
    cols = ["method", "optimizer state MB", "state / full", "params+grads+state MB", "memory / full",
            "saved activations MB"]
    cols += ["peak GB", "peak / full"] if cuda else []
    rows = []
    for name, m in methods.items():
        row = [f"`{name}`", _fmt(m.get("optimizer_state_mb")), _ratio(m.get("state_ratio")),
               _fmt(m.get("model_memory_mb")), _ratio(m.get("model_memory_ratio")), _fmt(m.get("saved_activations_mb"))]
        row += [_fmt(m.get("peak_memory_gb")), _ratio(m.get("peak_ratio"))] if cuda else []
        rows.append(row)
    lines += ["", "Memory (batch %d):" % setup["batch"], ""] + table(cols, rows)
    if cuda:
        cols = ["method", "largest batch", "images/s", "TFLOP/s", "of bf16 peak", "peak GB"]
        rows = [[f"`{name}`", _fmt(m.get("largest_batch")), _fmt(m.get("images_per_s_largest_batch")),
                 _fmt(m.get("tflops_largest_batch")), percent(m.get("bf16_peak_fraction_largest_batch")),
                 _fmt(m.get("peak_memory_gb_largest_batch"))] for name, m in methods.items()]
        lines += ["", "The largest batch that fits (doubling from the protocol's batch):", ""] + table(cols, rows)
    est = record.get("estimation", {})
    if est:
        lines += ["", "Estimation before training (`before_training`, no cache), per source image:", "",
                  "| case | config | images | s per image | / the method's step | / full's step |",
                  "|---|---|---|---|---|---|"]
        for case, e in est.items():
            config = ", ".join(f"{k}: {v}" for k, v in e["config"].items())
            lines.append(f"| `{case}` | {config} | {e['images']} | {_fmt(e['s_per_image'])} | "
                         f"{_ratio(e['ratio_to_method_step'])} | {_ratio(e.get('ratio_to_full_step'))} |")
    proj = record.get("projection")
    if proj:
        p = proj["protocol"]
        lines += ["", f"Projected time of one cell of `{p['name']}` ({p['iterations']:,} iterations of batch "
                      f"{p['batch']}; evaluation: " + ", ".join(
                          f"{t['name']} {t['images']:,} x {_fmt(float(t['windows_per_image']))} windows"
                          for t in p["targets"]) + "):", "",
                  "| method | training | estimation | evaluation | total |", "|---|---|---|---|---|"]
        for name, c in proj["methods"].items():
            estimate = _duration(c["estimation_s"]) if c["estimation_s"] else "-"
            lines.append(f"| `{name}` | {_duration(c['train_s'])} | {estimate} | {_duration(c['eval_s'])} "
                         f"| **{_duration(c['total_s'])}** |")
        if p.get("note"):
            lines += ["", p["note"]]
    if record.get("notes"):
        lines += [""] + [f"- {n}" for n in record["notes"]]
    return "\n".join(lines) + "\n"


def write_record(record: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """``<out_dir>/<stem>.json`` and ``.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    js.write_text(json.dumps(record, indent=2) + "\n")
    md.write_text(render_markdown(record))
    return [js, md]
