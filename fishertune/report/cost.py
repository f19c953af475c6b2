"""``fishertune cost``: what every cell of a manifest costs at full size, worked out on paper.

No weights, data or GPU are needed. Each cell's model is built as the runner builds it (the backbone, the
protocol's head, the method's ``apply``, the head trainable) on PyTorch's meta device and moved to fake tensors
(``FakeTensorMode``: shapes, dtypes and strides without storage, so ViT-H costs no memory), and one training
step runs on them at the protocol's crop and batch under the autocast of the chosen precision:

* **FLOPs** (``torch.utils.flop_counter.FlopCounterMode``: matrix products, convolutions and attention; not
  ``grid_sample``, normalisation or elementwise work), forward and backward, per training image, for the
  backbone, the pixel decoder and the transformer decoder apart: a head pass from detached features and a
  pixel-decoder pass separate what each part's backward costs. The losses apart, on real tensors of the head's
  output shapes (their targets and the Hungarian matching need values), with street-like labels (up to 16
  classes per crop, :func:`~fishertune.report.perf.street_batch`). And an evaluation window's forward.
* **Bytes**: the parameters (fp32), the gradients the backward leaves (every parameter that receives one;
  FisherTune and ChildTune compute the blocks' dense gradient, the mask applies in the optimizer) and the
  optimizer state in closed form (:func:`~fishertune.fisher.sparse.adamw_state_bytes`: AdamW, or SparseAdamW's
  budget with two moments and an int32 index per selected element).
* **Activations** at the protocol's batch: the bytes autograd saves for the backward (a saved-tensor hook, each
  storage once, parameters excluded, the low-precision copies autocast makes of the weights included), the
  losses' on real tensors. Autocast follows the CPU's rules on fake tensors (CUDA's lists differ in a few ops).
  The peak is about parameters + gradients + state + activations, the backward's temporaries and the
  allocator's slack aside: an estimate, which the GPU check (``benchmarks/perf/gpu_check.py``) measures.
* **Estimation** before training: FisherTune's (variational by default: a forward per image for the model's
  labels, then per step ``samples`` draws, doubled when antithetic, each a forward and backward of one batch, on
  x and again on x'; with the default Fisher curvature one image of the batch at a time, the same FLOPs) and ChildTune's pass over the source, counted as passes of the cell's own training step
  (an upper bound: their backward skips the head's weights). The runner runs them outside autocast, in fp32.

The projection of one cell: training (iterations x batch images) and evaluation (every target's windows) at a
stated share of the GPU's dense peak in the chosen precision, the estimation at that share of its fp32 peak
(PyTorch keeps full fp32 matrix products unless TF32 is switched on).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import torch

from fishertune.data import NUM_CLASSES
from fishertune.fisher.sparse import adamw_state_bytes, budget_spread
from fishertune.progress import bar
from fishertune.report.perf import Protocol, flop_counter, real_protocol, street_batch

#: the GPU the projection is for, and its dense peaks in TFLOP/s (NVIDIA's H100 SXM data sheet: BF16 tensor
#: core 1,979 with sparsity, so 989 dense; FP32 67, which PyTorch's fp32 matrix products get without TF32)
GPU = "NVIDIA H100 SXM"
PEAK_TFLOPS = {"bf16": 989.0, "fp32": 67.0}
UTILISATIONS = (0.3, 0.4, 0.5)
PARTS = ("backbone", "pixel decoder", "transformer decoder", "losses")


@dataclass
class CellCost:
    """What one cell costs (per training image unless said otherwise)."""

    backbone: str
    row: str
    method: str
    precision: str
    batch: int
    trainable_backbone: int
    param_bytes: int
    grad_bytes: int
    state_bytes: int
    activation_bytes: int  # saved for the backward at ``batch``
    flops: dict[str, dict[str, float]]  # part -> {"forward": ..., "backward": ...} per training image
    eval_flops: float  # one evaluation window's forward
    #: before training: forward + backward passes of one image, and forward-only passes of one image
    estimation: dict[str, Any] = field(default_factory=dict)

    @property
    def train_flops(self) -> float:
        return sum(p["forward"] + p["backward"] for p in self.flops.values())

    @property
    def estimation_flops(self) -> float:
        e = self.estimation
        return e.get("passes", 0) * self.train_flops + e.get("forwards", 0) * self.eval_flops if e else 0.0

    @property
    def peak_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.state_bytes + self.activation_bytes


def _count(fn: Callable[[], Any]) -> tuple[Any, float]:
    counter = flop_counter()
    with counter:
        out = fn()
    return out, float(counter.get_total_flops())


def _surrogate(outputs) -> torch.Tensor:
    """A scalar that depends on every output tensor: its backward costs what the real loss's backward into the
    outputs starts (the loss's own backward is counted apart)."""
    flat = [t for o in outputs for t in (o if isinstance(o, (list, tuple)) else [o])]
    return sum(t.float().sum() for t in flat if t.requires_grad)


def _detached(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().requires_grad_(t.requires_grad) for t in tensors]


@contextmanager
def _detached_queries(head):
    """Within: the head's query provider (a method's, e.g. VQT's outputs of the backbone) gives detached tensors."""
    provider = getattr(head, "query_provider", None)
    if provider is None:
        yield
        return
    head.query_provider = lambda batch: tuple(_detached(list(provider(batch))))
    try:
        yield
    finally:
        head.query_provider = provider


class _Saved:
    """Bytes autograd saves for the backward while active (each storage once; ``exclude``'s storages not)."""

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage()._cdata for t in exclude}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in self.exclude:
            self.storages[s._cdata] = s.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def _autocast(precision: str):
    from fishertune.engine.train import autocast

    return autocast(torch.device("cpu"), precision)


def estimation_passes(method: str, config: dict[str, Any], source_images: int, batch: int) -> dict[str, Any]:
    """What ``method``'s ``before_training`` computes, as forward + backward passes of one image (``passes``)
    and forward-only passes of one image (``forwards``); empty for methods that estimate nothing."""
    if method == "fishertune":
        from fishertune.fisher.method import FisherTuneConfig

        cfg = FisherTuneConfig(**config)
        runs = 2  # x and the shifted x'
        forwards = cfg.images if cfg.labels == "model" else 0
        if cfg.estimator == "variational":
            v = cfg.variational
            evals = v.samples * (2 if v.antithetic else 1)
            return {"what": f"variational, {cfg.images} images, {v.steps} steps x {evals} draws x batch {batch}, "
                            f"on x and x'", "passes": runs * v.steps * evals * batch, "forwards": forwards}
        return {"what": f"direct, {cfg.images} images, on x and x'", "passes": runs * cfg.images,
                "forwards": forwards}
    if method == "childtune":
        images = config.get("images") or source_images
        return {"what": f"one pass over {images:,} source images", "passes": images, "forwards": 0}
    return {}


def cell_cost(lm, cell, precision: str, source_images: int, loss_heads: dict | None = None) -> CellCost:
    """The cost of ``cell`` of the loaded manifest ``lm`` (module docstring); ``loss_heads`` caches the real
    heads the losses run on, per backbone width."""
    from fishertune.backbones import build_backbone
    from fishertune.heads import build_head
    from fishertune.segmentor import Segmentor
    from fishertune.tuning import MethodContext, TuningMethod, build_method

    m = lm.manifest
    crop, batch = m.train.crop_size, m.train.batch_size
    where = f"{lm.path}"
    with torch.device("meta"):
        backbone = build_backbone(cell.backbone, pretrained=False, img_size=crop, where=f"{where}: backbones")
        seg = Segmentor(backbone, build_head(m.head.name, backbone.embed_dim, NUM_CLASSES, where=f"{where}: head",
                                             **m.head.config))
        method = build_method(cell.method, cell.method_config, f"{where}: methods")
        method.apply(seg, MethodContext(device=torch.device("meta"), seed=m.seed))
    seg.head.requires_grad_(True)
    trainable_backbone = method.trainable_backbone_params(seg)
    sparse = type(method).sparse_indices is not TuningMethod.sparse_indices  # trains a mask of the blocks
    head = seg.head
    split = hasattr(head, "prediction_losses")  # Mask2Former: losses on real tensors, apart
    flops: dict[str, dict[str, float]] = {}
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        seg.to_empty(device="cpu")
        seg.train()
        images = torch.empty(batch, 3, crop, crop)
        labels = torch.zeros(batch, crop, crop, dtype=torch.long)
        with _Saved(exclude=list(seg.parameters())) as saved:
            with _autocast(precision):
                feats, f_backbone = _count(lambda: seg.backbone.forward_features(images))
                if split:
                    outputs, f_head = _count(lambda: head(feats))
                else:
                    outputs, f_head = _count(lambda: list(head.losses(feats, labels).values()))
        _, b_all = _count(lambda: _surrogate(outputs).backward())
        grads = [(n, p) for n, p in seg.named_parameters() if p.grad is not None]
        # the head alone: from detached features (and detached queries when a method supplies them from the
        # backbone, as VQT and Rein do), so that its backward stops at its inputs; the backbone ran again first
        with _autocast(precision):
            detached = _detached(seg.backbone.forward_features(images))
        with _detached_queries(head), _autocast(precision):
            head_out = head(detached) if split else list(head.losses(detached, labels).values())
        _, b_head = _count(lambda: _surrogate(head_out).backward())
        if hasattr(head, "pixel_decoder"):
            with _autocast(precision):
                decoded, f_pixel = _count(lambda: head.pixel_decoder(_detached(feats)))
            _, b_pixel = _count(lambda: _surrogate(decoded).backward())
            flops["pixel decoder"] = {"forward": f_pixel, "backward": b_pixel}
            flops["transformer decoder"] = {"forward": f_head - f_pixel, "backward": b_head - b_pixel}
        else:
            flops["head"] = {"forward": f_head, "backward": b_head}
        flops = {"backbone": {"forward": f_backbone, "backward": b_all - b_head}, **flops}
        seg.eval()  # (with autograd on: FlopCounterMode's module hooks trip over no_grad here; fake, so free)
        with _autocast(precision):
            _, eval_flops = _count(lambda: seg(images[:1]))
        shapes = [(o.shape, o.dtype) for outs in outputs for o in outs] if split else []
        activation = saved.bytes
    if split:
        loss_flops, loss_saved = _real_losses(lm, backbone.embed_dim, outputs_shapes=shapes, batch=batch,
                                              crop=crop, precision=precision, cache=loss_heads)
        flops["losses"] = loss_flops
        activation += loss_saved
    per_image = {part: {k: v / batch for k, v in f.items()} for part, f in flops.items()}
    selected = budget_spread(seg.backbone, trainable_backbone) if sparse else None
    return CellCost(
        backbone=cell.backbone, row=cell.row, method=cell.method, precision=precision, batch=batch,
        trainable_backbone=trainable_backbone,
        param_bytes=sum(p.numel() * p.element_size() for p in seg.parameters()),
        grad_bytes=sum(p.numel() * p.element_size() for _, p in grads),
        state_bytes=adamw_state_bytes(grads, selected), activation_bytes=activation, flops=per_image,
        eval_flops=eval_flops, estimation=estimation_passes(cell.method, cell.method_config, source_images, batch))


def _real_losses(lm, embed_dim: int, outputs_shapes, batch: int, crop: int, precision: str,
                 cache: dict | None) -> tuple[dict[str, float], int]:
    """FLOPs (forward with the matching, backward) and saved bytes of the head's losses on random predictions of
    the given shapes and street-like labels, on the CPU."""
    from fishertune.heads import build_head

    m = lm.manifest
    cache = {} if cache is None else cache
    if embed_dim not in cache:
        torch.manual_seed(m.seed)
        cache[embed_dim] = build_head(m.head.name, embed_dim, NUM_CLASSES, **m.head.config).train()
    head = cache[embed_dim]
    gen = torch.Generator().manual_seed(0)
    preds = [torch.randn(shape, generator=gen).to(dtype).requires_grad_() for shape, dtype in outputs_shapes]
    half = len(preds) // 2
    _, labels = street_batch(batch, crop, NUM_CLASSES)
    with torch.random.fork_rng(devices=[]), _Saved(exclude=preds) as saved:
        torch.manual_seed(0)
        with _autocast(precision):
            losses, forward = _count(lambda: head.prediction_losses(preds[:half], preds[half:], labels))
    _, backward = _count(lambda: sum(losses.values()).backward())
    return {"forward": forward, "backward": backward}, saved.bytes


def manifest_costs(lm, cells, precision: str) -> list[CellCost]:
    """:func:`cell_cost` of every cell, the source counted at its official size (real data)."""
    protocol = real_protocol(lm.manifest, "")
    source = protocol.estimation_images.get("childtune", 0)
    heads: dict = {}
    return [cell_cost(lm, cell, precision, source, heads) for cell in bar(cells, desc="cost", unit="cell")]


# ------------------------------------------------------------------------------------------ the projection
def project(cost: CellCost, protocol: Protocol, utilisation: float) -> dict[str, float]:
    """Seconds of one cell at ``utilisation`` of the GPU's dense peak: training and evaluation in the cost's
    precision, the estimation in fp32."""
    peak = PEAK_TFLOPS[cost.precision] * 1e12 * utilisation
    windows = sum(t.images * t.windows_per_image for t in protocol.targets)
    train = protocol.iterations * protocol.batch * cost.train_flops / peak
    evaluate = windows * cost.eval_flops / peak
    estimate = cost.estimation_flops / (PEAK_TFLOPS["fp32"] * 1e12 * utilisation)
    return {"train_s": train, "eval_s": evaluate, "estimation_s": estimate, "total_s": train + evaluate + estimate}


def record(lm, costs: list[CellCost], precision: str, command: str) -> dict[str, Any]:
    """Everything the Markdown shows, as JSON: the protocol, each cell's cost and projection, the totals."""
    protocol = real_protocol(lm.manifest, "")
    cells = []
    for c in costs:
        cells.append({**asdict(c), "train_flops": c.train_flops, "estimation_flops": c.estimation_flops,
                      "peak_bytes": c.peak_bytes,
                      "projection": {f"{u:.0%}": project(c, protocol, u) for u in UTILISATIONS}})
    totals = {f"{u:.0%}": sum(project(c, protocol, u)["total_s"] for c in costs) for u in UTILISATIONS}
    return {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "manifest": lm.manifest.name, "precision": precision, "gpu": GPU,
            "crop": lm.manifest.train.crop_size,
            "peak_tflops": PEAK_TFLOPS, "protocol": protocol.to_json(), "cells": cells, "total_s": totals}


def _g(flops: float) -> str:
    return f"{flops / 1e9:,.0f}" if flops >= 1e10 else f"{flops / 1e9:.2g}"


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f}" if n >= 2**20 * 10 else f"{n / 2**20:.2g}"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f}" if seconds < 36000 else f"{seconds / 3600:,.0f}"


def to_markdown(rec: dict[str, Any]) -> str:
    """The record as Markdown: FLOPs per part, memory, the projection per cell, and what the whole grid costs."""
    p, cells, precision = rec["protocol"], rec["cells"], rec["precision"]
    windows = sum(t["images"] * t["windows_per_image"] for t in p["targets"])
    parts = [part for part in (*PARTS, "head") if any(part in c["flops"] for c in cells)]
    lines = [
        f"# The cost of a `{rec['manifest']}` cell at full size, on paper",
        "",
        f"Written by `{rec['command']}` ({rec['date']}, PyTorch {rec['torch']}); nothing here is typed by hand. "
        f"Each cell's model is built as the runner builds it, on fake tensors (no weights, data or GPU), and one "
        f"training step runs at crop {rec['crop']} and batch {p['batch']} under {precision} autocast "
        "(`fishertune/report/cost.py` says how each figure is counted). FLOPs count matrix products, "
        "convolutions and attention (`torch.utils.flop_counter`), not `grid_sample` (the deformable attention's "
        "sampling), normalisation or elementwise work, so the real step does more work than counted.",
        "",
        f"Protocol: {p['iterations']:,} iterations of batch {p['batch']} "
        f"({p['iterations'] * p['batch']:,} training images); evaluation of "
        + ", ".join(f"{t['name']} ({t['images']:,} images x {t['windows_per_image']:g} windows)" for t in p["targets"])
        + f" = {windows:,.0f} windows; FisherTune's and ChildTune's estimates as configured.",
        "",
        "## FLOPs per training image (GFLOP, forward / backward)",
        "",
        "| backbone | method | " + " | ".join(parts) + " | total | eval window |",
        "|---|---|" + "---|" * (len(parts) + 2),
    ]
    for c in cells:
        f = c["flops"]
        cols = [f"{_g(f[x]['forward'])} / {_g(f[x]['backward'])}" if x in f else "-" for x in parts]
        lines.append(f"| `{c['backbone']}` | `{c['row']}` | " + " | ".join(cols)
                     + f" | **{_g(c['train_flops'])}** | {_g(c['eval_flops'])} |")
    lines += ["", f"## Memory in training (MB; activations at batch {p['batch']}, {precision})", "",
              "| backbone | method | trainable backbone | parameters | gradients | optimizer state | activations "
              "| about the peak |", "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| `{c['backbone']}` | `{c['row']}` | {c['trainable_backbone'] / 1e6:.2f}M | "
                     f"{_mb(c['param_bytes'])} | {_mb(c['grad_bytes'])} | {_mb(c['state_bytes'])} | "
                     f"{_mb(c['activation_bytes'])} | **{c['peak_bytes'] / 2**30:.1f} GB** |")
    shares = ", ".join(f"{u}" for u in rec["total_s"])
    lines += ["", f"## One cell on an {rec['gpu']} (hours at {shares} of the dense peak)", "",
              f"Training and evaluation at {rec['peak_tflops'][precision]:g} {precision} TFLOP/s x the share, "
              f"the estimation in fp32 at {rec['peak_tflops']['fp32']:g} TFLOP/s x the share. PFLOP per cell:",
              "",
              "| backbone | method | training PFLOP | evaluation PFLOP | estimation PFLOP | estimation | "
              + " | ".join(f"hours at {u}" for u in rec["total_s"]) + " | largest part at 40% |",
              "|---|---|---|---|---|---|" + "---|" * (len(rec["total_s"]) + 1)]
    for c in cells:
        proj = c["projection"]
        mid = proj["40%"]
        biggest = max(("training", mid["train_s"]), ("evaluation", mid["eval_s"]), ("estimation", mid["estimation_s"]),
                      key=lambda kv: kv[1])
        train_pf = p["iterations"] * p["batch"] * c["train_flops"] / 1e15
        lines.append(f"| `{c['backbone']}` | `{c['row']}` | {train_pf:,.0f} | {windows * c['eval_flops'] / 1e15:,.1f} | "
                     f"{c['estimation_flops'] / 1e15:,.1f} | {c['estimation'].get('what', '-')} | "
                     + " | ".join(_hours(v["total_s"]) for v in proj.values())
                     + f" | {biggest[0]} ({biggest[1] / mid['total_s']:.0%}) |")
    dominant = _dominant_part(cells)
    lines += ["", "## The whole grid", "",
              f"{len(cells)} cells: "
              + ", ".join(f"**{s / 3600:,.0f} GPU-hours** at {u}" for u, s in rec["total_s"].items())
              + f" of the {rec['gpu']}'s {precision} peak. {dominant}"]
    if precision == "bf16":
        fp32 = sum(c["projection"]["40%"]["train_s"] + c["projection"]["40%"]["eval_s"] for c in cells)
        fp32 *= rec["peak_tflops"]["bf16"] / rec["peak_tflops"]["fp32"]
        fp32 += sum(c["projection"]["40%"]["estimation_s"] for c in cells)
        lines += ["", f"The same FLOPs in fp32 (the protocol's `train.precision` default, Rein's), at 40% of the "
                      f"{rec['peak_tflops']['fp32']:g} TFLOP/s fp32 peak: **{fp32 / 3600:,.0f} GPU-hours**; set "
                      "`train: {precision: bf16}` in the manifest for the bf16 figures."]
    lines.append("")
    return "\n".join(lines)


def _dominant_part(cells: list[dict]) -> str:
    """Which part of the training step carries the FLOPs, over the grid."""
    totals: dict[str, float] = {}
    for c in cells:
        for part, f in c["flops"].items():
            totals[part] = totals.get(part, 0.0) + f["forward"] + f["backward"]
    whole = sum(totals.values())
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    return ("Of the training step's counted FLOPs over all cells: "
            + ", ".join(f"{part} {v / whole:.1%}" for part, v in ranked) + ".")


def to_json(rec: dict[str, Any]) -> str:
    return json.dumps(rec, indent=1) + "\n"
