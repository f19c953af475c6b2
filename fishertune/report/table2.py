"""Render Table 2 (per-class IoU, Cityscapes -> BDD100K and ACDC) with the paper's rows beside ours.

Laid out like the paper's Table 2: one block per target (BDD100K, then ACDC), within it one block per
backbone (the paper's order), within that the methods (``METHOD_ORDER``, then labelled rows). Each
method takes three rows: ``ours``, ``paper`` and ``ours - paper``, over the trainable backbone
parameters (millions), the 19 classes and the mIoU. A row the paper lacks shows ``-`` on its paper and
difference rows; a cell (or a target of a cell) not run shows ``not run``; a class absent from the
target (IoU null) shows ``n/a``. The paper's rows are those of ``results/paper/table2.csv`` for the
family of our backbone (``PAPER_BACKBONE``) and a method run under its own name (labelled rows get none);
a paper row whose cell we have not run is shown with ``not run`` on our side.

Footnotes flag the paper's own inconsistencies: a row whose printed mIoU differs from the mean of its
19 printed classes by more than ``TOLERANCE_CLASS_MEAN`` (computed here), and the EVA02-L
Cityscapes -> BDD100K block whose method labels the slides shift by one row (results/paper/README.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from fishertune.backbones import BACKBONES
from fishertune.data import CLASSES
from fishertune.report.paper import PAPER_BACKBONE, paper_table
from fishertune.report.stats import Estimate
from fishertune.report.tables import (METHOD_ORDER, SHORT, caption, latex_escape, load_table_results, merge_seeds,
                                      table_dir, to_latex, to_markdown, write_table)

#: the paper's column headers (Rein's and FisherTune's Table 2 abbreviations), in train-id order
CLASS_HEADERS = ("Road", "S.walk", "Build.", "Wall", "Fence", "Pole", "Tr.Light", "Tr.Sign", "Veget.",
                 "Terrain", "Sky", "Person", "Rider", "Car", "Truck", "Bus", "Train", "M.bike", "Bike")
#: our class name -> the column of results/paper/table2.csv
PAPER_COLUMN = {c: c.replace(" ", "_") for c in CLASSES}
#: the paper's target order
TARGET_ORDER = ("bdd100k", "acdc")
TARGET_NAMES = {"cityscapes": "Cityscapes", "bdd100k": "BDD100K", "mapillary": "Mapillary", "acdc": "ACDC"}
#: a printed mIoU farther than this from the mean of the row's 19 printed classes is flagged
TOLERANCE_CLASS_MEAN = 0.05
ROWS = ("ours", "paper", "ours - paper")
#: (target, paper backbone) blocks whose method labels results/paper/README.md corrected
RELABELLED = {("bdd100k", "eva02-l"):
              "+ EVA02-L, Cityscapes -> BDD100K: the paper's slides shift this block's method labels by one row; "
              "the labels here follow the parameter counts and the ablation grid (see results/paper/README.md)."}
INDEX = ["Target", "Backbone", "Method", "Row"]


def _num(v: float | None, signed: bool = False) -> str:
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def _paper_rows(target: str, family: str) -> dict[str, dict]:
    df = paper_table("table2")
    hit = df[(df.target == target) & (df.backbone == PAPER_BACKBONE.get(family))]
    return {r["method"]: r for r in hit.to_dict("records")}


def class_mean_mismatch(p: dict) -> float | None:
    """The mean of the paper row's 19 classes when its printed mIoU differs from it by more than
    ``TOLERANCE_CLASS_MEAN``, else None."""
    mean = sum(float(p[PAPER_COLUMN[c]]) for c in CLASSES) / len(CLASSES)
    return mean if abs(mean - float(p["miou"])) > TOLERANCE_CLASS_MEAN else None


def _three_rows(ours: dict | None, paper: dict | None, params: float | None, marks: dict[str, str],
                est: Estimate | None = None) -> list[dict]:
    """The ours / paper / difference rows of one method in one target block (values as strings); with
    several seeds (``est``), our mIoU as ``mean ± std``."""
    run = ours is not None
    o_row = {"Params (M)": "not run" if params is None else f"{params:.2f}"}
    p_row = {"Params (M)": "-" if paper is None else f"{float(paper['trainable_params_m']):.2f}"}
    d_row = {"Params (M)": "-" if paper is None or params is None else
             f"{params - float(paper['trainable_params_m']):+.2f}"}
    cols = [(h, c) for h, c in zip(CLASS_HEADERS, CLASSES)] + [("mIoU", None)]
    for header, cls in cols:
        if not run:
            o = None
        elif cls is None:
            o = ours["miou"]
        else:
            o = ours["per_class_iou"].get(cls)
        p = None if paper is None else float(paper["miou" if cls is None else PAPER_COLUMN[cls]])
        absent = run and o is None  # a class with no pixels in the target (IoU null)
        o_row[header] = "not run" if not run else ("n/a" if absent else _num(o))
        if run and cls is None and est is not None and est.n > 1:
            o_row[header] = est.format(n=False)
        p_row[header] = "-" if p is None else _num(p) + marks.get(header, "")
        d_row[header] = "-" if p is None or not run else ("n/a" if absent else _num(o - p, signed=True))
    return [o_row, p_row, d_row]


def table2_frame(results: list[dict[str, Any]]) -> tuple[pd.DataFrame, list[str]]:
    """The Table 2 frame (index: target, backbone, method, row; row one of ``ROWS``) and its footnotes; a
    method's numbers are the means over its finished seeds (per class too; see ``merge_seeds``)."""
    results = merge_seeds(results)
    paper_order = list(dict.fromkeys(paper_table("table2").backbone))  # the paper's backbone order
    family_of = {PAPER_BACKBONE[f]: f for f in PAPER_BACKBONE}
    rank = {family_of[b]: i for i, b in enumerate(paper_order)}
    rank.update({f: len(rank) + i for i, f in enumerate(f for f in PAPER_BACKBONE if f not in rank)})
    backbones = sorted({r["backbone"] for r in results},
                       key=lambda b: (rank.get(BACKBONES.get(b).family, len(rank)), b))
    wanted = list(dict.fromkeys(t for r in results for t in r["config"]["targets"]))
    targets = [t for t in TARGET_ORDER if t in wanted] + [t for t in wanted if t not in TARGET_ORDER]

    def method_key(method: str, row: str) -> tuple:
        return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method != row, row)

    rows, mismatch_notes, relabel = [], [], []
    for target in targets:
        for backbone in backbones:
            family = BACKBONES.get(backbone).family
            papers = _paper_rows(target, family)
            mine = {r["row"]: r for r in results if r["backbone"] == backbone}
            entries = {row: (r["method"], r) for row, r in mine.items()}
            entries.update({m: (m, None) for m in papers if m not in entries})  # paper rows not run
            for row in sorted(entries, key=lambda k: method_key(entries[k][0], k)):
                method, r = entries[row]
                paper = papers.get(method) if method == row else None
                marks = {}
                if paper is not None:
                    if (mean := class_mean_mismatch(paper)) is not None:
                        marks["mIoU"] = "*"
                        mismatch_notes.append(
                            f"* {TARGET_NAMES.get(target, target)} {paper['backbone']} {paper['method']}: the paper "
                            f"prints mIoU {float(paper['miou']):.1f}, but the mean of its 19 classes is {mean:.2f}.")
                    if (target, paper["backbone"]) in RELABELLED:
                        marks["mIoU"] = marks.get("mIoU", "") + "+"
                        relabel.append(RELABELLED[(target, paper["backbone"])])
                ours = None if r is None else r["targets"].get(target)
                params = None if r is None else r["params"]["backbone_trainable"] / 1e6
                est = None if r is None else r["estimates"].get(target)
                three = _three_rows(ours, paper, params, marks, est)
                for kind, values in zip(ROWS, three):
                    rows.append({"Target": target, "Backbone": backbone, "Method": row, "Row": kind} | values)
    notes = mismatch_notes + list(dict.fromkeys(relabel))
    if any(len(r["seeds"]) > 1 for r in results):
        notes.append("ours: the mean over the finished seeds of each class's IoU and of the mIoU (± the standard "
                     "deviation of the mIoU over seeds).")
    if "acdc" in targets:
        conditions = sorted({g for r in results for g in r["targets"].get("acdc", {}).get("groups", {})})
        which = f" ({', '.join(conditions)})" if conditions else ""
        notes.append(f"ACDC: per-class IoU and mIoU are the means over its conditions{which}, as Rein reports.")
    return pd.DataFrame(rows).set_index(INDEX), notes


def _display(df: pd.DataFrame) -> pd.DataFrame:
    """The paper's look: each backbone and method name only on the first row of its block; targets by
    their short name (the first column, blanked within a block by ``to_markdown`` / ``to_latex``)."""
    flat = df.reset_index()
    flat["Target"] = [SHORT.get(t, t) for t in flat["Target"]]
    first_backbone = ~flat.duplicated(["Target", "Backbone"])
    first_method = ~flat.duplicated(["Target", "Backbone", "Method"])
    flat.loc[~first_backbone, "Backbone"] = ""
    flat.loc[~first_method, "Method"] = ""
    flat = flat.rename(columns={"Row": ""})
    return flat.set_index(["Target", "Backbone", "Method", ""])


def _markdown(df: pd.DataFrame, title: str, notes: list[str]) -> str:
    """One Markdown table per target, under the caption; the footnotes at the end."""
    blocks = []
    for target in dict.fromkeys(df.index.get_level_values("Target")):
        part = _display(df.xs(target, level="Target", drop_level=False)).droplevel("Target")
        heading = f"**{TARGET_NAMES.get(target, target)}**"
        blocks.append(to_markdown(part, heading, []).rstrip("\n"))
    foot = "".join(f"\n{n}" for n in notes)
    return f"{title}\n\n" + "\n\n".join(blocks) + "\n" + (f"{foot}\n" if notes else "")


def _latex(df: pd.DataFrame, title: str, notes: list[str]) -> str:
    """One booktabs table, the targets as blocks (a rule between them), scaled to the text width."""
    shown = _display(df)
    text = to_latex(shown, title, [], "table2")
    # a \midrule before the first row of every later target block
    lines = text.split("\n")
    starts = {latex_escape(SHORT.get(t, t)) + " &" for t in list(dict.fromkeys(df.index.get_level_values("Target")))[1:]}
    out = []
    for line in lines:
        if any(line.startswith(s) for s in starts):
            out.append(r"\midrule")
        out.append(line)
    text = "\n".join(out)
    text = text.replace(r"\begin{tabular}", r"\resizebox{\textwidth}{!}{%" + "\n" + r"\begin{tabular}")
    text = text.replace(r"\end{tabular}", r"\end{tabular}}")
    # footnote marks on the paper's numbers as superscripts (a number cell ends in * or +)
    text = re.sub(r"(\d)([*+]+)(?= &| \\\\)", lambda m: m.group(1) + "$^{" + m.group(2) + "}$", text)
    if notes:
        foot = []
        for n in notes:
            escaped = latex_escape(n)
            if n.startswith("* "):
                escaped = r"$^*$" + escaped[1:]
            elif n.startswith("+ "):
                escaped = r"$^+$" + escaped[1:]
            foot.append(r"\par\footnotesize " + escaped)
        text = text.replace(r"\end{table}", "\n".join(foot) + "\n" + r"\end{table}")
    return text


def render_table2(results_dir: str | Path, out_dir: str | Path | None = None, manifest: str | None = None,
                  reference: str | None = None) -> list[Path]:
    """Write ``table2.md`` and ``table2.tex`` where :func:`~fishertune.report.tables.table_dir` puts a table
    (``results/tables/<results name>/`` unless ``out_dir`` is given). Table 2 is per class: it has no
    comparison column (``reference`` is accepted for a uniform renderer signature and not used)."""
    results = load_table_results(results_dir, "table2", manifest)
    df, notes = table2_frame(results)
    title = caption("table2", results)
    return write_table("table2", table_dir(results, out_dir), _markdown(df, title, notes), _latex(df, title, notes))


__all__ = ["table2_frame", "render_table2", "class_mean_mismatch", "CLASS_HEADERS", "ROWS"]
