"""The ``fishertune`` command.

    fishertune run MANIFEST            train and evaluate every pending cell, then render its table
    fishertune render TABLE            write results/tables/TABLE.md and .tex from finished cells
    fishertune data synth --out DIR    generate the miniature data sets in the real layouts
    fishertune data verify NAME --root DIR
    fishertune data prepare NAME --root DIR   convert labels in place as Rein's tools do (resumable)
    fishertune regression check|update MANIFEST... [--run]
    fishertune params [--format md|json]   trainable parameters per backbone x method, beside the paper's
    fishertune cost MANIFEST           FLOPs, memory and GPU hours of each full-size cell, on paper
    fishertune export CELL_OR_RESULT --out DIR     a finished cell's kept model as a standalone package
    fishertune predict MODEL IMAGE_OR_DIR... --out DIR   its predictions on any image
    fishertune report [--results DIR] [--out DIR]  one self-contained HTML page per results folder

User errors (bad manifest, missing data or weights, bad labels) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from fishertune.errors import UserError

DEFAULT_RESULTS = "results/runs"


def _overrides(args: argparse.Namespace) -> dict:
    """Manifest fields set on the command line (--subset, --any-count, --seeds, --threads, --jobs)."""
    out: dict = {}
    execution = {k: getattr(args, k) for k in ("threads", "jobs") if getattr(args, k, None) is not None}
    if execution:
        out["execution"] = execution
    data = {"subset": args.subset} if getattr(args, "subset", None) is not None else {}
    if getattr(args, "any_count", False):
        data["counts"] = "any"
    if data:
        out["data"] = data
    if getattr(args, "seeds", None) is not None:
        if args.seeds < 1:
            raise UserError(f"--seeds must be at least 1, got {args.seeds}")
        out["seeds"] = args.seeds
    return out


def _load(args: argparse.Namespace):
    """The command's manifest, with the command line's overrides (--subset, --tiny)."""
    from fishertune.runner.manifest import load_manifest

    return load_manifest(args.manifest, _overrides(args), tiny=getattr(args, "tiny", False))


def _tiny_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true",
                        help="run the manifest's grid on each backbone family's tiny variant (the tiny foundation "
                             "model shipped in the package, no checkpoint needed) with the miniature protocol of benchmarks/mini/protocol.yaml, "
                             "reading the manifest's data: checks the whole pipeline in minutes on a CPU, e.g. "
                             "on a miniature written by `fishertune data synth --out $FISHERTUNE_DATA`; results go "
                             "to RESULTS/<manifest name>-tiny/, tables to results/tables/<manifest name>-tiny/ and "
                             "say TINY")


def _sweep_args(parser: argparse.ArgumentParser, example: str,
                device_help: str = "override the manifest's execution.device") -> None:
    """What `run` and `reproduce` both take: the manifest, where results go, which cells, on what."""
    parser.add_argument("manifest", help=f"YAML manifest, e.g. {example}")
    parser.add_argument("--results", default=DEFAULT_RESULTS, help="results root; one JSON per cell under "
                        "RESULTS/<results name>/ (default: %(default)s)")
    _cell_args(parser, device_help)
    _subset_arg(parser)
    _seeds_arg(parser)
    _tiny_arg(parser)
    _execution_args(parser)
    parser.add_argument("--retry-failed", action="store_true",
                        help="run cells whose result says failed (a non-finite loss) again; by default they are "
                             "kept and skipped, as rerunning the same config fails the same way")
    _executor_args(parser)


def _cell_args(parser: argparse.ArgumentParser, device_help: str = "override the manifest's execution.device") -> None:
    """--only and --device, as every command that runs cells takes them."""
    parser.add_argument("--only", nargs="+", metavar="PATTERN", help="only cells whose id or row matches a glob")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help=device_help)


def _execution_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="with the local executor: run N cells at once, each in its own process with "
                             "execution.threads threads (overrides execution.jobs; the mini protocol runs 2 of 1 "
                             "thread on 2 cores); a cell's numbers do not depend on it")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads per cell (overrides execution.threads; not part of a cell's id: the same "
                             "cell with other threads differs in the last bits, see results/perf/mini-signal.md)")


def _seeds_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, metavar="N",
                        help="run N seeds of every cell: the manifest's seeds (or its seed) continued by consecutive "
                             "integers, e.g. seed 42 and --seeds 3 give 42, 43, 44; each seed is a cell of its own "
                             "(the first seed's cells keep their ids) and tables show mean +- std over them")


def _subset_arg(parser: argparse.ArgumentParser) -> None:
    """--subset and --any-count: which images of the data a manifest's cells read."""
    parser.add_argument("--subset", type=int, metavar="N",
                        help="a deterministic, class-balanced subset of N images of the source and of each target "
                             "(N per ACDC condition), for quick runs and CI regression on real data; results go to "
                             "RESULTS/<manifest name>-subsetN/ and tables say SUBSET (overrides data.subset)")
    parser.add_argument("--any-count", action="store_true",
                        help="real data with other than the official pair counts (part of a data set, a test tree "
                             "in the official layout): every other check still runs; results go to RESULTS/<manifest "
                             "name>-anycount/ and tables name the counts used (sets data.counts: any)")


def _executor_args(parser: argparse.ArgumentParser) -> None:
    """--executor, --wait and the Slurm resources, as run and reproduce take them."""
    g = parser.add_argument_group(
        "where the cells run", "By default in this process, one after another. With --executor slurm each pending "
        "cell becomes one job of one Slurm job array (through submitit); its resources come from the manifest's "
        "execution.slurm section, overridden by the --slurm-* options. Logs: RESULTS/<results name>/slurm/<job id>/.")
    g.add_argument("--executor", choices=("local", "slurm", "submitit-local"), default="local",
                   help="local: run the cells here (default); slurm: submit one job per pending cell as one job "
                        "array and return (rerun the same command once they have ended: finished cells are "
                        "skipped, the table is rendered); submitit-local: the same jobs as processes of this "
                        "machine, all started at once (for a check or a workstation; bound them with --only)")
    g.add_argument("--wait", action="store_true",
                   help="with slurm or submitit-local: wait for the jobs, report each one's outcome (a failed job: "
                        "its cell, the error's last line and its log) and render the table; exit 1 if one failed")
    g.add_argument("--slurm-partition", metavar="NAME", help="partition to submit to (execution.slurm.partition)")
    g.add_argument("--slurm-account", metavar="NAME", help="account to charge (execution.slurm.account)")
    g.add_argument("--slurm-time", type=int, metavar="MINUTES",
                   help="wall-time limit of each job in minutes (execution.slurm.timeout_min; default 1440)")
    g.add_argument("--slurm-gpus", type=int, metavar="N",
                   help="GPUs per job (execution.slurm.gpus_per_node; default 1, which a cell uses)")
    g.add_argument("--slurm-cpus", type=int, metavar="N",
                   help="CPU cores per job (execution.slurm.cpus_per_task; default 8)")
    g.add_argument("--slurm-mem", type=float, metavar="GB",
                   help="memory per job in GB (execution.slurm.mem_gb; default: the partition's)")
    g.add_argument("--slurm-array-parallelism", type=int, metavar="N",
                   help="run at most N jobs of the array at once (execution.slurm.array_parallelism)")


def _submit(args: argparse.Namespace, lm, render: bool = True) -> int | None:
    """Run the cells through submitit when --executor asks for it and return the exit code; None for the
    local executor (the caller runs the cells itself)."""
    from fishertune.report.tables import RENDERERS
    from fishertune.runner import executors

    options = {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in executors.SLURM_OPTIONS.items()}
    if args.executor == "local":
        given = [executors.SLURM_OPTIONS[k] for k, v in options.items() if v is not None]
        if given:
            raise UserError(f"{given[0]} is for --executor slurm or submitit-local; add one of them (the local "
                            "executor would run every cell here)")
        return None
    if args.retry_failed:  # the jobs run what has no result; a failed cell has one
        raise UserError("--retry-failed runs here only (--executor local); to resubmit failed cells, delete their "
                        "result JSONs (`fishertune status` lists them) and submit again")
    sub = executors.submit(lm, args.executor, args.results, only=args.only, device=args.device,
                           overrides=_overrides(args), options=options)
    if sub.jobs and not args.wait:
        executors.describe(sub)
        return 0
    outcome = executors.wait(sub)
    if render and lm.manifest.table in RENDERERS:
        for path in RENDERERS[lm.manifest.table](Path(args.results) / lm.results_name):
            print(f"wrote {path}")
    return 1 if any(status == "failed" for _, status in outcome) else 0


def _cmd_run(args: argparse.Namespace) -> int:
    from fishertune.runner.run import select_cells

    lm = _load(args)
    if args.dry_run:
        for cell in select_cells(lm.cells(), args.only):
            print(cell.id)
        return 0
    code = _submit(args, lm, render=not args.no_render)
    if code is not None:
        return code
    return _run_here(args, lm, render=not args.no_render)


#: what ``run`` prints beside a cell that it did not finish now
STATUS_NOTE = {"busy": "  (another runner holds it; see `fishertune status`)",
               "failed": "  (stopped; `fishertune status` says why; --retry-failed runs it again)"}


def _run_here(args: argparse.Namespace, lm, render: bool = True) -> int:
    """Run the pending cells in this process, print each one's status and render the table; exit 1 when a
    cell failed (the others still ran)."""
    from fishertune.report.tables import RENDERERS
    from fishertune.runner.run import run_manifest

    outcome = run_manifest(lm, args.results, only=args.only, device=args.device, retry_failed=args.retry_failed)
    for cell, status in outcome:
        print(f"{status:8s} {cell.id}{STATUS_NOTE.get(status, '')}")
    table = lm.manifest.table
    if render and table in RENDERERS and any(status in ("done", "skipped") for _, status in outcome):
        from fishertune.report.plots import plot_results

        here = Path(args.results) / lm.results_name
        for path in RENDERERS[table](here) + plot_results(here):
            print(f"wrote {path}")
    return 1 if any(status == "failed" for _, status in outcome) else 0


def _cmd_status(args: argparse.Namespace) -> int:
    from fishertune.runner.status import cell_states, format_states

    lm = _load(args)
    print(format_states(lm, cell_states(lm, args.results, only=args.only)))
    return 0


def _cmd_fisher(args: argparse.Namespace) -> int:
    from fishertune.runner.run import estimate_manifest

    lm = _load(args)
    for cell, paths in estimate_manifest(lm, only=args.only, device=args.device):
        print(f"{cell.row:12s} {cell.backbone}")
        for what in ("estimate", "mask", "plot"):
            if what in paths:
                print(f"  {what:8s} {paths[what]}")
        if not paths:
            print("  (not cached: the method's config says cache: false)")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from fishertune.runner.preflight import reproduction_problems
    from fishertune.runner.run import select_cells
    from fishertune.runner.store import ResultStore

    lm = _load(args)
    store = ResultStore(args.results, lm.results_name)
    pending = [c for c in select_cells(lm.cells(), args.only) if not store.done(c.id)]
    problems = reproduction_problems(lm, pending, args.device) if pending else []
    if args.executor == "slurm":  # the GPUs are on the jobs' nodes (execution.slurm.gpus_per_node), not here
        problems = [p for p in problems if not p.startswith("device: ")]
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        print(f"{lm.path}: {len(problems)} problem(s) before any training; nothing was run", file=sys.stderr)
        return 2
    code = _submit(args, lm)
    if code is not None:
        return code
    return _run_here(args, lm)


def _cmd_plot(args: argparse.Namespace) -> int:
    from fishertune.report.plots import plot_results

    paths = plot_results(args.results, args.out, args.manifest, methods=args.methods, backbone=args.backbone,
                         images=args.images)
    for path in paths:
        print(f"wrote {path}")
    if not paths:
        print("nothing to plot", file=sys.stderr)
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from fishertune.report.tables import RENDERERS

    if args.table not in RENDERERS:
        raise UserError(f"unknown table {args.table!r}; renderable: {', '.join(RENDERERS)}")
    if args.paper_only:
        from fishertune.report.tables import render_table1_paper

        if args.table != "table1":
            raise UserError(f"--paper-only renders table1 only (the paper's other tables have no runs to wait "
                            f"for); got {args.table!r}")
        paths = render_table1_paper(args.out)
    else:
        paths = RENDERERS[args.table](args.results, args.out, args.manifest,
                                      reference=None if args.reference == "none" else args.reference)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from fishertune.report.params import parameter_rows, to_json, to_markdown
    from fishertune.runner.manifest import defaults
    from fishertune.runner.store import atomic_write_text

    head = args.head or defaults()["head"]["name"]
    rows = parameter_rows(args.backbones, args.methods, head=head, head_config=None if not args.head else {})
    text = to_json(rows) if args.format == "json" else to_markdown(rows, head)
    if args.output:
        atomic_write_text(Path(args.output), text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fishertune.runner.model import export_model

    print(f"wrote {export_model(args.cell, args.results, args.out)}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from fishertune.runner.predict import predict_images

    written = predict_images(args.model, args.images, args.out, weights=args.weights, target=args.target,
                             test_size=tuple(args.test_size) if args.test_size else None, device=args.device,
                             alpha=args.alpha)
    print(f"wrote {len(written)} files ({len(written) // 3} images) under {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fishertune.report.html import write_reports

    for path in write_reports(args.results, args.out):
        print(f"wrote {path}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from fishertune.report.compare import compare_rows, format_rows

    if not 0 < args.level < 1:
        raise UserError(f"--level must be between 0 and 1 (e.g. 0.95), got {args.level}")
    rows = compare_rows(args.a, args.b, args.manifest, args.level)
    sys.stdout.write(format_rows(rows, args.a, args.b, args.level))
    return 1 if args.fail_on_difference and any(r["difference"].significant for r in rows) else 0


def _cmd_tiny_pretrain(args: argparse.Namespace) -> int:
    from fishertune.pretrain import RECIPES
    from fishertune.pretrain.loop import TINY_DIR, pretrain, write_model
    from fishertune.pretrain.world import WorldConfig
    from fishertune.runner.data import cache_dir

    if args.all == bool(args.backbone):
        raise UserError("name one tiny backbone (e.g. `fishertune tiny pretrain mae-tiny`) or give --all")
    names = RECIPES.names() if args.all else [args.backbone]
    out = Path(args.out) if args.out else TINY_DIR
    for name in names:
        cls = RECIPES.get(name, "fishertune tiny pretrain")
        overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v is not None}
        if args.world_shuffled_looks is not None:
            if not 0 <= args.world_shuffled_looks <= 1:
                raise UserError(f"--world-shuffled-looks must be a share between 0 and 1, got {args.world_shuffled_looks}")
            overrides["world"] = WorldConfig(shuffled_looks=args.world_shuffled_looks)
        cfg = cls.Config(**overrides)
        recipe = cls(cfg, teacher_dir=out) if cls.needs else cls(cfg)
        command = "fishertune " + shlex.join(args.argv)
        trainer, record = pretrain(recipe, cache_dir(), threads=args.threads)
        weights, card = write_model(recipe, trainer, record, out, command)
        print(f"{name}: final loss {record['final_loss']:.4f} after {record['steps']} steps in "
              f"{record['wall_time_s']:.0f} s; wrote {weights} and {card}")
    return 0


def _cmd_tiny_list(args: argparse.Namespace) -> int:
    from fishertune.pretrain.cards import card_rows

    for line in card_rows():
        print(line)
    return 0


def _cmd_cost(args: argparse.Namespace) -> int:
    from fishertune.report import cost
    from fishertune.runner.run import select_cells
    from fishertune.runner.store import atomic_write_text

    lm = _load(args)
    cells = select_cells(lm.cells(), args.only)
    command = " ".join(["fishertune", "cost", args.manifest, *(["--only", *args.only] if args.only else []),
                        "--precision", args.precision, *(["--output", args.output] if args.output else [])])
    rec = cost.record(lm, cost.manifest_costs(lm, cells, args.precision), args.precision, command)
    if not args.output:
        sys.stdout.write(cost.to_markdown(rec))
        return 0
    out = Path(args.output)
    for path, text in ((out.with_suffix(".md"), cost.to_markdown(rec)), (out.with_suffix(".json"), cost.to_json(rec))):
        atomic_write_text(path, text)
        print(f"wrote {path}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from fishertune.data import synthesize

    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be in 0..2**63-1, got {args.seed}")
    out = Path(args.out)
    try:
        roots = synthesize(out, seed=args.seed, images=args.images, train_images=args.train_images, looks=args.looks)
    except (FileExistsError, NotADirectoryError, PermissionError) as e:
        raise UserError(f"cannot write the miniature under {out} ({e.strerror}); choose a writable --out "
                        "directory") from None
    for name, root in roots.items():
        print(f"{name:11s} {root}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from fishertune.data import verify_dataset
    from fishertune.data.verify import expected_counts

    root = Path(args.root)
    expected = None if args.any_count else expected_counts(args.name, root)
    report = verify_dataset(args.name, root, split=args.split, expected=expected)
    print(report.format())
    return 0 if report.ok else 2


def _cmd_prepare(args: argparse.Namespace) -> int:
    from fishertune.data.prepare import prepare_dataset

    report = prepare_dataset(args.name, Path(args.root), workers=args.workers)
    print(report.format())
    return 0 if report.ok else 2


def _cmd_regression(args: argparse.Namespace) -> int:
    from fishertune.report import regression
    from fishertune.runner.manifest import load_manifest
    from fishertune.runner.run import run_manifest

    if args.stored and len(args.manifest) > 1:
        raise UserError("--stored names one regression file; give one manifest with it")
    if (args.spread or args.bands_from) and args.action == "check":
        raise UserError("--spread and --bands-from are for `regression update` (they give the bands); `check` reads "
                        "them from the stored file")
    # every manifest is read (and its grid expanded) before any cell runs: a typo stops it at once
    loaded = [load_manifest(path, _overrides(args), tiny=args.tiny) for path in args.manifest]
    for lm in loaded:
        lm.cells()
    moved_total = 0
    for lm in loaded:
        if args.run:
            for cell, status in run_manifest(lm, args.results, only=args.only, device=args.device):
                print(f"{status:8s} {cell.id}")
        if args.action == "check":
            problems, compared, closest = regression.check_report(lm, args.results, args.stored, only=args.only)
            for line in problems:
                print(line)
            print(f"{lm.results_name}: " + (f"{len(problems)} statistic(s) moved beyond their bands" if problems
                                            else "no change beyond the stored bands")
                  + f" ({compared} compared" + (f"; the largest against its band: {closest})" if closest else ")"))
            moved_total += len(problems)
        else:
            path, moved = regression.update(lm, args.results, args.spread or [], args.stored, only=args.only,
                                            bands_from=args.bands_from)
            for line in moved:
                print(line)
            # a class whose new spread is too wide to compare is dropped from the record: not a move
            dropped = sum(line.endswith(": stored, absent now") for line in moved)
            said = [f"{len(moved) - dropped} statistic(s) moved beyond the old bands"] if len(moved) > dropped else []
            said += [f"{dropped} no longer stored (now too unstable to compare)"] if dropped else []
            print(f"wrote {path}" + (f"; {', '.join(said)} (see git diff)" if said else ""))
    return 1 if moved_total else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fishertune",
        description="Reproduce the FisherTune (CVPR 2025) and Rein (CVPR 2024) tables: domain-generalised "
                    "semantic segmentation with tuned vision foundation models.",
        epilog="Start with `fishertune run benchmarks/mini/table1.yaml` (CPU, minutes).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train and evaluate a manifest's cells, then render its table",
                         description="Expand MANIFEST to cells (backbone x method), run each pending cell "
                                     "(cells with a result are skipped) and render the manifest's table.")
    _sweep_args(run, "benchmarks/mini/table1.yaml")
    run.add_argument("--dry-run", action="store_true", help="list the cell ids and exit")
    run.add_argument("--no-render", action="store_true", help="do not render the table and plots afterwards")
    run.set_defaults(func=_cmd_run)

    rep = sub.add_parser(
        "reproduce", help="pre-flight, run and render a paper table (what the tox reproduce-* envs call)",
        description="Check everything MANIFEST's pending cells need before any training (each data set found "
                    "and verified, each checkpoint present and fitting its backbone, a GPU unless --device cpu) "
                    "and list every problem at once (exit 2); then run the pending cells (finished ones are "
                    "skipped) and render the table with the paper's numbers beside ours.")
    _sweep_args(rep, "benchmarks/table1.yaml", "cpu: run without a GPU, on purpose")
    rep.set_defaults(func=_cmd_reproduce)

    fisher = sub.add_parser(
        "fisher", help="estimate FisherTune's Fisher and masks for a manifest, and plot where they lie",
        description="For every fishertune cell of MANIFEST (every selector row, e.g. of the ablation grid): "
                    "estimate the Fisher of the backbone's blocks on x and on a domain-shifted x' as the cell's "
                    "config says, select the mask and draw a heat map of the selected fraction per block and "
                    "per q / k / v / projection / MLP matrix. Estimates and masks are cached under "
                    "$FISHERTUNE_CACHE/fisher/ (default ~/.cache/fishertune/fisher) by a hash of what they "
                    "depend on, so `fishertune run` and other rows reuse them; the PNG lies next to the mask.")
    fisher.add_argument("manifest", help="YAML manifest with fishertune rows, e.g. benchmarks/mini/ablation.yaml")
    _cell_args(fisher)
    _subset_arg(fisher)
    _tiny_arg(fisher)
    fisher.set_defaults(func=_cmd_fisher)

    render = sub.add_parser("render", help="render a table from finished cells (Markdown and LaTeX)",
                            description="Write TABLE.md and TABLE.tex with our numbers beside the paper's.")
    render.add_argument("table", help="table1, ablation or estimation")
    render.add_argument("--results", default=DEFAULT_RESULTS, help="where result JSONs are (default: %(default)s)")
    render.add_argument("--manifest", help="use only results of this manifest name")
    render.add_argument("--out", help="output directory (default: results/tables/<results name>/, e.g. "
                        "results/tables/mini-table1/ for benchmarks/mini/table1.yaml)")
    render.add_argument("--reference", default="full", metavar="ROW",
                        help="the row each backbone's other rows are compared with in the last column (difference of "
                             "Avg with its 95%% Welch interval over seeds; table1, ablation, estimation); 'none' for no "
                             "column (default: %(default)s)")
    render.add_argument("--paper-only", action="store_true", help="table1 without any run: the paper's numbers "
                        "and our measured parameter counts, written as table1-paper.md/.tex")
    render.set_defaults(func=_cmd_render)

    params = sub.add_parser(
        "params", help="trainable parameters of each full-size backbone x method, beside the paper's column",
        description="Build every full-size backbone on the meta device (no weights needed, no memory used), "
                    "apply each registered method and count what trains on the backbone side (the paper's "
                    "Trainable Params column) and in the decode head.")
    params.add_argument("--format", choices=("md", "json"), default="md",
                        help="md: a Markdown table with the paper's numbers; json: a list of objects with keys "
                             "backbone, family, method, backbone_trainable, head_trainable, backbone_total, "
                             "paper_trainable_m (default: %(default)s)")
    params.add_argument("--output", help="write to this file (atomically) instead of standard output")
    params.add_argument("--backbones", nargs="+", metavar="NAME", help="only these backbones (default: every "
                        "full-size variant)")
    params.add_argument("--methods", nargs="+", metavar="NAME", help="only these methods (default: every "
                        "registered one)")
    params.add_argument("--head", help="decode head with its default options (default: the protocol's head, "
                        "with its options from fishertune/defaults.yaml)")
    params.set_defaults(func=_cmd_params)

    cost = sub.add_parser(
        "cost", help="what each cell of a manifest costs at full size: FLOPs, memory, GPU hours (no weights or GPU)",
        description="Build each cell's model as a run does, on fake tensors (shapes without data: no weights, data "
                    "or GPU, little memory), take one training step at the protocol's crop and batch, and count: "
                    "FLOPs per training image for the backbone, pixel decoder, transformer decoder and losses "
                    "(forward and backward), an evaluation window's FLOPs, the bytes of parameters, gradients and "
                    "optimizer state, the activations saved at the protocol's batch, and the FisherTune/ChildTune "
                    "estimates; then project one cell's hours on an H100 at 30/40/50% of its dense peak and the "
                    "whole grid's GPU hours. About half a minute per full-size cell on a CPU.")
    cost.add_argument("manifest", help="YAML manifest, e.g. benchmarks/table1.yaml")
    cost.add_argument("--only", nargs="+", metavar="PATTERN", help="only cells whose id or row matches a glob")
    cost.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                      help="training and evaluation precision of the projection: bf16 (autocast, "
                           "train.precision: bf16; the GPU's bf16 peak) or fp32 (the protocol's default, Rein's; the "
                           "GPU's fp32 peak) (default: %(default)s)")
    cost.add_argument("--output", metavar="FILE", help="write FILE.md and FILE.json (atomically) instead of printing "
                      "the Markdown, e.g. results/perf/full-size-projection.md")
    cost.set_defaults(func=_cmd_cost)

    data = sub.add_parser("data", help="synthesize, verify or prepare data sets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    synth = dsub.add_parser("synth", help="write the miniature GTAV, Cityscapes, BDD100K, Mapillary and ACDC trees",
                            description="Generate small data sets in the real on-disk layouts and label "
                                        "encodings, from a procedural street-scene generator.")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--seed", type=int, default=0, help="generator seed (default: %(default)s)")
    synth.add_argument("--images", type=int, default=12, help="images per evaluation split (Cityscapes, BDD100K and "
                       "Mapillary val, each ACDC condition) and per unused training split (default: %(default)s)")
    synth.add_argument("--train-images", type=int, metavar="N", help="images of each training source (GTAV, "
                       "Cityscapes train) (default: twice --images)")
    synth.add_argument("--looks", default="class", help="class: each class has its own colour family and texture; "
                       "shuffled: each image gives its classes one another's looks, so only shape, position and "
                       "context tell them apart (same labels; a diagnostic) (default: %(default)s)")
    synth.set_defaults(func=_cmd_synth)
    verify = dsub.add_parser("verify", help="check a data set tree: pairs, counts, label values, sizes",
                             description="Check a data set in its real layout: every image paired with a label, "
                                         "pair counts (official ones, or the generator's for the miniature), label "
                                         "values legal after mapping, image and label sizes equal. Exit 2 when the "
                                         "tree is not usable.")
    verify.add_argument("name", help="gtav, cityscapes, bdd100k, mapillary or acdc")
    verify.add_argument("--root", required=True, help="the data set's directory")
    verify.add_argument("--split", help="check one split only")
    verify.add_argument("--any-count", action="store_true", help="do not compare pair counts with the official "
                        "ones (or, for the miniature, with those its generator recorded)")
    verify.set_defaults(func=_cmd_verify)
    prepare = dsub.add_parser(
        "prepare", help="convert a data set's labels in place as Rein's tools do (resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a data set in place as Rein's tools/convert_datasets do, skipping files already "
                    "converted (rerun to resume), then report. Exit 2 when the tree is broken.\n\n"
                    "  gtav        labels/<n>_labelTrainIds.png (train ids) beside each labels/<n>.png\n"
                    "  cityscapes  gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png from the *_polygons.json "
                    "files\n"
                    "              (needs: pip install -e '.[cityscapes]' in the clone)\n"
                    "  mapillary   cityscapes_trainIdLabel/{train,val}/label/*.png (66 classes -> 19 by name) and\n"
                    "              the halved validation set half/val_img/*.jpg, half/val_label/*.png\n"
                    "  bdd100k     nothing to convert; every pair is checked\n"
                    "  acdc        nothing to convert; every pair is checked\n\n"
                    "The readers use the prepared copies once they are complete and the original files otherwise "
                    "(same labels; Mapillary's halved validation images are JPEGs re-encoded at quality 75, as "
                    "Rein's). Pair counts are checked by `fishertune data verify`.")
    prepare.add_argument("name", help="gtav, cityscapes, bdd100k, mapillary or acdc")
    prepare.add_argument("--root", required=True, help="the data set's directory")
    prepare.add_argument("--workers", type=int, help="threads converting files (default: CPU cores, at most 8)")
    prepare.set_defaults(func=_cmd_prepare)
    cmp = sub.add_parser(
        "compare", help="compare two result sets cell by cell, each difference with its interval over seeds",
        description="Match the finished cells of A and B by manifest name, backbone and row, group their seeds, "
                    "and give per target and for the aggregate the difference B - A of the mean mIoU with Welch's "
                    "interval over seeds; a difference whose interval excludes 0 exceeds the noise. Run before and "
                    "after changing a method (e.g. with --seeds 3 on both sides).")
    cmp.add_argument("a", metavar="RESULTS_A", help="a results folder (searched recursively), e.g. results/runs")
    cmp.add_argument("b", metavar="RESULTS_B", help="the other results folder")
    cmp.add_argument("--manifest", metavar="NAME", help="only cells of this manifest name")
    cmp.add_argument("--level", type=float, default=0.95, help="confidence level (default: %(default)s)")
    cmp.add_argument("--fail-on-difference", action="store_true",
                     help="exit 1 when a difference exceeds the noise (for scripts)")
    cmp.set_defaults(func=_cmd_compare)

    tiny = sub.add_parser("tiny", help="the tiny foundation models of the miniature: make or list them")
    tsub = tiny.add_subparsers(dest="tiny_command", required=True, metavar="ACTION")
    tpre = tsub.add_parser(
        "pretrain", help="pretrain a tiny foundation model with its family's objective and write it with its card",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain the tiny variant of a family on the suite's pretraining world (street scenes under "
                    "random styles, never the benchmark's images or its 19-class labels) with that family's "
                    "objective, then write BACKBONE.safetensors (official layout, fp16) and BACKBONE.json (its card: "
                    "recipe and settings hash, steps, losses, wall time, machine, torch, command) into "
                    "fishertune/backbones/tiny/ (or --out).\n\n"
                    "  clip-tiny    image-text contrast against a tiny text tower on generated captions\n"
                    "  dinov2-tiny  self-distillation between views with an EMA teacher (DINO + iBOT)\n"
                    "  eva02-tiny   masked prediction of CLIP-tiny's features (needs clip-tiny first)\n"
                    "  mae-tiny     masked-patch pixel reconstruction, 75% masked\n"
                    "  sam-tiny     class-agnostic masks from point prompts (SAM's prompt encoder and decoder)\n\n"
                    "The first run generates the pretraining world's pool of scenes into $FISHERTUNE_CACHE.")
    tpre.add_argument("backbone", nargs="?", help="clip-tiny, dinov2-tiny, eva02-tiny, mae-tiny or sam-tiny")
    tpre.add_argument("--all", action="store_true", help="every tiny model, in dependency order (CLIP before EVA-02)")
    tpre.add_argument("--out", metavar="DIR", help="write here instead of the package's fishertune/backbones/tiny/ "
                      "(EVA-02's CLIP teacher is then read from here too)")
    tpre.add_argument("--steps", type=int, metavar="N", help="override the recipe's steps (changes its hash: the "
                      "shipped models use the recipes' defaults)")
    tpre.add_argument("--batch-size", type=int, metavar="N", help="override the recipe's batch size (changes its hash)")
    tpre.add_argument("--world-shuffled-looks", type=float, metavar="P", help="share of the world's scenes whose "
                      "classes take one another's colour and texture (default 0; changes the hash and the pool)")
    tpre.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: torch's)")
    tpre.set_defaults(func=_cmd_tiny_pretrain)
    tlist = tsub.add_parser("list", help="the shipped tiny models: recipe, steps, final loss, time, whether the card "
                            "matches today's recipe and file")
    tlist.set_defaults(func=_cmd_tiny_list)

    plot = sub.add_parser(
        "plot", help="draw the figures of finished cells (PNG and PDF)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Draw every figure the finished cells allow, as PNG (150 dpi) and PDF, into "
                    "OUT/<manifest name>/:\n"
                    "  miou-vs-params              mIoU (mean over targets) against trainable backbone parameters,\n"
                    "                              one panel per backbone, the paper's points hollow (any table)\n"
                    "  per-class-TARGET-BACKBONE   per-class IoU bars, ours vs the paper's (Table 2 results only)\n"
                    "  training-loss               every cell's training loss against the iteration, one panel per\n"
                    "                              backbone, log scale: divergence or a flat loss at a glance\n"
                    "  qualitative-BACKBONE-TARGET input, ground truth and predictions in the Cityscapes palette\n"
                    "                              (the paper's Figure 2; from the predictions `fishertune run` saves\n"
                    "                              beside each result; older cells are listed with how to rerun them)\n"
                    "Titles say the data kind (miniature or real, subset). Results of several manifests, versions\n"
                    "or data kinds of one table are refused: pick one with --manifest.")
    plot.add_argument("--results", default=DEFAULT_RESULTS, metavar="DIR",
                      help="where result JSONs are, searched recursively (default: %(default)s)")
    plot.add_argument("--manifest", metavar="NAME", help="only results of this manifest name (e.g. mini-table1)")
    plot.add_argument("--out", metavar="DIR", help="root of the figures; each manifest's go to DIR/<manifest "
                      "name>/ (default: results/plots)")
    plot.add_argument("--methods", nargs="+", metavar="ROW", help="qualitative figure: the rows whose predictions "
                      "are shown, in this order (default: freeze rein fishertune, those that ran)")
    plot.add_argument("--backbone", help="qualitative figure: the backbone (default: the one whose chosen cells "
                      "have the most saved predictions, DINOv2 first on a tie)")
    plot.add_argument("--images", type=int, default=3, metavar="N",
                      help="qualitative figure: images per target, the first N of the evaluation set (at most "
                           "the number saved at run time, 3) (default: %(default)s)")
    plot.set_defaults(func=_cmd_plot)

    export = sub.add_parser(
        "export", help="a finished cell's kept model as a standalone package (for predict, or to share)",
        description="Copy the model a finished cell kept (<cell id>.model/ beside its result: what trained "
                    "plus the decode head as model.safetensors, sparse methods' chosen elements as indices and "
                    "values against the pretrained weights, and card.json) into a new directory, with a "
                    "README.md saying what it is, which pretrained file it needs (name, size, sha256) and how "
                    "to run it. The kept file is checked against the result's sha256 first.")
    export.add_argument("cell", metavar="CELL_OR_RESULT",
                        help="a result JSON (RESULTS/<results name>/<cell id>.json) or a cell id, or a glob "
                             "matching one cell, searched under --results")
    export.add_argument("--out", required=True, metavar="DIR", help="the package's directory (new or empty)")
    export.add_argument("--results", default=DEFAULT_RESULTS, metavar="DIR",
                        help="where to look for a cell id (default: %(default)s)")
    export.set_defaults(func=_cmd_export)

    pred = sub.add_parser(
        "predict", help="predict train ids on any image with a kept or exported model",
        description="Rebuild a kept or exported model (the pretrained backbone from its official file plus "
                    "the kept state; a file whose size or sha256 differs from the one it was trained on is "
                    "refused) and predict each image as the cell evaluated: resized keeping its ratio to a "
                    "target's test size, sliding window with the cell's crop and stride, logits at the image's "
                    "own size. Writes per image NAME_trainid.png (train ids 0..18), NAME_color.png (Cityscapes "
                    "palette) and NAME_overlay.png under --out (a directory's images keep their relative paths).")
    pred.add_argument("model", metavar="MODEL", help="a `fishertune export` package or a cell's <cell id>.model "
                      "directory")
    pred.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="images, or directories searched "
                      "recursively for .png, .jpg, .jpeg, .bmp, .tif, .tiff and .webp files")
    pred.add_argument("--out", required=True, metavar="DIR", help="where the PNGs go")
    pred.add_argument("--weights", metavar="FILE", help="the pretrained backbone file (default: the path the "
                      "card recorded if it still exists, else $FISHERTUNE_WEIGHTS/<official file name>)")
    size = pred.add_mutually_exclusive_group()
    size.add_argument("--target", help="resize images to this evaluation target's test size (default: the cell's "
                      "first target)")
    size.add_argument("--test-size", type=int, nargs=2, metavar=("LONG", "SHORT"),
                      help="resize images, keeping their ratio, to fit these bounds instead")
    pred.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="where to run (default: %(default)s, a GPU when there is one)")
    pred.add_argument("--alpha", type=float, default=0.5, help="the colours' weight in the overlay (default: "
                      "%(default)s)")
    pred.set_defaults(func=_cmd_predict)

    report = sub.add_parser(
        "report", help="one self-contained HTML page per results folder, to read in a browser",
        description="For every results folder under --results (RESULTS/<results name>/, the result JSONs of one "
                    "manifest), write OUT/<results name>.html: the data kind in a banner; every table of the "
                    "manifest, sortable (click a header), ours beside the paper with the differences coloured; "
                    "per-class IoU as a heat map per target (backbone x method x class); every figure of "
                    "`fishertune plot`, the training-loss curves included; and each cell's provenance (config, "
                    "commit, versions, device, wall time, peak memory, kept model) one click away. No server and "
                    "no network: styles, script and figures are inside the page.")
    report.add_argument("--results", default=DEFAULT_RESULTS, metavar="DIR",
                        help="a results root or one results folder (default: %(default)s)")
    report.add_argument("--out", default="results/report", metavar="DIR", help="where the pages go "
                        "(default: %(default)s)")
    report.set_defaults(func=_cmd_report)

    status = sub.add_parser(
        "status", help="list a manifest's cells as done, running, failed or pending",
        description="For every cell of MANIFEST: done (with its mIoU), running (who holds its lock: host, "
                    "process, since when, last heartbeat; and its last checkpoint), failed (the reason, the "
                    "iteration, the last finite loss) or pending (with the iteration of a checkpoint to resume "
                    "from, if any). Reads RESULTS/<results name>/ only; changes nothing.")
    status.add_argument("manifest", help="YAML manifest, e.g. benchmarks/table1.yaml")
    status.add_argument("--results", default=DEFAULT_RESULTS, help="results root (default: %(default)s)")
    status.add_argument("--only", nargs="+", metavar="PATTERN", help="only cells whose id or row matches a glob")
    _subset_arg(status)
    _seeds_arg(status)
    _tiny_arg(status)
    status.set_defaults(func=_cmd_status)

    reg = sub.add_parser(
        "regression", help="check or update the stored numbers of small manifests (CI regression)",
        description="check: compare the finished cells of each MANIFEST with the numbers stored in "
                    "results/regression/<results name>.json: per row and target the mIoU, and the per-class IoU of "
                    "the stable classes, as means over the seeds both ran; exit 1 when one moved beyond its stored "
                    "band, or a row is new, gone or changed. update (alias write): store the finished cells' numbers "
                    "on purpose with what made them, listing what moved; with --spread, the bands come from how "
                    "much the same cells move in those other environments (see fishertune/report/regression.py). "
                    "With --run the pending cells run first. `tox -e regression` checks the mini manifests.")
    reg.add_argument("action", choices=("check", "update", "write"))
    reg.add_argument("manifest", nargs="+", help="YAML manifest(s), e.g. benchmarks/mini/table1.yaml")
    reg.add_argument("--run", action="store_true", help="run the pending cells first (finished ones are skipped)")
    reg.add_argument("--results", default=DEFAULT_RESULTS, help="results root (default: %(default)s)")
    reg.add_argument("--stored", help="regression file (default: results/regression/<results name>.json; one "
                     "manifest only)")
    reg.add_argument("--spread", nargs="+", metavar="DIR|FILE",
                     help="update: results roots holding the same cells run in other environments (another "
                          "execution.threads, another torch minor version, another CPU), or a stored record of the "
                          "same manifest made elsewhere (e.g. from `git show REV:results/regression/...json`: "
                          "its per-seed values for the cells whose ids are unchanged); the bands are measured "
                          "from them (without: from the spread over seeds)")
    reg.add_argument("--bands-from", metavar="FILE",
                     help="update: for statistics without a measured spread, the pooled spread of another "
                          "manifest's stored numbers of the same protocol, e.g. results/regression/mini-table1.json")
    _execution_args(reg)
    _cell_args(reg, "with --run: override the manifest's execution.device")
    _subset_arg(reg)
    _seeds_arg(reg)
    _tiny_arg(reg)
    reg.set_defaults(func=_cmd_regression)
    return p


def one_line(text: str) -> str:
    """A message as one plain line: terminal colour codes (some libraries' errors carry them) and line
    breaks removed."""
    import re

    return " ".join(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for what records its command
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, rather than at exit
        return code
    except UserError as e:
        print(f"fishertune: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fishertune: interrupted; finished cells are kept, rerun the same command to continue", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`fishertune status M | head -1`): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit must not fail
        return 141  # as a program killed by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
