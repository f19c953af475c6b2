"""Per-method cost: training step, optimizer state and memory, Fisher estimation, evaluation windows.

Issue 9 (parts 2 and 3). Every registered method (``fishertune.tuning.registered_methods()``) is built
the way the runner builds a cell (``runner.run.prepare_cell``: backbone, head from the manifest's
seed, ``Segmentor``, the method's ``apply``, the head trainable, ``before_training``, then
:func:`~fishertune.engine.optim.build_optimizer` with the method's sparse indices) and measured:

* ``test_memory[method]``: each method's segmentor alone: trainable parameters, the bytes of
  parameters, gradients and optimizer state after a step (their sum: "model memory"), the bytes
  autograd saves for backward in one forward (activations; parameters excluded), the FLOPs of one
  forward + backward (``torch.utils.flop_counter.FlopCounterMode``); on CUDA also the peak allocated
  memory of a training step and the largest batch that fits (doubling from the protocol's until
  out of memory) with its images/s.
* ``test_train_step``: one training step (forward + loss, ``zero_grad``, backward, the method's
  ``after_backward``, optimizer step) of every method, all resident, one step each per round, the
  order rotated every round, after a warm-up; medians. The figure: step time / full fine-tuning's.
* ``test_fisher_estimation[case]``: ``before_training`` with ``cache: false`` on ``images`` source
  images, divided by the images, as a ratio to one training step of the same model (measured just
  before) and of full fine-tuning: FisherTune as the manifest configures it (its variational
  estimate's steps scaled with the images, so that seconds per image are those of the manifest's
  config), FisherTune's direct estimator, and ChildTune's Fisher pass.
* ``test_eval_windows``: :func:`~fishertune.engine.evaluate.slide_logits` on one image the size of
  the manifest's BDD100K test size (8 windows), every method in rotation; windows per second.

When every test has run, the module writes ``results/perf/<device>.json`` and ``.md``
(:mod:`fishertune.report.perf`): the figures, the ratios to ``full`` and the projected time of one
Table 1 cell. Nothing else writes those files.

Models (``FISHERTUNE_PERF_MODEL``; default ``large`` with CUDA, else ``tiny``):

* ``tiny``: one cell of ``benchmarks/mini/table1.yaml`` (``dinov2-tiny``, the mini protocol's
  ``mask2former-tiny``, crop 64, batch 4, fp32); projection: a miniature Table 1 cell.
* ``small``: a ViT-S/16 with DINOv2's blocks (21.7M, as ``test_sparse.py``) at crop 128 with the
  mini protocol's head otherwise; no projection.
* ``large``: one cell of ``benchmarks/table1.yaml`` with ``dinov2-l`` (random weights): Rein's
  Mask2Former, crop 512, batch 4, bf16 autocast (``FISHERTUNE_PERF_PRECISION=fp32`` for Rein's
  fp32); projection: a Table 1 cell.

On the CPU the intra-op threads are ``FISHERTUNE_PERF_THREADS`` (default 1, as ``test_sparse.py``).
``FISHERTUNE_PERF_OUT``: folder of the record (default ``results/perf``; ``none``: do not write).
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from fishertune.backbones import build_backbone
from fishertune.backbones.timm_vit import TimmViTBackbone, timm_vit
from fishertune.data import NUM_CLASSES
from fishertune.data.synth import FIXED_SIZES, MAPILLARY_SIZES
from fishertune.data.verify import OFFICIAL_COUNTS
from fishertune.engine.evaluate import slide_logits, window_origins
from fishertune.engine.optim import build_optimizer
from fishertune.engine.train import autocast
from fishertune.fisher.method import FisherTuneConfig
from fishertune.fisher.sparse import state_bytes
from fishertune.heads import build_head
from fishertune.report.perf import (SCHEMA, Protocol, Target, bf16_peak_tflops, device_slug, project_cell,
                                    windows_per_image, write_record)
from fishertune.runner.manifest import Manifest, load_manifest
from fishertune.segmentor import Segmentor
from fishertune.tuning import MethodContext, TuningMethod, build_method, registered_methods

ROOT = Path(__file__).resolve().parents[2]
#: every registered method, full fine-tuning (the reference of every ratio) first
METHODS = sorted(registered_methods(), key=lambda m: m != "full")
MAX_BATCH = 512  # the largest-batch search stops here
CPU_THREADS = int(os.environ.get("FISHERTUNE_PERF_THREADS", "1"))
CUDA = torch.cuda.is_available()
MODEL = os.environ.get("FISHERTUNE_PERF_MODEL", "large" if CUDA else "tiny")
OUT = os.environ.get("FISHERTUNE_PERF_OUT", str(ROOT / "results" / "perf"))


# ------------------------------------------------------------------------------------------ the setting
@dataclass
class Setup:
    model: str
    backbone: str  # how the record names it
    build_backbone: Callable[[], torch.nn.Module]
    manifest: Manifest  # head, protocol, method configs
    crop: int
    precision: str
    device: torch.device
    warmup: int  # steps per method before timing
    rounds: int  # timed rounds; each runs one step of every method
    eval_rounds: int
    eval_size: tuple[int, int]  # (w, h) of the image slide_logits runs on
    eval_stride: int
    protocol: Protocol | None  # for the projection of one cell

    @property
    def batch(self) -> int:
        return self.manifest.train.batch_size

    @property
    def head_config(self) -> dict[str, Any]:
        return dict(self.manifest.head.config)

    def method_config(self, method: str) -> dict[str, Any]:
        return dict(self.manifest.method_configs.get(method, {}))


def _table1_protocol(m: Manifest, sizes: dict[str, list[tuple[int, int]]], counts: dict[str, int],
                     source_images: int, note: str) -> Protocol:
    """A Table 1 cell of manifest ``m``: its iterations and batch, its targets' windows (mean over ``sizes``)."""
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


def _setup(model: str) -> Setup:
    device = torch.device("cuda" if CUDA else "cpu")
    if model == "large":
        m = load_manifest(ROOT / "benchmarks" / "table1.yaml").manifest
        crop = m.train.crop_size
        # real frames: Cityscapes 2048x1024, BDD100K 1280x720; Mapillary's vary (mostly 4:3, some 16:9),
        # taken at its test size (3 windows, where a 4:3 frame gives 2): an upper bound
        sizes = {"cityscapes": [(2048, 1024)], "bdd100k": [(1280, 720)],
                 "mapillary": [tuple(m.eval.test_sizes["mapillary"])]}
        counts = {t: OFFICIAL_COUNTS[t]["val"] for t in m.targets}
        protocol = _table1_protocol(m, sizes, counts, OFFICIAL_COUNTS[m.source]["train"],
                                    "Training at the measured images/s of batch 4 (data loading not counted: "
                                    "see test_loading.py), FisherTune's estimate at its default config (512 images), "
                                    "ChildTune's Fisher pass over all 24,966 GTAV images; Mapillary counted at its "
                                    "test size (3 windows; a 4:3 frame gives 2).")
        return Setup("large", "dinov2-l (random weights)",
                     lambda: build_backbone("dinov2-l", pretrained=False, seed=m.seed, img_size=crop), m, crop,
                     os.environ.get("FISHERTUNE_PERF_PRECISION", "bf16"), device, warmup=5, rounds=20,
                     eval_rounds=10, eval_size=tuple(m.eval.test_sizes["bdd100k"]), eval_stride=m.eval.stride,
                     protocol=protocol)
    m = load_manifest(ROOT / "benchmarks" / "mini" / "table1.yaml").manifest
    precision = os.environ.get("FISHERTUNE_PERF_PRECISION", "bf16" if device.type == "cuda" else "fp32")
    if model == "tiny":
        crop = m.train.crop_size
        sizes = {t: [FIXED_SIZES[t]] for t in FIXED_SIZES} | {"mapillary": list(MAPILLARY_SIZES)}
        counts = {t: m.data.synth_images for t in m.targets}
        protocol = _table1_protocol(m, sizes, counts, m.data.synth_images,
                                    "Training at the measured images/s of batch 4 on this benchmark's thread count "
                                    "(data loading not counted), FisherTune's estimate and ChildTune's pass as the "
                                    "manifest configures them; Mapillary: the mean over the miniature's frame sizes.")
        return Setup("tiny", "dinov2-tiny", lambda: build_backbone("dinov2-tiny", pretrained=False, seed=m.seed, img_size=crop), m,
                     crop, precision, device, warmup=3, rounds=30, eval_rounds=30,
                     eval_size=tuple(m.eval.test_sizes["bdd100k"]), eval_stride=m.eval.stride, protocol=protocol)
    if model == "small":
        crop, scale = 128, 128 / m.eval.crop_size

        def vit_s() -> torch.nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(m.seed)
                return TimmViTBackbone(timm_vit(crop, 16, embed_dim=384, depth=12, num_heads=6, init_values=1e-5),
                                       family="dinov2")

        w, h = m.eval.test_sizes["bdd100k"]
        return Setup("small", "ViT-S/16, DINOv2 blocks (random weights)", vit_s, m, crop, precision, device,
                     warmup=2, rounds=10, eval_rounds=10, eval_size=(round(w * scale), round(h * scale)),
                     eval_stride=round(m.eval.stride * scale), protocol=None)
    raise ValueError(f"FISHERTUNE_PERF_MODEL={model!r}: tiny, small or large")


SETUP = _setup(MODEL)
if os.environ.get("FISHERTUNE_PERF_ROUNDS"):  # fewer rounds for a quick check of the code
    SETUP.rounds = SETUP.eval_rounds = int(os.environ["FISHERTUNE_PERF_ROUNDS"])


def _estimation_cases(setup: Setup) -> dict[str, tuple[str, dict[str, Any]]]:
    """case -> (method, config): each estimation the record times, on at most 64 images.

    ``fishertune``: the manifest's config with fewer images when it asks for more than 64, and the
    variational steps cut in the same proportion (its cost: a forward per image for the labels, plus
    four forward + backward passes of one batch per step, two for x and two for x'), so that the
    seconds per image are the manifest config's. ``fishertune-default``: the same for FisherTune's
    default config (512 images, 200 steps: measured on 64 and 25), when the manifest's differs.
    ``fishertune-direct``: the direct estimator. ``childtune``: its Fisher pass."""
    fisher = FisherTuneConfig(**setup.method_config("fishertune"))
    images = min(fisher.images, 64)
    steps = max(1, round(fisher.variational.steps * images / fisher.images))
    cases = {"fishertune": ("fishertune", {**setup.method_config("fishertune"), "images": images, "cache": False,
                                           "variational": {**fisher.variational.model_dump(), "steps": steps}}),
             "fishertune-direct": ("fishertune", {**setup.method_config("fishertune"), "estimator": "direct",
                                                  "images": min(fisher.images, 16), "cache": False})}
    default = FisherTuneConfig()
    if fisher != default:  # the manifest changes it (the miniature's): the paper's default config as well
        images = min(default.images, 64)
        steps = max(1, round(default.variational.steps * images / default.images))
        cases["fishertune-default"] = ("fishertune", {"images": images, "cache": False, "variational": {
            **default.variational.model_dump(), "steps": steps}})
    source = setup.protocol.estimation_images["childtune"] if setup.protocol else 32
    cases["childtune"] = ("childtune", {**setup.method_config("childtune"), "images": min(source, 32)})
    order = ("fishertune", "fishertune-default", "fishertune-direct", "childtune")
    return {case: cases[case] for case in order if case in cases}


ESTIMATION_CASES = _estimation_cases(SETUP)


# ------------------------------------------------------------------------------------------ building
def _batch(n: int, setup: Setup, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random images and street-like labels: a class per cell of a 4x4 grid (so up to 16 classes per
    image, as real crops hold about 10 to 15, each a mask Mask2Former matches), the top rows ignored."""
    gen = torch.Generator().manual_seed(seed)
    crop, cell = setup.crop, setup.crop // 4
    images = torch.randn(n, 3, crop, crop, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (n, 4, 4), generator=gen)
    labels = labels.repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    labels[:, : crop // 8] = 255
    return images.to(setup.device), labels.to(setup.device)


def _source_batches(setup: Setup) -> Callable[[int], Any]:
    """``ctx.source_batches``: n batches of the protocol's size, cycling over 8 distinct ones."""
    batches = [_batch(setup.batch, setup, seed=100 + i) for i in range(8)]
    return lambda n: (batches[i % len(batches)] for i in range(n))


def _context(setup: Setup) -> MethodContext:
    m = setup.manifest
    source = setup.protocol.estimation_images["childtune"] if setup.protocol else None
    return MethodContext(device=setup.device, seed=m.seed, source_batches=_source_batches(setup),
                         source_images=source)  # no cache_dir, no identity: nothing is cached


@dataclass
class Run:
    name: str
    model: Segmentor
    method: TuningMethod
    optimizer: torch.optim.Optimizer
    times: dict[str, list[float]] = field(default_factory=lambda: {"step": [], "step_cpu": []})


_BASES: dict[str, Segmentor] = {}


def base_segmentor(setup: Setup) -> Segmentor:
    """Backbone and head as ``prepare_cell`` builds them (on the CPU, the head from the manifest's seed),
    built once; every run starts from a copy, so all methods start from the same weights, as the cells of
    one table do."""
    if setup.model not in _BASES:
        backbone = setup.build_backbone()
        torch.manual_seed(setup.manifest.seed)
        head = build_head(setup.manifest.head.name, backbone.embed_dim, NUM_CLASSES, **setup.head_config)
        _BASES[setup.model] = Segmentor(backbone, head)
    return _BASES[setup.model]


def build_run(name: str, setup: Setup) -> Run:
    """The cell as ``prepare_cell`` and ``engine.train.train`` build it. FisherTune and ChildTune choose
    their 5% mask from a quick estimate on one batch (the step costs the same for any mask of that size)."""
    m = setup.manifest
    config = setup.method_config(name)
    if name == "fishertune":
        config |= {"estimator": "direct", "images": setup.batch, "cache": False}
    elif name == "childtune":
        config |= {"images": setup.batch}
    model = copy.deepcopy(base_segmentor(setup)).to(setup.device)
    method = build_method(name, config)
    ctx = _context(setup)
    method.apply(model, ctx)
    model.head.requires_grad_(True)
    method.before_training(model, ctx)
    model.train()
    optimizer = build_optimizer(model, m.train.lr, m.train.weight_decay, sparse=method.sparse_indices(model))
    return Run(name, model, method, optimizer)


def _sync(setup: Setup) -> None:
    if setup.device.type == "cuda":
        torch.cuda.synchronize()


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor, setup: Setup, iteration: int = 0) -> None:
    """One step as ``engine.train.train`` takes it (no scheduler: a multiply per group)."""
    with autocast(setup.device, setup.precision):
        loss = run.model.loss(images, labels)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.method.after_backward(run.model, iteration)
    run.optimizer.step()


def timed_step(run: Run, images: torch.Tensor, labels: torch.Tensor, setup: Setup) -> None:
    _sync(setup)
    cpu, start = time.process_time(), time.perf_counter()
    train_step(run, images, labels, setup)
    _sync(setup)
    run.times["step"].append(time.perf_counter() - start)
    run.times["step_cpu"].append(time.process_time() - cpu)


def _mb(n: int) -> float:
    return round(n / 2**20, 3)


def _machine() -> dict[str, Any]:
    if SETUP.device.type == "cuda":
        name = torch.cuda.get_device_name()
        return {"kind": "cuda", "name": name, "slug": device_slug("cuda", name),
                "bf16_peak_tflops": bf16_peak_tflops(name)}
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"kind": "cpu", "name": f"{os.cpu_count()}-core CPU ({name})", "slug": device_slug("cpu"),
            "cores": os.cpu_count(), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def threads():
    before = torch.get_num_threads()
    if SETUP.device.type == "cpu":
        torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def record(threads, pytestconfig):
    """What the tests measure; written to ``results/perf/`` at the end when every test has added its part."""
    rec: dict[str, Any] = {"methods": {name: {} for name in METHODS}, "estimation": {},
                           "load_average_1min": round(os.getloadavg()[0], 2)}
    yield rec

    def say(line: str) -> None:  # past pytest's output capture, as capsys.disabled() does
        with pytestconfig.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            print(f"\n{line}")

    complete = (all("step_ms" in m and "optimizer_state_bytes" in m and "eval_windows_per_s" in m
                    for m in rec["methods"].values()) and set(rec["estimation"]) == set(ESTIMATION_CASES))
    if not complete:
        say("[perf] record not written: run every test of test_methods.py (a partial run writes nothing)")
        return
    out = finish(rec)
    if OUT.lower() == "none":
        return
    stem = out["device"]["slug"] + ("" if MODEL == ("large" if CUDA else "tiny") else f"-{MODEL}")
    paths = write_record(out, Path(OUT), stem)
    say(f"[perf] wrote {', '.join(str(p) for p in paths)}")


def record_peak() -> float | None:
    """The device's dense bf16 peak (TFLOP/s) when the run is in bf16 on a GPU the table knows."""
    return bf16_peak_tflops(torch.cuda.get_device_name()) if CUDA and SETUP.precision == "bf16" else None


def finish(rec: dict[str, Any]) -> dict[str, Any]:
    """The record with the device, the setting, the ratios to full and the projection."""
    setup, methods = SETUP, rec["methods"]
    full = methods["full"]
    for m in methods.values():
        m["step_ratio"] = round(m["step_ms"] / full["step_ms"], 4)
        m["step_cpu_ratio"] = round(m["step_cpu_ms"] / full["step_cpu_ms"], 4)
        m["state_ratio"] = round(m["optimizer_state_bytes"] / full["optimizer_state_bytes"], 4)
        m["model_memory_ratio"] = round(m["model_memory_mb"] / full["model_memory_mb"], 4)
        m["eval_ratio"] = round(m["eval_windows_per_s"] / full["eval_windows_per_s"], 4)
        if "peak_memory_gb" in m:
            m["peak_ratio"] = round(m["peak_memory_gb"] / full["peak_memory_gb"], 4)
        if "images_per_s_largest_batch" in m:  # FLOPs grow with the batch
            per_image = m["gflop_per_step"] / setup.batch
            m["tflops_largest_batch"] = round(per_image * m["images_per_s_largest_batch"] / 1e3, 3)
            peak = record_peak()
            if peak:
                m["bf16_peak_fraction_largest_batch"] = round(m["tflops_largest_batch"] / peak, 4)
    for e in rec["estimation"].values():
        e["ratio_to_full_step"] = round(1000 * e["s_per_image"] / full["step_ms"], 4)
    record = {"schema": SCHEMA, "device": _machine(),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
              "load_average_1min": rec["load_average_1min"], "load_average_1min_end": round(os.getloadavg()[0], 2),
              "setup": {"model": setup.model, "backbone": setup.backbone, "head": setup.manifest.head.name,
                        "head_config": setup.head_config, "manifest": setup.manifest.name, "crop": setup.crop,
                        "batch": setup.batch, "precision": setup.precision, "warmup_steps": setup.warmup,
                        "rounds": setup.rounds, "eval_image": list(setup.eval_size), "eval_crop": setup.crop,
                        "eval_stride": setup.eval_stride, "eval_batch": setup.manifest.execution.eval_batch},
              "methods": methods, "estimation": rec["estimation"], "notes": NOTES[setup.device.type]}
    if setup.protocol is not None:
        per = {}
        for name, m in methods.items():
            case = rec["estimation"].get(name)
            c = project_cell(setup.protocol, m["images_per_s"], m["eval_windows_per_s"],
                             case["s_per_image"] if case else None, name)
            per[name] = {k: round(v, 1) for k, v in c.items()}
        record["projection"] = {"protocol": setup.protocol.to_json(), "methods": per}
    return record


NOTES = {
    "cpu": ["step ms: median wall time of one training step (forward + loss, zero_grad, backward, after_backward, "
            "optimizer step) over the rounds, the methods interleaved; images/s = batch / step.",
            "params+grads+state MB: the bytes of every parameter, of the gradients a backward pass leaves and of the "
            "optimizer's state (SparseAdamW's indices included), the model's memory between steps. The CPU has no "
            "allocator statistics, so the peak is not measured; it is about this plus the saved activations "
            "(what autograd keeps from the forward for the backward, parameters excluded).",
            "FisherTune and ChildTune compute dense gradients for every block parameter (the mask applies in "
            "the optimizer), hence their gradient memory equals full fine-tuning's for the blocks.",
            "eval windows/s: slide_logits on one image of the manifest's BDD100K test size (scaled with the crop for "
            "the small model; setup.eval_image), all windows in one batch."],
    "cuda": ["step ms: median wall time of one training step (CUDA synchronised), the methods interleaved; "
             "TFLOP/s: FlopCounterMode's count of one forward + backward / step time; of bf16 peak: against the data "
             "sheet's dense bf16 peak of the device.",
             "peak GB: torch.cuda.max_memory_allocated over one training step with the method's model alone on the "
             "GPU, after warm-up steps (so with its optimizer state); largest batch: doubling from the protocol's "
             "batch until out of memory (a power of two times 4).",
             "params+grads+state MB: the bytes of parameters, gradients and optimizer state; saved activations: what "
             "autograd keeps for the backward in one forward at the protocol's batch (parameters excluded).",
             "FisherTune and ChildTune compute dense gradients for every block parameter (the mask applies in "
             "the optimizer), hence their gradient memory equals full fine-tuning's for the blocks.",
             "Estimation runs as the runner runs before_training: outside autocast, so in fp32 whatever the "
             "training precision."],
}


@pytest.fixture(scope="module")
def runs(record) -> dict[str, Run]:
    """Every method's cell, all resident, each after its warm-up steps."""
    out = {name: build_run(name, SETUP) for name in METHODS}
    images, labels = _batch(SETUP.batch, SETUP)
    for _ in range(SETUP.warmup):
        for run in out.values():
            train_step(run, images, labels, SETUP)
    yield out
    out.clear()
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ tests
def _saved_activation_bytes(run: Run, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward + loss (each storage once),
    the parameters' storages excluded."""
    params = {p.untyped_storage().data_ptr() for p in run.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.device.type != "meta":
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(SETUP.device, SETUP.precision):
            loss = run.model.loss(images, labels)
    del loss
    return sum(seen.values())


def _flops(run: Run, images: torch.Tensor, labels: torch.Tensor) -> int:
    """FLOPs of one forward + loss + backward (matrix products, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with autocast(SETUP.device, SETUP.precision):
            loss = run.model.loss(images, labels)
        loss.backward()
    run.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _largest_batch(run: Run) -> dict[str, Any]:
    """Doubling the batch until a step runs out of memory: the largest that fit, its images/s (median of
    3 steps) and the peak memory of those steps."""
    largest, batch = SETUP.batch, SETUP.batch
    while batch * 2 <= MAX_BATCH:
        batch *= 2
        failed = False
        try:
            images, labels = _batch(batch, SETUP)
            train_step(run, images, labels, SETUP)
            _sync(SETUP)
        except torch.cuda.OutOfMemoryError:
            failed = True
        images = labels = None
        run.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        if failed:
            break
        largest = batch
    images, labels = _batch(largest, SETUP)
    train_step(run, images, labels, SETUP)
    _sync(SETUP)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        _sync(SETUP)
        start = time.perf_counter()
        train_step(run, images, labels, SETUP)
        _sync(SETUP)
        times.append(time.perf_counter() - start)
    return {"largest_batch": largest, "images_per_s_largest_batch": round(largest / statistics.median(times), 3),
            "peak_memory_gb_largest_batch": round(torch.cuda.max_memory_allocated() / 2**30, 3)}


@pytest.mark.parametrize("name", METHODS)
def test_memory(name, record, capsys):
    if CUDA:
        gc.collect()
        torch.cuda.empty_cache()
    run = build_run(name, SETUP)
    images, labels = _batch(SETUP.batch, SETUP)
    for _ in range(2):
        train_step(run, images, labels, SETUP)
    model = run.model
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = state_bytes(run.optimizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = {
        "trainable_backbone_params": run.method.trainable_backbone_params(model),
        "head_params": sum(p.numel() for p in model.head.parameters()),
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_with_grad": trainable,
        "optimizer": type(run.optimizer).__name__,
        "param_mb": _mb(params), "grad_mb": _mb(grads), "optimizer_state_bytes": state,
        "optimizer_state_mb": _mb(state), "model_memory_mb": _mb(params + grads + state),
    }
    if CUDA:
        _sync(SETUP)
        torch.cuda.reset_peak_memory_stats()
        train_step(run, images, labels, SETUP)
        _sync(SETUP)
        info["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    info["saved_activations_mb"] = _mb(_saved_activation_bytes(run, images, labels))
    flops = _flops(run, images, labels)
    info["gflop_per_step"] = round(flops / 1e9, 3)
    if CUDA:
        info |= _largest_batch(run)
    record["methods"][name].update(info)
    del run, model
    with capsys.disabled():
        print(f"\n[{SETUP.model}/{name}] trainable backbone {info['trainable_backbone_params']:,}, params+grads+state "
              f"{info['model_memory_mb']:.1f} MB (state {info['optimizer_state_mb']:.2f} MB), saved activations "
              f"{info['saved_activations_mb']:.1f} MB, {info['gflop_per_step']} GFLOP per step"
              + (f", peak {info['peak_memory_gb']} GB, largest batch {info['largest_batch']}" if CUDA else ""))
    assert state > 0 and grads > 0


def test_train_step(benchmark, runs, record, capsys):
    names = list(runs)
    images, labels = _batch(SETUP.batch, SETUP)
    rounds = iter(range(10**9))

    def one_round() -> None:  # every method once; the first of the round moves on by one each round
        r = next(rounds) % len(names)
        for name in names[r:] + names[:r]:
            timed_step(runs[name], images, labels, SETUP)

    benchmark.pedantic(one_round, rounds=SETUP.rounds, iterations=1)
    full = runs["full"].times["step"]
    info: dict[str, Any] = {}
    for name, run in runs.items():
        step = statistics.median(run.times["step"])
        per_round = [s / f for s, f in zip(run.times["step"], full)]
        m = {"step_ms": round(1000 * step, 3), "step_cpu_ms": round(1000 * statistics.median(run.times["step_cpu"]), 3),
             "step_ratio_per_round_min_max": [round(min(per_round), 3), round(max(per_round), 3)],
             "images_per_s": round(SETUP.batch / step, 3)}
        flops = record["methods"][name].get("gflop_per_step")
        if flops is not None:
            m["tflops"] = round(flops / 1e3 / step, 3)
            peak = record_peak()
            if peak:
                m["bf16_peak_fraction"] = round(m["tflops"] / peak, 4)
        record["methods"][name].update(m)
        info[name] = m
    benchmark.extra_info.update({"model": SETUP.model, "load_average_1min": round(os.getloadavg()[0], 2), **info})
    with capsys.disabled():
        print(f"\n[{SETUP.model}] training step, median of {SETUP.rounds} rotated rounds (ms; ratio to full):")
        for name, m in info.items():
            print(f"  {name:12s} {m['step_ms']:9.2f}  {m['step_ms'] / info['full']['step_ms']:.3f}  "
                  f"(per round {m['step_ratio_per_round_min_max']})")


@pytest.mark.parametrize("case", list(ESTIMATION_CASES))
def test_fisher_estimation(case, benchmark, runs, record, capsys):
    method_name, config = ESTIMATION_CASES[case]
    run = runs[method_name]
    images, labels = _batch(SETUP.batch, SETUP)
    before = len(run.times["step"])
    for _ in range(5):  # the reference: this model's step, now
        timed_step(run, images, labels, SETUP)
    step = statistics.median(run.times["step"][before:])
    del run.times["step"][before:], run.times["step_cpu"][before:]
    method = build_method(method_name, config)
    ctx = _context(SETUP)
    method.apply(run.model, ctx)  # the same parameter setup as the run's own method
    run.model.head.requires_grad_(True)

    seconds = []

    def estimate() -> None:
        _sync(SETUP)
        start = time.perf_counter()
        method.before_training(run.model, ctx)
        _sync(SETUP)
        seconds.append(time.perf_counter() - start)

    benchmark.pedantic(estimate, rounds=1, iterations=1)
    run.model.train()
    n, seconds = config["images"], seconds[0]
    shown: dict[str, Any] = {"images": n}
    if method_name == "fishertune":
        shown = {"estimator": config.get("estimator", "variational"), "images": n}
        if shown["estimator"] == "variational":
            steps = config.get("variational", {}).get("steps", FisherTuneConfig().variational.steps)
            shown["variational steps"] = steps
    e = {"method": method_name, "config": shown, "images": n, "seconds": round(seconds, 3),
         "s_per_image": round(seconds / n, 5), "method_step_ms": round(1000 * step, 3),
         "ratio_to_method_step": round(seconds / n / step, 4)}
    record["estimation"][case] = e
    benchmark.extra_info.update(e)
    with capsys.disabled():
        print(f"\n[{SETUP.model}/{case}] {seconds:.2f} s for {n} images: {seconds / n * 1000:.1f} ms per image, "
              f"{e['ratio_to_method_step']:.2f} training steps of {method_name} ({e['method_step_ms']:.1f} ms)")
    assert method.sparse_indices(run.model)


def test_eval_windows(benchmark, runs, record, capsys):
    names = list(runs)
    w, h = SETUP.eval_size
    crop, stride = SETUP.crop, SETUP.eval_stride
    windows = len(window_origins(h, crop, stride)) * len(window_origins(w, crop, stride))
    image = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1)).to(SETUP.device)
    batch = SETUP.manifest.execution.eval_batch
    times: dict[str, list[float]] = {name: [] for name in names}
    for run in runs.values():
        run.model.eval()
    rounds = iter(range(10**9))

    def slide(name: str) -> None:
        with autocast(SETUP.device, SETUP.precision):
            slide_logits(runs[name].model, image, NUM_CLASSES, crop, stride, batch)

    for name in names:  # warm-up
        slide(name)

    def one_round() -> None:
        r = next(rounds) % len(names)
        for name in names[r:] + names[:r]:
            _sync(SETUP)
            start = time.perf_counter()
            slide(name)
            _sync(SETUP)
            times[name].append(time.perf_counter() - start)

    try:
        benchmark.pedantic(one_round, rounds=SETUP.eval_rounds, iterations=1)
    finally:
        for run in runs.values():
            run.model.train()
    info = {}
    for name in names:
        rate = windows / statistics.median(times[name])
        record["methods"][name]["eval_windows_per_s"] = round(rate, 3)
        info[name] = round(rate, 3)
    benchmark.extra_info.update({"image": [w, h], "windows": windows, "eval_batch": batch, "windows_per_s": info})
    with capsys.disabled():
        print(f"\n[{SETUP.model}] evaluation, {w}x{h} image, {windows} windows of {crop} (stride {stride}), "
              f"batch {batch}: windows/s " + ", ".join(f"{n} {r:.1f}" for n, r in info.items()))
