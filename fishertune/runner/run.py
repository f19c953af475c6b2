"""Run the cells of a manifest: build, apply the method, train, evaluate, store one JSON per cell.

The runner knows nothing of any model's insides: it goes through the registries (backbones, heads,
methods) and the engine. Cells whose result exists are skipped, so rerunning a sweep finishes it.
"""

from __future__ import annotations

import fnmatch
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fishertune.data import CLASSES, TrainTransform
from fishertune.engine.evaluate import evaluate
from fishertune.engine.checkpoint import Checkpoint
from fishertune.engine.train import NonFiniteLoss, source_batches, train, world
from fishertune.errors import UserError
from fishertune.precision import compute_dtype
from fishertune.progress import bar, enabled
from fishertune.runner.data import cache_dir, generated, open_datasets
from fishertune.runner.environment import (agree, barrier, cpu_threads, device_name, git_state, init_distributed,
                                           package_versions, resolve_device)
from fishertune.runner.lock import CellLock
from fishertune.runner.manifest import Cell, LoadedManifest
from fishertune.runner.model import (MODEL_FORMAT, MODEL_VERSION, build_segmentor, cached_sha256, file_record,
                                     model_dir, pretrained_file, pretrained_record, save_model)
from fishertune.runner.store import ResultStore, atomic_write
from fishertune.tuning import MethodContext, parameter_counts

RESULT_SCHEMA = 1
#: evaluation images per target whose predicted train-id map is saved beside the result (qualitative plot)
SAVED_PREDICTIONS = 3


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


def save_predictions(result_path: Path, target: str, dataset, kept: list[tuple[int, np.ndarray]]) -> list[dict]:
    """Write each kept prediction as a lossless 8-bit PNG of train ids, atomically, in
    ``<cell id>.pred/<target>-<index>.png`` beside the result JSON ``result_path``; return the records
    of the result's ``predictions`` entry (image and label as read, the reader that reads them, and the
    PNG's path relative to the result's directory)."""
    folder = ResultStore.predictions_name(result_path.stem)
    records = []
    for index, pred in kept:
        rel = f"{folder}/{target}-{index}.png"
        atomic_write(result_path.parent / rel, lambda tmp, p=pred: Image.fromarray(p.astype(np.uint8)).save(tmp, "PNG"))
        image, label = dataset.pairs[index]
        records.append({"image": str(image), "label": str(label), "prediction": rel, "index": index,
                        "dataset": dataset.name, "root": str(dataset.root), "split": dataset.split})
    return records


def model_identity(lm: LoadedManifest, cell: Cell, source) -> dict[str, Any]:
    """What a method's source-data computations depend on (cache keys): the model as built before
    training (backbone, weights file, head and the seed initialising it), the source data and its
    augmentation, the batch size. Weights files are identified by path, size and modification time."""
    m = lm.manifest
    weights = None
    path = pretrained_file(cell.config, m.weights.get(cell.backbone))
    if path is not None:
        st = path.stat()
        weights = {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    keep = ("backbone", "pretrained", "head", "source", "seed", "data")
    train = {k: v for k, v in cell.config["train"].items() if k not in ("iterations", "lr", "weight_decay",
                                                                          "poly_power", "warmup_iterations")}
    return {**{k: cell.config[k] for k in keep}, "train": train, "weights": weights,
            "source_data": repr(source), "source_images": len(source)}


def prepare_cell(lm: LoadedManifest, cell: Cell, source, device: torch.device, digest: bool = False):
    """Build the cell's segmentor and apply its method (:func:`~fishertune.runner.model.build_segmentor`):
    ``(segmentor, method, ctx, transform, built)``, ready for ``method.before_training(segmentor, ctx)``;
    ``built`` is the digest of the backbone as built when ``digest`` is asked for (a kept model records
    it), else None."""
    m = lm.manifest
    transform = TrainTransform(crop_size=m.train.crop_size, short_edge_range=tuple(m.train.short_edge_range),
                               max_long_edge=m.train.max_long_edge, cat_max_ratio=m.train.cat_max_ratio,
                               flip_prob=m.train.flip_prob, photometric=m.train.photometric)
    ctx = MethodContext(device=device, seed=cell.seed, source_batches=lambda n: source_batches(
        source, transform, cell.seed + 1, m.train.batch_size, m.execution.num_workers, 0, n),
        source_images=len(source), cache_dir=cache_dir(), identity=model_identity(lm, cell, source))
    segmentor, method, built = build_segmentor(cell.config, m.weights.get(cell.backbone), device, ctx,
                                               where=str(lm.path), digest=digest)
    return segmentor, method, ctx, transform, built


def run_cell(lm: LoadedManifest, cell: Cell, source, targets: dict, device: torch.device,
             result_path: Path | None = None, checkpoint: Checkpoint | None = None) -> dict[str, Any] | None:
    """Train and evaluate one cell; return its result record (not yet written). With ``result_path`` (where
    the record will be written), the predictions of the first :data:`SAVED_PREDICTIONS` images of each
    target are saved beside it (:func:`save_predictions`), and, unless ``execution.keep_model`` is false,
    the trained model (:func:`keep_model`), before the record is returned. With
    ``checkpoint``, training saves its state there and continues from it when it exists. In a
    distributed run every process trains and process 0 alone evaluates; the others return None.
    The cell runs in its precision's compute dtype (:func:`fishertune.precision.compute_dtype`: float64
    for ``fp64``)."""
    with compute_dtype(lm.manifest.train.precision):
        return _run_cell(lm, cell, source, targets, device, result_path, checkpoint)


def _run_cell(lm: LoadedManifest, cell: Cell, source, targets: dict, device: torch.device,
              result_path: Path | None, checkpoint: Checkpoint | None) -> dict[str, Any] | None:
    m = lm.manifest
    ex = m.execution
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    keep = bool(result_path) and m.execution.keep_model
    segmentor, method, ctx, transform, built = prepare_cell(lm, cell, source, device, digest=keep)
    params = parameter_counts(segmentor, method)
    # a Fisher estimate computed or read from the cache leaves torch's stream in different states; training
    # reseeds it (engine.train), so a cell's numbers do not depend on whether an estimate was cached
    method.before_training(segmentor, ctx)
    stats = train(segmentor, method, source, transform, iterations=m.train.iterations, batch_size=m.train.batch_size,
                  lr=m.train.lr, weight_decay=m.train.weight_decay, poly_power=m.train.poly_power,
                  warmup=m.train.warmup_iterations, seed=cell.seed, device=device, num_workers=ex.num_workers,
                  log_every=ex.log_every, desc=f"train {cell.backbone}/{cell.row}", precision=m.train.precision,
                  compile=ex.compile, checkpoint=checkpoint, backbone_lr_mult=m.train.backbone_lr_mult)
    if world()[0] != 0:
        return None
    per_target, predictions = {}, {}
    for name, dataset in targets.items():
        res = evaluate(segmentor, dataset, tuple(m.eval.test_sizes[name]), m.eval.crop_size, m.eval.stride,
                       ex.eval_batch, device, desc=f"eval {name}", keep=SAVED_PREDICTIONS if result_path else 0,
                       precision=m.train.precision)
        if res.predictions:
            predictions[name] = save_predictions(Path(result_path), name, dataset, res.predictions)
        per_target[name] = _target_record(res) | {
            "test_size": list(m.eval.test_sizes[name]), "crop_size": m.eval.crop_size, "stride": m.eval.stride}
        if res.groups:
            per_target[name]["groups"] = {g: _target_record(r) for g, r in res.groups.items()}
    aggregate = sum(t["miou"] for t in per_target.values()) / len(per_target)
    record = {
        **_identity(lm, cell, "done"),
        "targets": per_target,
        "predictions": predictions,
        "aggregate": {"name": m.aggregate, "miou": aggregate},
        "params": params,
        "weights_file": _weights_file(lm, cell),
        "train": {"seconds": stats.seconds, "losses": stats.losses, "source_images": len(source),
                  "source_subset": m.data.subset, "resumed_from": stats.resumed_from},
        **_where(device, started, world()[1]),
    }
    record["model"] = keep_model(lm, cell, Path(result_path), segmentor, method, built, record) if keep else None
    return record


def keep_model(lm: LoadedManifest, cell: Cell, result_path: Path, segmentor, method, built: str,
               record: dict[str, Any]) -> dict[str, Any]:
    """Write the cell's trained model beside its result (:mod:`fishertune.runner.model`) with a card made
    of the result ``record`` (config, metrics, provenance), where its frozen weights come from and how
    it evaluated; returns the result's ``model`` entry (the folder relative to the result's, and the
    kept file's bytes, sha256 and element counts)."""
    m = lm.manifest
    folder = model_dir(result_path)
    path = pretrained_file(cell.config, m.weights.get(cell.backbone))
    card = {
        "format": MODEL_FORMAT, "version": MODEL_VERSION,
        **{k: record[k] for k in ("cell_id", "manifest", "backbone", "method", "row", "config", "seed", "params",
                                  "aggregate", "git", "versions", "device", "processes", "wall_time_s",
                                  "peak_memory_mb")},
        "pretrained": pretrained_record(cell.config, path, built),
        "metrics": {t: {"miou": rec["miou"], "per_class_iou": rec["per_class_iou"]}
                    for t, rec in record["targets"].items()},
        "inference": {"crop_size": m.eval.crop_size, "stride": m.eval.stride, "precision": m.train.precision,
                      "test_sizes": {t: list(m.eval.test_sizes[t]) for t in m.targets},
                      "eval_batch": m.execution.eval_batch, "threads": m.execution.threads},
    }
    return {"path": folder.name, **save_model(folder, segmentor, method, card)}


def _weights_file(lm: LoadedManifest, cell: Cell) -> dict[str, Any] | None:
    """The pretrained file the cell is built from (:func:`file_record`), None for a random initialisation."""
    path = pretrained_file(cell.config, lm.manifest.weights.get(cell.backbone))
    return file_record(path) if path is not None else None


def _check_reuse(lm: LoadedManifest, store: ResultStore, cells: list[Cell]) -> None:
    """A finished cell is reused only with the pretrained file it was trained from: a cell's id holds its
    config, not the file a manifest's ``weights`` (or ``$FISHERTUNE_WEIGHTS``) points to, so another
    checkpoint for the same backbone would otherwise skip every finished cell and mix two models' numbers
    in one table. Compared by size, then sha256 (cached); results written before the record existed, and
    cells whose file is absent now, are not checked. Raises one :class:`UserError` naming the first cell
    that differs."""
    for cell in cells:
        result = store.read(cell.id)
        recorded = (result or {}).get("weights_file")
        if not recorded:
            continue
        try:
            path = pretrained_file(cell.config, lm.manifest.weights.get(cell.backbone))
        except UserError:  # no file here now: nothing trains, so a finished sweep is still read as it is
            continue
        if path is None:
            continue
        if path.stat().st_size == recorded["bytes"] and cached_sha256(path) == recorded["sha256"]:
            continue
        raise UserError(f"{store.path(cell.id)}: cell {cell.id} finished with the weights {recorded['path']} "
                        f"(sha256 {recorded['sha256'][:12]}), but {cell.backbone}'s weights are now {path} "
                        f"(sha256 {cached_sha256(path)[:12]}); run into another --results folder, or delete that "
                        "cell's result to train it again from the new file")


def _identity(lm: LoadedManifest, cell: Cell, status: str) -> dict[str, Any]:
    """The part of a result that says which cell of which manifest it is."""
    m = lm.manifest
    return {
        "schema": RESULT_SCHEMA,
        "status": status,
        "cell_id": cell.id,
        "manifest": {"path": str(lm.path), "name": m.name, "version": m.version, "table": m.table,
                     "data_kind": m.data.kind, "data_subset": m.data.subset, "data_generated": generated(m),
                     "data_counts": m.data.counts, "tiny": lm.tiny},
        "backbone": cell.backbone,
        "method": cell.method,
        "row": cell.row,
        "config": cell.config,
        "seed": cell.seed,
    }


def _where(device: torch.device, started: float, processes: int) -> dict[str, Any]:
    """Where and how long a cell ran, and with which code."""
    return {"wall_time_s": time.perf_counter() - started, "peak_memory_mb": _peak_memory_mb(device),
            "device": device_name(device), "processes": processes, "git": git_state(), "versions": package_versions()}


def failed_record(lm: LoadedManifest, cell: Cell, error: NonFiniteLoss, device: torch.device,
                  started: float) -> dict[str, Any]:
    """The result of a cell that stopped for good: why, at which iteration, the last finite loss."""
    return {**_identity(lm, cell, "failed"),
            "failure": {"reason": str(error), "iteration": error.iteration,
                        "last_finite": list(error.last_finite) if error.last_finite else None},
            **_where(device, started, world()[1])}


def _check_weights(lm: LoadedManifest, cells: list[Cell]) -> None:
    """Every weights file the cells need is present and fits its backbone (read without running code,
    matched key by key against the architecture built on the meta device): the first problem is a
    one-line error naming the file, before any data is read or any cell runs."""
    from fishertune.runner.preflight import weights_problems

    problems = weights_problems(lm, cells)
    if problems:
        more = f" (and {len(problems) - 1} more: `fishertune reproduce` lists them all)" if len(problems) > 1 else ""
        raise UserError(problems[0].removeprefix("weights: ") + more)


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
    with cpu_threads(m.execution.threads):
        for cell in bar(cells, desc=f"fisher {lm.results_name}", unit="cell", leave=True):
            segmentor, method, ctx, _, _ = prepare_cell(lm, cell, source, dev)
            method.before_training(segmentor, ctx)
            out.append((cell, dict(method.paths)))
    return out


def _run_one(lm: LoadedManifest, results: str, cell_id: str, device: str | None, retry_failed: bool) -> str:
    """One cell in a worker process of :func:`_run_parallel` (its status)."""
    import glob

    [(_, status)] = run_manifest(lm, results, only=[glob.escape(cell_id)], device=device, progress=False,
                                 retry_failed=retry_failed, jobs=1)
    return status


def _run_parallel(lm: LoadedManifest, results: str, cells: list[Cell], device: str | None, retry_failed: bool,
                  jobs: int, progress: bool) -> list[tuple[Cell, str]]:
    """Run ``cells`` in ``jobs`` worker processes (spawned, so each starts with a fresh torch), each cell
    exactly as a sequential run would (its lock, checkpoint and thread count); a progress bar of cells."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    statuses: dict[str, str] = {}
    with ProcessPoolExecutor(min(jobs, len(cells)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_one, lm, results, c.id, device, retry_failed): c for c in cells}
        try:
            for future in bar(as_completed(futures), total=len(futures), desc=f"{lm.results_name} ({jobs} at once)",
                              unit="cell", leave=True, disable=not (progress and enabled())):
                statuses[futures[future].id] = future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return [(c, statuses[c.id]) for c in cells]


def run_manifest(lm: LoadedManifest, results: str, only: list[str] | None = None, device: str | None = None,
                 progress: bool = True, retry_failed: bool = False, jobs: int | None = None) -> list[tuple[Cell, str]]:
    """Run every pending cell; returns ``(cell, status)`` per selected cell: ``done``, ``failed`` (a
    non-finite loss; its result says why, and the sweep goes on), ``skipped`` (a result exists; failed
    cells are retried only with ``retry_failed``) or ``busy`` (another runner holds its lock).

    Each cell runs under its lock (:mod:`fishertune.runner.lock`) and checkpoints every
    ``execution.checkpoint_every`` iterations under ``<results>/<name>/checkpoints/``; rerunning after a
    kill continues from there. Under ``torchrun`` the processes run each cell together (DDP). With
    ``jobs`` (default ``execution.jobs``) above 1, that many cells run at once, each in a process of its
    own (:func:`_run_parallel`); a cell's numbers are the same either way."""
    m = lm.manifest
    jobs = jobs or m.execution.jobs
    cells = select_cells(lm.cells(), only)
    store = ResultStore(results, lm.results_name)
    store.check_writable()
    dev, rank, world_size = init_distributed(resolve_device(device or m.execution.device))

    def finished(cell: Cell) -> bool:
        status = store.status(cell.id)
        return status == "done" or (status == "failed" and not retry_failed)

    pending = [c for c in cells if not finished(c)]
    outcome = [(c, "skipped") for c in cells if finished(c)]
    _check_reuse(lm, store, [c for c, _ in outcome if store.status(c.id) == "done"])
    if not pending:
        return outcome
    _check_weights(lm, pending)  # pre-flight, before any training
    source, targets = open_datasets(m, progress)  # generates the miniature once, before any worker starts
    if jobs > 1 and world_size == 1 and len(pending) > 1:
        return outcome + _run_parallel(lm, results, pending, device, retry_failed, jobs, progress)
    with cpu_threads(m.execution.threads):
        for cell in bar(pending, desc=lm.results_name, unit="cell", leave=True):
            lock = CellLock(store.lock_path(cell.id))
            # process 0 decides (its lock, the result written meanwhile by another runner) for all processes
            decision = "run"
            if rank == 0:
                decision = "busy" if not lock.acquire() else ("skipped" if finished(cell) else "run")
            decision = agree(decision)
            try:
                if decision != "run":
                    outcome.append((cell, decision))
                    continue
                checkpoint = Checkpoint(store.checkpoint_path(cell.id), m.execution.checkpoint_every)
                started = time.perf_counter()
                try:
                    try:
                        result = run_cell(lm, cell, source, targets, dev, result_path=store.path(cell.id),
                                          checkpoint=checkpoint)
                    except NonFiniteLoss as e:
                        result = failed_record(lm, cell, e, dev, started)
                    if rank == 0:
                        store.write(cell.id, result)
                except BaseException:  # no result written: none of its predictions stay either
                    if rank == 0:
                        shutil.rmtree(store.predictions_dir(cell.id), ignore_errors=True)
                    raise
                if rank == 0:
                    checkpoint.remove()
                outcome.append((cell, result["status"] if result else "done"))
            finally:
                if rank == 0:
                    lock.release()
                barrier()
    return outcome
