"""Run the cells of a manifest: build, apply the method, train, evaluate, store one JSON per cell.

The runner knows nothing of any model's insides: it goes through the registries (backbones, heads,
methods) and the engine. Cells whose result exists are skipped, so rerunning a sweep finishes it.
"""

from __future__ import annotations

import fnmatch
import resource
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch

from fishertune.backbones import BACKBONES, build_backbone
from fishertune.backbones.weights import resolve_weights
from fishertune.data import CLASSES, NUM_CLASSES, TrainTransform
from fishertune.engine.evaluate import evaluate
from fishertune.engine.train import source_batches, train
from fishertune.errors import UserError
from fishertune.heads import build_head
from fishertune.progress import bar
from fishertune.runner.data import cache_dir, open_datasets
from fishertune.runner.environment import device_name, git_state, package_versions, resolve_device
from fishertune.runner.manifest import Cell, LoadedManifest
from fishertune.runner.store import ResultStore
from fishertune.segmentor import Segmentor
from fishertune.tuning import MethodContext, build_method, parameter_counts

RESULT_SCHEMA = 1


def select_cells(cells: list[Cell], only: list[str] | None) -> list[Cell]:
    """Cells whose id matches one of the ``only`` glob patterns (all when none given)."""
    if not only:
        return cells
    chosen = [c for c in cells if any(fnmatch.fnmatch(c.id, p) or fnmatch.fnmatch(c.row, p) for p in only)]
    if not chosen:
        raise UserError(f"--only {' '.join(only)} matches no cell; cells are: {', '.join(c.id for c in cells)}")
    return chosen


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _per_class(iou) -> dict[str, float | None]:
    return {c: (None if v != v else 100.0 * float(v)) for c, v in zip(CLASSES, iou)}


def _target_record(res) -> dict[str, Any]:
    """One target's numbers in percent. With groups (ACDC's conditions) ``miou`` is the mean of the
    groups' mIoU and ``per_class_iou`` the per-class mean over the groups (classes absent from a group
    left out of its mean); ``pooled_miou`` and ``confusion`` are over all images at once."""
    record = {"miou": 100.0 * res.miou, "per_class_iou": _per_class(res.iou), "confusion": res.confusion.tolist(),
              "num_images": res.num_images}
    if res.groups:
        stacked = np.array([g.iou for g in res.groups.values()])
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from every group stays NaN
            record["per_class_iou"] = _per_class(np.nanmean(stacked, axis=0))
        record["pooled_miou"] = 100.0 * res.pooled_miou
    return record


def model_identity(lm: LoadedManifest, cell: Cell, source) -> dict[str, Any]:
    """What a method's source-data computations depend on (cache keys): the model as built before
    training (backbone, weights file, head and the seed initialising it), the source data and its
    augmentation, the batch size. Weights files are identified by path, size and modification time."""
    m = lm.manifest
    weights = None
    spec = BACKBONES.get(cell.backbone)
    if m.pretrained and spec.weights:
        path = resolve_weights(spec.weights, m.weights.get(cell.backbone), cell.backbone)
        st = path.stat()
        weights = {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    keep = ("backbone", "pretrained", "head", "source", "seed", "data")
    train = {k: v for k, v in cell.config["train"].items() if k not in ("iterations", "lr", "weight_decay",
                                                                          "poly_power", "warmup_iterations")}
    return {**{k: cell.config[k] for k in keep}, "train": train, "weights": weights,
            "source_data": repr(source), "source_images": len(source)}


def prepare_cell(lm: LoadedManifest, cell: Cell, source, device: torch.device):
    """Build the cell's segmentor and apply its method: ``(segmentor, method, ctx, transform)``, ready for
    ``method.before_training(segmentor, ctx)``. The head is built right after the backbone from the
    manifest's seed, so a cell's model before training depends on its config alone."""
    m = lm.manifest
    backbone = build_backbone(cell.backbone, weights=m.weights.get(cell.backbone), pretrained=m.pretrained,
                              seed=m.seed, where=f"{lm.path}: backbones", img_size=m.train.crop_size)
    torch.manual_seed(m.seed)
    head = build_head(m.head.name, backbone.embed_dim, NUM_CLASSES, where=f"{lm.path}: head", **m.head.config)
    segmentor = Segmentor(backbone, head).to(device)
    method = build_method(cell.method, cell.method_config, f"{lm.path}: methods")
    transform = TrainTransform(crop_size=m.train.crop_size, short_edge_range=tuple(m.train.short_edge_range),
                               max_long_edge=m.train.max_long_edge, cat_max_ratio=m.train.cat_max_ratio,
                               flip_prob=m.train.flip_prob, photometric=m.train.photometric)
    ctx = MethodContext(device=device, seed=m.seed, source_batches=lambda n: source_batches(
        source, transform, m.seed + 1, m.train.batch_size, m.execution.num_workers, 0, n),
        source_images=len(source), cache_dir=cache_dir(), identity=model_identity(lm, cell, source))
    method.apply(segmentor, ctx)
    segmentor.head.requires_grad_(True)
    return segmentor, method, ctx, transform


def run_cell(lm: LoadedManifest, cell: Cell, source, targets: dict, device: torch.device) -> dict[str, Any]:
    """Train and evaluate one cell; return its result record (not yet written)."""
    m = lm.manifest
    ex = m.execution
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    segmentor, method, ctx, transform = prepare_cell(lm, cell, source, device)
    params = parameter_counts(segmentor, method)
    method.before_training(segmentor, ctx)
    stats = train(segmentor, method, source, transform, iterations=m.train.iterations, batch_size=m.train.batch_size,
                  lr=m.train.lr, weight_decay=m.train.weight_decay, poly_power=m.train.poly_power,
                  warmup=m.train.warmup_iterations, seed=m.seed, device=device, num_workers=ex.num_workers,
                  log_every=ex.log_every, desc=f"train {cell.backbone}/{cell.row}")
    per_target = {}
    for name, dataset in targets.items():
        res = evaluate(segmentor, dataset, tuple(m.eval.test_sizes[name]), m.eval.crop_size, m.eval.stride,
                       ex.eval_batch, device, desc=f"eval {name}")
        per_target[name] = _target_record(res) | {
            "test_size": list(m.eval.test_sizes[name]), "crop_size": m.eval.crop_size, "stride": m.eval.stride}
        if res.groups:
            per_target[name]["groups"] = {g: _target_record(r) for g, r in res.groups.items()}
    aggregate = sum(t["miou"] for t in per_target.values()) / len(per_target)
    return {
        "schema": RESULT_SCHEMA,
        "status": "done",
        "cell_id": cell.id,
        "manifest": {"path": str(lm.path), "name": m.name, "version": m.version, "table": m.table,
                     "data_kind": m.data.kind, "data_subset": m.data.subset},
        "backbone": cell.backbone,
        "method": cell.method,
        "row": cell.row,
        "config": cell.config,
        "targets": per_target,
        "aggregate": {"name": m.aggregate, "miou": aggregate},
        "params": params,
        "train": {"seconds": stats.seconds, "losses": stats.losses, "source_images": len(source),
                  "source_subset": m.data.subset},
        "wall_time_s": time.perf_counter() - started,
        "peak_memory_mb": _peak_memory_mb(device),
        "device": device_name(device),
        "seed": m.seed,
        "git": git_state(),
        "versions": package_versions(),
    }


def _check_weights(lm: LoadedManifest, cells: list[Cell]) -> None:
    """Every weights file the cells need is present (a missing one is a one-line error naming its path)."""
    m = lm.manifest
    if m.pretrained:
        for name in dict.fromkeys(c.backbone for c in cells):
            spec = BACKBONES.get(name)
            if spec.weights:
                resolve_weights(spec.weights, m.weights.get(name), name)


def estimate_manifest(lm: LoadedManifest, only: list[str] | None = None, device: str | None = None,
                      progress: bool = True) -> list[tuple[Cell, dict]]:
    """For every FisherTune cell: estimate (or load) its Fisher, select its mask and plot where it lies,
    without training; returns ``(cell, paths)`` with the files read or written (``fishertune fisher``)."""
    m = lm.manifest
    cells = [c for c in select_cells(lm.cells(), only) if c.method == "fishertune"]
    if not cells:
        raise UserError(f"{lm.path}: no fishertune cells to estimate (methods: "
                        f"{', '.join(e.row for e in m.method_entries())}); add fishertune rows or change --only")
    dev = resolve_device(device or m.execution.device)
    _check_weights(lm, cells)
    source, _ = open_datasets(m, progress)
    out = []
    for cell in bar(cells, desc=f"fisher {lm.results_name}", unit="cell", leave=True):
        segmentor, method, ctx, _ = prepare_cell(lm, cell, source, dev)
        method.before_training(segmentor, ctx)
        out.append((cell, dict(method.paths)))
    return out


def run_manifest(lm: LoadedManifest, results: str, only: list[str] | None = None, device: str | None = None,
                 progress: bool = True) -> list[tuple[Cell, str]]:
    """Run every pending cell; returns ``(cell, "done" | "skipped")`` per selected cell."""
    m = lm.manifest
    cells = select_cells(lm.cells(), only)
    store = ResultStore(results, lm.results_name)
    store.check_writable()
    dev = resolve_device(device or m.execution.device)
    pending = [c for c in cells if not store.done(c.id)]
    outcome = [(c, "skipped") for c in cells if store.done(c.id)]
    if not pending:
        return outcome
    _check_weights(lm, pending)  # pre-flight, before any training
    source, targets = open_datasets(m, progress)
    for cell in bar(pending, desc=lm.results_name, unit="cell", leave=True):
        result = run_cell(lm, cell, source, targets, dev)
        store.write(cell.id, result)
        outcome.append((cell, "done"))
    return outcome
