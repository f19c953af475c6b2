"""Where a manifest's cells run: in this process (``local``, the default) or one submitit job per cell.

``slurm`` submits the pending cells as one Slurm job array through submitit; ``submitit-local`` runs the
same jobs as subprocesses of this machine through submitit's LocalExecutor (tests, a workstation). Each
job gets the manifest's path, the command line's overrides, the tiny flag and its cell id (never a
pickled model), reloads the manifest and runs exactly its cell through :func:`run_manifest`, so its
result JSON, and the skipping of finished cells, are those of a local run. Nothing here schedules or
retries: Slurm queues, limits (``array_parallelism``) and, when asked (``--requeue``), requeues.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from fishertune.errors import UserError
from fishertune.runner.manifest import Cell, LoadedManifest, SlurmConfig, load_manifest
from fishertune.runner.store import ResultStore

EXECUTORS = ("local", "slurm", "submitit-local")
#: the command-line option that overrides each field of ``execution.slurm`` (see :func:`slurm_config`)
SLURM_OPTIONS = {"partition": "--slurm-partition", "account": "--slurm-account", "timeout_min": "--slurm-time",
                 "gpus_per_node": "--slurm-gpus", "cpus_per_task": "--slurm-cpus", "mem_gb": "--slurm-mem",
                 "array_parallelism": "--slurm-array-parallelism"}


@dataclass(frozen=True)
class CellJob:
    """What one job needs to run its cell: plain values only (pickled into the job by submitit)."""

    manifest: str  # as given on the command line, read relative to ``cwd``
    overrides: dict[str, Any]
    tiny: bool
    results: str
    cell_id: str
    device: str | None
    cwd: str  # the submitting command's working directory


def run_cell_job(job: CellJob) -> str:
    """The body of each job: reload the manifest and run exactly ``job.cell_id`` as ``fishertune run``
    would (same code path, so the same result JSON); returns ``"done"``, or ``"skipped"`` when its result
    already existed."""
    from fishertune.runner.run import run_manifest

    os.chdir(job.cwd)  # relative manifest, results and data paths mean what they meant at submission
    lm = load_manifest(job.manifest, job.overrides, tiny=job.tiny)
    outcome = run_manifest(lm, job.results, only=[glob.escape(job.cell_id)], device=job.device, progress=False)
    statuses = [status for cell, status in outcome if cell.id == job.cell_id]
    if len(statuses) != 1 or len(outcome) != 1:
        raise UserError(f"{job.manifest}: cell {job.cell_id} is not (only) in the manifest any more; was it "
                        "edited after submission?")
    return statuses[0]


def slurm_config(lm: LoadedManifest, options: dict[str, Any] | None = None) -> SlurmConfig:
    """The manifest's ``execution.slurm`` with the command line's ``options`` (field -> value, None: not
    given) laid over it; a bad value is a one-line :class:`UserError` naming its option."""
    given = {k: v for k, v in (options or {}).items() if v is not None}
    merged = lm.manifest.execution.slurm.model_dump() | given
    try:
        return SlurmConfig(**merged)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        where = SLURM_OPTIONS[name] if name in given else f"{lm.path}: execution.slurm.{name}"
        raise UserError(f"{where}: {err['msg']} (got {err.get('input')!r})") from None


def _mem(gb: float) -> str:
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"


def make_executor(kind: str, folder: Path, cfg: SlurmConfig, name: str):
    """A submitit executor writing its pickles and logs under ``folder`` (with ``%j``), not yet used.

    ``slurm``: sbatch parameters from ``cfg``; ``submitit-local``: the job's time limit and GPUs from
    ``cfg`` (submitit's local default limit is 2 minutes)."""
    import submitit

    if kind == "slurm":
        try:
            ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
        except RuntimeError:
            raise UserError("--executor slurm: no `srun` on PATH; submit from a Slurm login node, or use "
                            "--executor submitit-local to run the jobs on this machine") from None
        params = {"job_name": name, "time": cfg.timeout_min, "cpus_per_task": cfg.cpus_per_task,
                  "partition": cfg.partition, "account": cfg.account, "qos": cfg.qos, "constraint": cfg.constraint,
                  "gpus_per_node": cfg.gpus_per_node or None, "mem": _mem(cfg.mem_gb) if cfg.mem_gb else None,
                  "array_parallelism": cfg.array_parallelism, "setup": list(cfg.setup) or None,
                  "additional_parameters": dict(cfg.additional_parameters) or None}
    elif kind == "submitit-local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=0)
        params = {"timeout_min": cfg.timeout_min, "gpus_per_node": cfg.gpus_per_node, "setup": list(cfg.setup) or None}
    else:
        raise ValueError(f"not a submitit executor: {kind!r}")
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


@dataclass
class Submission:
    """The jobs of one submission: ``(cell, job)`` per pending cell, and the cells already finished."""

    kind: str
    folder: Path
    jobs: list[tuple[Cell, Any]] = field(default_factory=list)
    skipped: list[Cell] = field(default_factory=list)

    @property
    def array_id(self) -> str | None:
        """Slurm's id of the job array (of the single job when one cell was pending); None for local jobs."""
        if self.kind != "slurm" or not self.jobs:
            return None
        return str(self.jobs[0][1].job_id).split("_")[0]


def submit(lm: LoadedManifest, kind: str, results: str, *, only: list[str] | None = None, device: str | None = None,
           overrides: dict[str, Any] | None = None, options: dict[str, Any] | None = None) -> Submission:
    """Submit one job per pending cell of ``lm`` (selected by ``only``) as one array; finished cells are
    skipped. The resources are checked and the weights pre-flighted here, before any submission."""
    from fishertune.runner.run import _check_weights, select_cells

    cfg = slurm_config(lm, options)
    cells = select_cells(lm.cells(), only)
    store = ResultStore(results, lm.results_name)
    store.check_writable()
    folder = (store.dir / "slurm" / "%j").absolute()
    pending = [c for c in cells if not store.done(c.id)]
    sub = Submission(kind, folder, skipped=[c for c in cells if store.done(c.id)])
    if not pending:
        return sub
    _check_weights(lm, pending)
    ex = make_executor(kind, folder, cfg, name=f"fishertune-{lm.results_name}")
    specs = [CellJob(str(lm.path), dict(overrides or {}), lm.tiny, str(results), c.id, device, os.getcwd())
             for c in pending]
    jobs = ex.map_array(run_cell_job, specs)
    sub.jobs = list(zip(pending, jobs))
    return sub


def describe(sub: Submission, out: Callable[[str], None] = print) -> None:
    """Print what was submitted and how to follow it."""
    for cell in sub.skipped:
        out(f"{'skipped':8s} {cell.id}")
    if not sub.jobs:
        return
    logs = sub.folder.parent
    for cell, job in sub.jobs:
        out(f"{'queued':8s} {cell.id}  job {job.job_id}")
    if sub.kind == "slurm":
        out(f"submitted {len(sub.jobs)} job(s) as Slurm job {sub.array_id}; logs in {logs}/<job id>/")
        out(f"watch: squeue -j {sub.array_id}   (after the end: sacct -j {sub.array_id})")
    else:
        out(f"started {len(sub.jobs)} local job process(es) ({', '.join(str(j.job_id) for _, j in sub.jobs)}); "
            f"logs in {logs}/<pid>/")
    out("when they have ended, run the same command again: finished cells are skipped and the table is rendered "
        "(or add --wait to wait here)")


def _last_line(exc: BaseException) -> str:
    """The line that says why a job failed: the last line of its traceback, or why it left no result."""
    text = str(exc)
    if "with trace:" in text:
        trace = text.split("-" * 22 + "\n")[1]
        lines = [ln for ln in trace.splitlines() if ln.strip()]
        return lines[-1].strip() if lines else text.splitlines()[0]
    lines = text.splitlines()
    return next((ln.strip() for ln in lines if "state:" in ln), lines[0] if lines else type(exc).__name__)


def wait(sub: Submission, out: Callable[[str], None] = print) -> list[tuple[Cell, str]]:
    """Wait for every job and print its outcome (a failed one: its cell id, the exception's last line and
    its log); returns ``(cell, "done" | "skipped" | "failed")`` per cell, the skipped ones included."""
    outcome = [(c, "skipped") for c in sub.skipped]
    for cell in sub.skipped:
        out(f"{'skipped':8s} {cell.id}")
    try:
        for cell, job in sub.jobs:
            exc = job.exception()  # waits for the job
            if exc is None:
                status = job.result()
                out(f"{status:8s} {cell.id}")
            else:
                status = "failed"
                out(f"{'failed':8s} {cell.id}: {_last_line(exc)} (log: {job.paths.stderr})")
            outcome.append((cell, status))
    except KeyboardInterrupt:
        out("stopped waiting; the jobs go on (squeue / the local processes); run the same command again once "
            "they have ended")
        raise
    return outcome
