"""Render result JSONs into the paper's tables: Markdown (tabulate) and LaTeX (booktabs, pandas Styler).

Table 1 is laid out like the paper: backbone, method, trainable parameters, Citys, BDD, Map, Avg.
Every number cell reads ``ours / paper (ours - paper)``; the parameter cell ``ours / printed`` in
millions (backbone side, the paper's column). Rows the paper lacks show ``-`` for the paper's side.
The caption names the data set (real or the generated miniature) and the manifest version; results
of different manifest versions or data kinds are never mixed in one table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from fishertune.backbones import BACKBONES
from fishertune.errors import UserError
from fishertune.report.paper import METHOD_ORDER, PAPER_BACKBONE, inconsistent_average, paper_row, paper_table
from fishertune.report.params import parameter_rows
from fishertune.report.stats import LEVEL, TEST_NAME, Estimate, estimate, welch
from fishertune.runner.manifest import results_name
from fishertune.runner.store import atomic_write_text, iter_results

#: Table 1's targets: result key, short key, column title
TABLE1_TARGETS = (("cityscapes", "citys", "Citys"), ("bdd100k", "bdd", "BDD"), ("mapillary", "map", "Map"))
DATA_KIND = {"miniature": "the generated miniature (tiny foundation models pretrained by the suite, synthetic "
                           "scenes; NOT comparable to the paper)",
             "real": "the real data sets"}


def miniature_counts(data: dict[str, Any]) -> str:
    """``synth seed 0, 200 source / 50 target images``: a miniature cell's ``config.data`` in words."""
    train = data.get("synth_train_images", 2 * data["synth_images"])
    looks = f", {data['synth_looks']} looks" if data.get("synth_looks", "class") != "class" else ""
    return f"synth seed {data['synth_seed']}, {train} source / {data['synth_images']} target images per split{looks}"


def _fmt(ours: float | None, paper: float | None, mark: str = "", est: Estimate | None = None) -> str:
    """``ours / paper (ours - paper)``; ``ours`` as ``mean ± std`` when ``est`` holds several seeds."""
    left = "not run" if ours is None else (est.format(n=False) if est is not None and est.n > 1 else f"{ours:.1f}")
    if paper is None:
        return f"{left} / -"
    delta = "" if ours is None else f" ({ours - paper:+.1f})"
    return f"{left} / {paper:.1f}{mark}{delta}"


def merge_seeds(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per grid row (backbone and row) over its finished seeds, shaped like a result: every
    mIoU and per-class IoU the mean over the seeds (a class absent in some seed averages where present),
    with ``seeds`` (their list) and ``estimates`` (an :class:`~fishertune.report.stats.Estimate` of the
    aggregate and of each target's mIoU) added. A one-seed row is its result plus those two keys."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["backbone"], r["row"]), []).append(r)
    merged = []
    for members in groups.values():
        members = sorted(members, key=lambda r: r.get("seed", 0))
        first = members[0]
        shared = [t for t in first["targets"] if all(t in r["targets"] for r in members)]
        targets = {}
        for t in shared:
            per_class = {}
            for c in first["targets"][t]["per_class_iou"]:
                values = [r["targets"][t]["per_class_iou"].get(c) for r in members]
                values = [v for v in values if v is not None]
                per_class[c] = sum(values) / len(values) if values else None
            est = estimate(r["targets"][t]["miou"] for r in members)
            targets[t] = {**first["targets"][t], "miou": est.mean, "per_class_iou": per_class}
        estimates = {t: estimate(r["targets"][t]["miou"] for r in members) for t in shared}
        estimates["aggregate"] = estimate(r["aggregate"]["miou"] for r in members)
        merged.append({**first, "targets": targets, "aggregate": {**first["aggregate"],
                                                                  "miou": estimates["aggregate"].mean},
                       "seeds": [r.get("seed") for r in members], "estimates": estimates})
    return merged


def seeds_note(results: list[dict[str, Any]], reference: str | None = None) -> str:
    """The caption's sentence on seeds and the comparison column (empty for one seed and no comparison);
    ``results`` one per seed and row, as read."""
    rows: dict[tuple[str, str], int] = {}
    for r in results:
        rows[(r["backbone"], r["row"])] = rows.get((r["backbone"], r["row"]), 0) + 1
    counts = sorted(set(rows.values()))
    text = ""
    if counts != [1]:
        n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
        text += f" Each number is the mean over {n} finished seeds (± their standard deviation; column n)."
    if reference:
        text += (f" Δ vs {reference}: Avg minus the backbone's {reference} row, with its {LEVEL:.0%} interval by "
                 f"{TEST_NAME}; 'within noise' when the interval holds 0 (n=1: not tested).")
    return text


def compare_to_reference(merged: list[dict[str, Any]], reference: str) -> dict[tuple[str, str], str]:
    """``(backbone, row) -> "Δ Avg [interval] verdict"`` against the backbone's ``reference`` row."""
    refs = {r["backbone"]: r for r in merged if r["row"] == reference}
    out = {}
    for r in merged:
        ref = refs.get(r["backbone"])
        if r["row"] == reference:
            out[(r["backbone"], r["row"])] = "reference"
        elif ref is None:
            out[(r["backbone"], r["row"])] = "-"
        else:
            out[(r["backbone"], r["row"])] = welch(r["estimates"]["aggregate"], ref["estimates"]["aggregate"]).format()
    return out


def _config_key(r: dict[str, Any]) -> str:
    """A result's cell configuration without its seed: the seeds of one row share it."""
    return json.dumps({k: v for k, v in r.get("config", {}).items() if k != "seed"}, sort_keys=True, default=str)


def latest_configs(found: list[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per grid row (manifest, backbone, row), the results of the configuration whose newest file is the
    newest: a method's config or the protocol changed since older cells of that row ran (other cell ids,
    same row), and averaging them over "seeds" would mix two experiments. What is left out is said on
    stderr, one line per row."""
    rows: dict[tuple, dict[str, list[tuple[float, dict[str, Any]]]]] = {}
    for path, r in found:
        key = (r["manifest"]["name"], r["backbone"], r["row"])
        rows.setdefault(key, {}).setdefault(_config_key(r), []).append((path.stat().st_mtime, r))
    kept = []
    for (name, backbone, row), configs in rows.items():
        ordered = sorted(configs.values(), key=lambda members: max(t for t, _ in members))
        kept += [r for _, r in ordered[-1]]
        stale = [r["cell_id"] for members in ordered[:-1] for _, r in members]
        if stale:
            print(f"{name} {backbone} {row}: left out {len(stale)} older result(s) of another configuration "
                  f"({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}); delete them, or keep each "
                  f"configuration's runs under its own --results", file=sys.stderr)
    return kept


def load_table_results(results: str | Path, table: str, manifest: str | None = None) -> list[dict[str, Any]]:
    """Results of ``table`` under ``results``, one configuration per row (:func:`latest_configs`); refuses to
    mix manifests, versions or data kinds."""
    found = latest_configs([(path, r) for path, r in iter_results(results)
                            if r.get("manifest", {}).get("table") == table
                            and (manifest is None or r["manifest"]["name"] == manifest)
                            and r.get("status", "done") == "done"])  # failed cells are shown as not run
    if not found:
        which = f" from manifest {manifest!r}" if manifest else ""
        raise UserError(f"no finished {table} cells{which} under {results}; run `fishertune run benchmarks/{table}.yaml` first")
    kinds = {(r["manifest"]["name"], r["manifest"]["version"], r["manifest"]["data_kind"],
              r["manifest"].get("data_subset") or 0, bool(r["manifest"].get("tiny")),
              r["manifest"].get("data_counts", "official")) for r in found}
    if len(kinds) > 1:
        listed = ", ".join(f"{n} v{v} ({k}{f', subset {sub}' if sub else ''}{', tiny' if tiny else ''}"
                           f"{', any counts' if counts == 'any' else ''})"
                           for n, v, k, sub, tiny, counts in sorted(kinds))
        raise UserError(f"{results} holds {table} results of several manifests or versions ({listed}); "
                        f"pick one with --manifest NAME or point --results at one manifest's directory")
    return found


def _order(r: dict[str, Any], backbones: list[str]) -> tuple:
    m = r["method"]
    return (backbones.index(r["backbone"]), METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), r["row"])


def table1_frame(results: list[dict[str, Any]], reference: str | None = "full") -> tuple[pd.DataFrame, list[str]]:
    """The Table 1 frame (index: backbone, method) and its footnotes: one row per grid row over its seeds
    (:func:`merge_seeds`), with a column of the difference to each backbone's ``reference`` row."""
    results = merge_seeds(results)
    several = any(len(r["seeds"]) > 1 for r in results)
    reference = reference if reference in {r["row"] for r in results} else None
    versus = compare_to_reference(results, reference) if reference else {}
    family_rank = {f: i for i, f in enumerate(PAPER_BACKBONE)}  # the paper's order: CLIP, MAE, SAM, EVA02, DINOv2
    backbones = sorted({r["backbone"] for r in results},
                       key=lambda b: (family_rank.get(BACKBONES.get(b).family, len(family_rank)), b))
    rows, notes = [], []
    for r in sorted(results, key=lambda r: _order(r, backbones)):
        family = BACKBONES.get(r["backbone"]).family
        paper = paper_row("table1", family, r["method"]) if r["row"] == r["method"] else None
        params = r["params"]["backbone_trainable"] / 1e6
        row = {"Backbone": r["backbone"], "Method": r["row"],
               "Params (M)": f"{params:.2f} / {paper['trainable_params_m']:.2f}" if paper else f"{params:.2f} / -"}
        for key, pkey, col in TABLE1_TARGETS:
            ours = r["targets"].get(key, {}).get("miou")
            row[col] = _fmt(ours, paper[pkey] if paper else None, est=r["estimates"].get(key))
        mark = ""
        if paper and (true_mean := inconsistent_average(paper)) is not None:
            mark = "*"
            notes.append(f"* {paper['backbone']} {paper['method']}: the paper prints Avg {paper['avg']:.1f}, "
                         f"but the mean of its three targets is {true_mean:.2f}.")
        row["Avg"] = _fmt(r["aggregate"]["miou"], paper["avg"] if paper else None, mark, r["estimates"]["aggregate"])
        if several:
            row["n"] = str(len(r["seeds"]))
        if reference:
            row[f"Δ vs {reference}"] = versus[(r["backbone"], r["row"])]
        rows.append(row)
    return pd.DataFrame(rows).set_index(["Backbone", "Method"]), notes


def output_name(results: list[dict[str, Any]]) -> str:
    """The folder name of these results' tables and plots: their results folder's
    (:func:`~fishertune.runner.manifest.results_name`: the manifest's name, ``-tiny``, ``-subsetN``,
    ``-anycount``), so that no two manifests, nor a subset or tiny run and a full one, share a table."""
    man = results[0]["manifest"]
    return results_name(man["name"], bool(man.get("tiny")), man.get("data_subset"),
                        man.get("data_counts") == "any")


def table_dir(results: list[dict[str, Any]], out_dir: str | Path | None = None) -> Path:
    """Where a table of ``results`` goes: ``out_dir`` if given, else ``results/tables/<output name>/``
    (:func:`output_name`), as the plots go to ``results/plots/<output name>/``."""
    return Path(out_dir) if out_dir else Path("results") / "tables" / output_name(results)


def caption(table: str, results: list[dict[str, Any]], reference: str | None = None) -> str:
    """The table's title: what it shows, what each cell reads, the data and manifest; with several seeds
    or a ``reference`` row, how the seeds are summarised and compared."""
    r = results[0]
    man = r["manifest"]
    data = DATA_KIND[man["data_kind"]]
    if man["data_kind"] == "miniature":
        cfg = r["config"]["data"]
        data += f", {miniature_counts(cfg)}"
    elif man.get("data_generated"):
        data = "generated data sets in the real layouts (written by fishertune data synth; NOT the real data)"
    if man.get("tiny"):
        data = ("TINY OVERRIDE (--tiny): every backbone replaced by its family's tiny foundation model "
                "(pretrained by the suite), on the miniature protocol; a check of the pipeline, NOT comparable to the paper; "
                f"read from {data}")
    if man.get("data_subset"):
        data += (f"; SUBSET: {man['data_subset']} class-balanced images of the source and of each target "
                 "(not the full sets)")
    if man.get("data_counts") == "any":
        data += f"; OTHER COUNTS than the official ones (data.counts: any): {counts_used(r)}"
    titles = {"table1": "GTAV -> Cityscapes, BDD100K, Mapillary; mIoU (%)",
              "table2": f"{_route(r)}; per-class IoU and mIoU (%)",
              "ablation": "parameter selection at the same budget (FisherTune's ablation), "
                          f"{_route(r)}; mIoU (%)",
              "estimation": f"direct vs variational estimation of FIM and DR-FIM, {_route(r)}; mIoU (%)"}
    number = table.removeprefix("table")
    name = f"Table {number}" if number.isdigit() else table.capitalize()
    cells = {"table1": "each cell ours / paper (ours - paper); trainable backbone parameters ours / printed",
             "table2": "per method three rows: ours, paper, ours - paper (trainable backbone parameters in "
                       "millions likewise: ours, printed, difference)",
             "ablation": "each cell ours / paper (ours - paper); our trainable backbone parameters",
             "estimation": "each cell ours / - (the paper shows this comparison without numbers); our "
                           "trainable backbone parameters"}
    return (f"{name}: {titles.get(table, table)}, {cells.get(table, cells['table1'])}."
            f"{seeds_note(results, reference)} Data: {data}. Manifest {man['name']} v{man['version']}.")


def counts_used(r: dict[str, Any]) -> str:
    """The images a result trained and was evaluated on, e.g. ``gtav 24 train, cityscapes 12 val, ...``."""
    used = [f"{r['config']['source']} {r['train']['source_images']} train"] if "train" in r else []
    used += [f"{t} {v['num_images']} val" for t, v in r["targets"].items()]
    return ", ".join(used)


def _route(r: dict[str, Any]) -> str:
    names = {"gtav": "GTAV", "cityscapes": "Cityscapes", "bdd100k": "BDD100K", "mapillary": "Mapillary", "acdc": "ACDC"}
    return f"{names[r['config']['source']]} -> {', '.join(names[t] for t in r['config']['targets'])}"


def to_markdown(df: pd.DataFrame, title: str, notes: list[str]) -> str:
    body = _blank_repeats(df, df.index.names[0]).to_markdown(index=False, disable_numparse=True)
    foot = "".join(f"\n{n}" for n in notes)
    return f"{title}\n\n{body}\n{foot}\n" if notes else f"{title}\n\n{body}\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "%": r"\%", "&": r"\&", "#": r"\#", "_": r"\_", "$": r"\$",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    return out.replace("->", r"$\rightarrow$").replace("±", r"$\pm$").replace("Δ", r"$\Delta$")


def _blank_repeats(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """The paper's look: a backbone's name only on the first row of its block."""
    flat = df.reset_index()
    flat.loc[flat[column].duplicated(), column] = ""
    return flat


def to_latex(df: pd.DataFrame, title: str, notes: list[str], label: str) -> str:
    flat = _blank_repeats(df, df.index.names[0])
    styler = flat.style.hide(axis="index").format(latex_escape).format_index(latex_escape, axis=1)
    text = styler.to_latex(hrules=True, caption=latex_escape(title), label=f"tab:{label}", position_float="centering")
    if notes:
        foot = "\n".join(r"\par\footnotesize " + latex_escape(n).replace("*", r"$^*$", 1) for n in notes)
        text = text.replace(r"\end{table}", foot + "\n" + r"\end{table}")
    return text


def render_table1(results_dir: str | Path, out_dir: str | Path | None = None, manifest: str | None = None,
                  reference: str | None = "full") -> list[Path]:
    """Write ``table1.md`` and ``table1.tex`` in :func:`table_dir`."""
    results = load_table_results(results_dir, "table1", manifest)
    df, notes = table1_frame(results, reference)
    title = caption("table1", results, reference if reference in {r["row"] for r in results} else None)
    return write_table("table1", table_dir(results, out_dir), to_markdown(df, title, notes),
                       to_latex(df, title, notes, "table1"))


def write_table(stem: str, out: Path, markdown: str, latex: str) -> list[Path]:
    """``<out>/<stem>.md`` and ``.tex``, each written atomically."""
    md, tex = out / f"{stem}.md", out / f"{stem}.tex"
    atomic_write_text(md, markdown)
    atomic_write_text(tex, latex)
    return [md, tex]


#: row order inside a FisherTune block of the ablation and estimation grids (the paper's ablation order)
SELECTOR_ORDER = ("random", "random_q", "random_k", "random_v", "fim", "delta_fim", "dr_fim")
#: our target -> the column of results/paper/ablation.csv (the ablation's source is Cityscapes)
ABLATION_COLUMNS = {"bdd100k": "citys_to_bdd", "acdc": "citys_to_acdc"}
SHORT = {"cityscapes": "Citys", "bdd100k": "BDD", "mapillary": "Map", "acdc": "ACDC"}


def _grid_order(r: dict[str, Any], backbones: list[str]) -> tuple:
    cfg = r["config"]["method_config"]
    sel = cfg.get("selector")
    return (*_order(r, backbones)[:2], SELECTOR_ORDER.index(sel) if sel in SELECTOR_ORDER else -1,
            cfg.get("estimator", ""), r["row"])


def _ablation_paper(family: str, row: str) -> dict | None:
    df = paper_table("ablation")
    hit = df[(df.backbone == PAPER_BACKBONE.get(family)) & (df.selector == row)]
    return None if hit.empty else hit.iloc[0].to_dict()


#: the ablation's claims: DR-FIM against each of these rows, at the same budget
ABLATION_CLAIMS = ("random", "fim", "delta_fim")


def grid_frame(results: list[dict[str, Any]], table: str, reference: str | None = "full"
               ) -> tuple[pd.DataFrame, list[str]]:
    """The ablation / estimation grid (index: backbone, row): one column per target and their mean, the
    paper's number beside ours where ``results/paper/ablation.csv`` has the row (ablation only); rows over
    their seeds (:func:`merge_seeds`) with the difference to each backbone's ``reference`` row. The
    ablation's notes answer its claims: DR-FIM against random, FIM and delta-FIM, each with its interval."""
    results = merge_seeds(results)
    several = any(len(r["seeds"]) > 1 for r in results)
    rows_present = {r["row"] for r in results}
    reference = reference if reference in rows_present else None
    versus = compare_to_reference(results, reference) if reference else {}
    family_rank = {f: i for i, f in enumerate(PAPER_BACKBONE)}
    backbones = sorted({r["backbone"] for r in results},
                       key=lambda b: (family_rank.get(BACKBONES.get(b).family, len(family_rank)), b))
    targets = list(results[0]["config"]["targets"])
    rows = []
    for r in sorted(results, key=lambda r: _grid_order(r, backbones)):
        family = BACKBONES.get(r["backbone"]).family
        paper = _ablation_paper(family, r["row"]) if table == "ablation" else None
        row = {"Backbone": r["backbone"], "Row": r["row"],
               "Params (M)": f"{r['params']['backbone_trainable'] / 1e6:.2f}"}
        paper_values = []
        for t in targets:
            p = paper.get(ABLATION_COLUMNS.get(t, ""), None) if paper else None
            p = None if p is None or pd.isna(p) else float(p)
            paper_values.append(p)
            row[SHORT[t]] = _fmt(r["targets"].get(t, {}).get("miou"), p, est=r["estimates"].get(t))
        paper_avg = sum(paper_values) / len(paper_values) if None not in paper_values else None
        row["Avg"] = _fmt(r["aggregate"]["miou"], paper_avg, est=r["estimates"]["aggregate"])
        if several:
            row["n"] = str(len(r["seeds"]))
        if reference:
            row[f"Δ vs {reference}"] = versus[(r["backbone"], r["row"])]
        rows.append(row)
    notes = ["Paper Avg: the mean of the paper's printed targets (the paper prints no average here)."] \
        if table == "ablation" else []
    if table == "ablation":
        by_key = {(r["backbone"], r["row"]): r for r in results}
        for backbone in backbones:
            dr = by_key.get((backbone, "dr_fim"))
            if dr is None:
                continue
            for other in ABLATION_CLAIMS:
                if (backbone, other) in by_key:
                    d = welch(dr["estimates"]["aggregate"], by_key[(backbone, other)]["estimates"]["aggregate"])
                    notes.append(f"{backbone}: DR-FIM - {other}, Avg: {d.format()} ({TEST_NAME}, {LEVEL:.0%}; "
                                 f"{d.n[0]} and {d.n[1]} seeds).")
    return pd.DataFrame(rows).set_index(["Backbone", "Row"]), notes


def render_grid(table: str, results_dir: str | Path, out_dir: str | Path | None = None,
                manifest: str | None = None, reference: str | None = "full") -> list[Path]:
    """Write ``<table>.md`` and ``.tex`` for the ablation or estimation grid in :func:`table_dir`."""
    results = load_table_results(results_dir, table, manifest)
    df, notes = grid_frame(results, table, reference)
    present = {r["row"] for r in results}
    title = caption(table, results, reference if reference in present else None)
    return write_table(table, table_dir(results, out_dir), to_markdown(df, title, notes),
                       to_latex(df, title, notes, table))


#: our full-size variant standing for each of the paper's Table 1 backbones (MAE: Rein's ViT-L runs)
PAPER_VARIANT = {"clip-vit-l": "clip-l", "mae-vit-h": "mae-l", "sam-vit-h": "sam-h", "eva02-l": "eva02-l",
                 "dinov2-l": "dinov2-l"}


def table1_paper_frame() -> tuple[pd.DataFrame, list[str]]:
    """Table 1 with no runs: every row of the paper (its numbers, each cell ``not run / paper``) and the
    trainable-parameter counts we measure for the variant of that row (``ours / printed``)."""
    paper = paper_table("table1")
    variants = [PAPER_VARIANT[b] for b in dict.fromkeys(paper.backbone)]
    methods = [m for m in dict.fromkeys(paper.method)]
    counts = {(r["backbone"], r["method"]): r["backbone_trainable"]
              for r in parameter_rows(variants, [m for m in methods if m in METHOD_ORDER])}
    rows, notes = [], []
    for p in paper.to_dict("records"):
        variant = PAPER_VARIANT[p["backbone"]]
        ours = counts.get((variant, p["method"]))
        row = {"Backbone": variant, "Method": p["method"],
               "Params (M)": f"{'-' if ours is None else f'{ours / 1e6:.2f}'} / {p['trainable_params_m']:.2f}"}
        for _, pkey, col in TABLE1_TARGETS:
            row[col] = _fmt(None, p[pkey])
        mark = ""
        if (true_mean := inconsistent_average(p)) is not None:
            mark = "*"
            notes.append(f"* {p['backbone']} {p['method']}: the paper prints Avg {p['avg']:.1f}, "
                         f"but the mean of its three targets is {true_mean:.2f}.")
        row["Avg"] = _fmt(None, p["avg"], mark)
        rows.append(row)
    return pd.DataFrame(rows).set_index(["Backbone", "Method"]), notes


def render_table1_paper(out_dir: str | Path | None = None) -> list[Path]:
    """Write ``table1-paper.md`` and ``.tex``: the paper's Table 1 before any run (what a reproduction
    will fill), with our measured parameter counts beside the printed ones."""
    df, notes = table1_paper_frame()
    title = ("Table 1 (paper only, nothing run yet): GTAV -> Cityscapes, BDD100K, Mapillary; mIoU (%), each "
             "cell ours / paper; trainable backbone parameters ours (measured on the architecture, "
             "fishertune params) / printed. Source: results/paper/table1.csv.")
    out = Path(out_dir) if out_dir else Path("results") / "tables"
    md, tex = out / "table1-paper.md", out / "table1-paper.tex"
    atomic_write_text(md, to_markdown(df, title, notes))
    atomic_write_text(tex, to_latex(df, title, notes, "table1-paper"))
    return [md, tex]


#: each table's data, ``results -> (frame, footnotes)``, as its renderer lays it out (`fishertune report` too)
FRAMES = {"table1": table1_frame,
          "ablation": lambda results: grid_frame(results, "ablation"),
          "estimation": lambda results: grid_frame(results, "estimation"),
          "table2": lambda results: __import__("fishertune.report.table2", fromlist=["table2_frame"]).table2_frame(
              results)}

RENDERERS = {"table1": render_table1,
             "ablation": lambda *a, **k: render_grid("ablation", *a, **k),
             "estimation": lambda *a, **k: render_grid("estimation", *a, **k),
             # imported lazily: table2 imports this module
             "table2": lambda *a, **k: __import__("fishertune.report.table2", fromlist=["render_table2"]).render_table2(
                 *a, **k)}
