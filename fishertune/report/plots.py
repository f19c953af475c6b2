"""Figures from result JSONs: per-class IoU, mIoU against trainable parameters, training loss, predictions.

* ``per-class-<target>-<backbone>``: Table 2 results only (the paper gives per-class numbers for
  Cityscapes -> BDD100K, ACDC alone): grouped bars of our per-class IoU, one bar per method, the paper's
  value as a hollow diamond at its height over the bar of each row it has (backbone mapped by family);
  mIoU in the legend; a class without IoU (absent from labels and predictions) gets an ``x`` at the
  foot instead of a bar.
* ``miou-vs-params``: any table's results, one panel per backbone: trainable backbone parameters
  (symmetric log axis, so that freeze's 0 shows) against the mean mIoU over the targets
  (``aggregate.miou``), a labelled point per row; the paper's points (Table 1, or Table 2's mean over
  its two targets) as hollow markers where the family has paper rows.
* ``training-loss``: any table's results, one panel per backbone: each cell's training loss (the mean
  over each logging interval) against the iteration, log y, so that divergence or a flat loss shows.
* ``qualitative-<backbone>-<target>`` (the paper's Figure 2): input, ground truth and each chosen
  method's prediction for the first images of a target, in the Cityscapes palette (ignore black). It
  needs the predictions that ``fishertune run`` saves beside each result (``predictions`` entry; the
  image and ground truth are read again with the data set's reader, so labels are train ids); cells
  run before that are listed with how to get them.

Each figure is written as PNG (150 dpi) and PDF, atomically, with matplotlib's object API on an Agg
canvas (no pyplot, no global backend). Titles say the data kind (miniature / real, subset), so that a
miniature picture is never mistaken for a reproduction. Colours are fixed per method (:func:`colours`).
"""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fishertune.backbones import BACKBONES
from fishertune.data.labels import CLASSES, NUM_CLASSES, PALETTE, colourize
from fishertune.errors import UserError
from fishertune.report.paper import PAPER_BACKBONE, paper_table
from fishertune.report.tables import (DATA_KIND, METHOD_ORDER, _route, counts_used, load_table_results,
                                      miniature_counts, output_name)
from fishertune.runner.store import atomic_write, iter_results

__all__ = ["DEFAULT_METHODS", "colourize", "colours", "data_line", "plot_results", "plot_per_class",
           "plot_miou_vs_params", "plot_qualitative", "plot_training_loss", "save_figure"]

DPI = 150
DEFAULT_OUT = Path("results") / "plots"
#: the qualitative figure's methods by default (those present)
DEFAULT_METHODS = ("freeze", "rein", "fishertune")
DEFAULT_IMAGES = 3
NAMES = {"gtav": "GTAV", "cityscapes": "Cityscapes", "bdd100k": "BDD100K", "mapillary": "Mapillary", "acdc": "ACDC"}
#: one colour per method, the same in every figure (FisherTune red, Rein green, as the eye expects)
METHOD_COLOURS = {"full": "#7f7f7f", "freeze": "#1f77b4", "lora": "#ff7f0e", "adaptformer": "#9467bd",
                  "vpt": "#8c564b", "rein": "#2ca02c", "vqt": "#17becf", "childtune": "#bcbd22",
                  "fishertune": "#d62728"}
#: colours of rows that are not one of the methods above (ablation selectors, custom rows), in order
EXTRA_COLOURS = ("#e377c2", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d",
                 "#31a354", "#756bb1", "#636363", "#6baed6", "#fd8d3c", "#74c476", "#9e9ac8")

Say = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------- helpers


def colours(rows) -> dict[str, str]:
    """Row name -> colour: a method's fixed colour (:data:`METHOD_COLOURS`), other rows one of
    :data:`EXTRA_COLOURS` in sorted order."""
    out = {r: METHOD_COLOURS[r] for r in rows if r in METHOD_COLOURS}
    extra = sorted(r for r in set(rows) if r not in METHOD_COLOURS)
    out.update({r: EXTRA_COLOURS[i % len(EXTRA_COLOURS)] for i, r in enumerate(extra)})
    return out


def _family(backbone: str) -> str | None:
    try:
        return BACKBONES.get(backbone).family
    except UserError:
        return None


def _backbone_order(results: list[dict]) -> list[str]:
    rank = {f: i for i, f in enumerate(PAPER_BACKBONE)}  # the paper's order: CLIP, MAE, SAM, EVA02, DINOv2
    return sorted({r["backbone"] for r in results}, key=lambda b: (rank.get(_family(b), len(rank)), b))


def _row_order(r: dict) -> tuple:
    m = r["method"]
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), r["row"])


def data_line(results: list[dict]) -> str:
    """What the numbers were measured on, in words; miniature and subset said loudly."""
    r = results[0]
    man = r["manifest"]
    kind = man["data_kind"]
    if kind == "miniature":
        cfg = r["config"]["data"]
        text = f"MINIATURE: {DATA_KIND[kind]}, {miniature_counts(cfg)}"
    elif man.get("data_generated"):
        text = "GENERATED data in the real layouts (fishertune data synth), not the real data sets"
    else:
        text = f"REAL data: {DATA_KIND.get(kind, kind)}"
    if man.get("tiny"):
        text = f"TINY OVERRIDE (tiny random backbones, miniature protocol; not comparable to the paper); {text}"
    if man.get("data_subset"):
        text += f"; SUBSET of {man['data_subset']} images per set (not the full sets)"
    if man.get("data_counts") == "any":
        text += f"; OTHER COUNTS than the official ones: {counts_used(r)}"
    return f"{text}. Manifest {man['name']} v{man['version']}."


def save_figure(fig, stem: Path) -> list[Path]:
    """Write ``fig`` as ``stem.png`` (150 dpi) and ``stem.pdf``, each atomically; no creation date in the
    PDF, so an unchanged figure is an unchanged file."""
    paths = []
    for fmt in ("png", "pdf"):
        path = stem.with_name(f"{stem.name}.{fmt}")
        meta = {"CreationDate": None} if fmt == "pdf" else {}
        atomic_write(path, lambda tmp, fmt=fmt, meta=meta: fig.savefig(tmp, format=fmt, dpi=DPI, metadata=meta))
        paths.append(path)
    return paths


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _title(fig, what: str, results: list[dict], fontsize: float = 10) -> None:
    """The caption-like title: what is drawn, then the data it was measured on; wrapped to the figure."""
    width = int(fig.get_figwidth() * 72 / (fontsize * 0.56))
    lines = [line for text in (what, data_line(results))
             for line in textwrap.wrap(text, width, break_on_hyphens=False)]
    fig.suptitle("\n".join(lines), fontsize=fontsize)


# ------------------------------------------------------------------------------------ per-class bars


def _paper_per_class(target: str, family: str | None, method: str) -> dict | None:
    df = paper_table("table2")
    key = PAPER_BACKBONE.get(family or "")
    hit = df[(df.target == target) & (df.backbone == key) & (df.method == method)]
    return None if hit.empty else hit.iloc[0].to_dict()


def _paper_class_value(row: dict, cls: str) -> float | None:
    v = row.get(cls.replace(" ", "_"))
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def plot_per_class(results: list[dict], target: str, backbone: str, stem: Path) -> list[Path]:
    """Grouped bars of per-class IoU on ``target`` for ``backbone``: ours solid, the paper's diamonds."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = sorted((r for r in results if r["backbone"] == backbone and target in r["targets"]), key=_row_order)
    if not rows:
        return []
    colour = colours([r["row"] for r in results])
    family = _family(backbone)
    n = len(rows)
    width = 0.84 / n
    fig = _figure(max(12.0, 0.11 * NUM_CLASSES * n + 4), 5.6)
    ax = fig.add_subplot()
    x = np.arange(NUM_CLASSES)
    handles, paper_any, null_any = [], False, False
    for j, r in enumerate(rows):
        rec = r["targets"][target]
        ours = [rec["per_class_iou"].get(c) for c in CLASSES]
        pos = x - 0.42 + width * (j + 0.5)
        have = [v is not None for v in ours]
        ax.bar(pos[have], [v for v in ours if v is not None], width=width * 0.92, color=colour[r["row"]],
               edgecolor="none", zorder=2)
        missing = [p for p, h in zip(pos, have) if not h]
        if missing:
            null_any = True
            ax.plot(missing, [1.0] * len(missing), "x", color=colour[r["row"]], markersize=5, zorder=3)
        paper = _paper_per_class(target, family, r["method"]) if r["row"] == r["method"] else None
        label = f"{r['row']}: ours {rec['miou']:.1f}"
        if paper:
            paper_any = True
            vals = [_paper_class_value(paper, c) for c in CLASSES]
            keep = [v is not None for v in vals]
            ax.plot(pos[keep], [v for v in vals if v is not None], linestyle="none", marker="D", markersize=4.5,
                    markerfacecolor="white", markeredgecolor=colour[r["row"]], markeredgewidth=1.3, zorder=4)
            label += f", paper {paper['miou']:.1f}"
        handles.append(Patch(color=colour[r["row"]], label=label))
    key = []
    if paper_any:
        key.append(Line2D([], [], linestyle="none", marker="D", markerfacecolor="white", markeredgecolor="black",
                          label=f"paper ({PAPER_BACKBONE.get(family or '', '?')})"))
    if null_any:
        key.append(Line2D([], [], linestyle="none", marker="x", color="black", label="no IoU (class absent)"))
    ax.set_xticks(x, CLASSES, fontsize=8, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.6, NUM_CLASSES - 0.4)
    ax.set_ylim(0, 100)
    ax.set_ylabel("IoU (%)")
    ax.grid(axis="y", alpha=0.3, zorder=0)
    for edge in x[:-1] + 0.5:
        ax.axvline(edge, color="0.85", linewidth=0.6, zorder=1)
    ax.legend(handles=handles + key, title="mIoU (%)", loc="upper left", bbox_to_anchor=(1.005, 1.0),
              fontsize=8, title_fontsize=8, frameon=False)
    _title(fig, f"Per-class IoU on {NAMES.get(target, target)}, {backbone} ({_route(rows[0])}): ours (bars) vs "
                f"the paper (diamonds, its {PAPER_BACKBONE.get(family or '', 'family')} rows)", results)
    return save_figure(fig, stem)


# ---------------------------------------------------------------------------------- mIoU vs params


def _paper_points(table: str, family: str | None, targets: list[str]) -> list[tuple[str, float, float]]:
    """(method, trainable params in M, mIoU) of the paper's rows for the family: Table 1's ``avg``, or
    Table 2's mean over our targets; none for other tables."""
    key = PAPER_BACKBONE.get(family or "")
    if key is None:
        return []
    if table == "table1":
        df = paper_table("table1")
        df = df[df.backbone == key]
        return [(m, float(p), float(a)) for m, p, a in zip(df.method, df.trainable_params_m, df.avg)]
    if table == "table2":
        df = paper_table("table2")
        df = df[(df.backbone == key) & df.target.isin(targets)]
        out = []
        for method, g in df.groupby("method", sort=False):
            if set(g.target) == set(targets):
                out.append((method, float(g.trainable_params_m.iloc[0]), float(g.miou.mean())))
        return out
    return []


def _symlog_ticks(ax, lo: float, hi: float, linthresh: float) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    ticks = [0.0] + [10.0 ** e for e in range(int(round(math.log10(linthresh))),
                                              int(math.ceil(math.log10(hi))) + 1)]
    ticks = [t for t in ticks if t <= hi * 1.01]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels(["0" if t == 0 else f"{t:g}" for t in ticks], fontsize=7)


def _spread_labels(ax, items: list[tuple[float, float, str, dict]]) -> None:
    """Label points ``(x, y, text, style)`` beside them, right or left, nudged up or down so that no
    label overlaps another label or any point (greedy, in display space; call it once the layout is
    settled: the labels take no part in the layout, so it does not move under them); a displaced label
    gets a thin leader line."""
    fig = ax.get_figure(root=True)
    renderer = fig.canvas.get_renderer()
    pad = 5 * fig.dpi / 72  # gap between a point and its label, px
    r = 4.5 * fig.dpi / 72  # half the marker's size, px
    centres = [tuple(ax.transData.transform((x, y))) for x, y, _, _ in items]
    blocked = [(px - r, py - r, px + r, py + r) for px, py in centres]  # x0, y0, x1, y1 (display px)

    def free(box):
        return all(box[2] <= q[0] or box[0] >= q[2] or box[3] <= q[1] or box[1] >= q[3] for q in blocked)

    order = sorted(range(len(items)), key=lambda i: (items[i][1], items[i][0]))
    for i in order:
        x, y, text, style = items[i]
        px, py = centres[i]
        t = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", va="center", fontsize=7, **style)
        t.set_in_layout(False)
        bb = t.get_window_extent(renderer)
        w, h = bb.width, bb.height
        choice = None
        for k in range(40):
            for sign in ((1,) if k == 0 else (1, -1)):
                cy = py + sign * k * h * 0.5
                for side in ("right", "left"):
                    x0 = px + pad if side == "right" else px - pad - w
                    box = (x0, cy - h / 2, x0 + w, cy + h / 2)
                    if free(box):
                        choice = (box, side)
                        break
                if choice:
                    break
            if choice:
                break
        box, side = choice or ((px + pad, py - h / 2, px + pad + w, py + h / 2), "right")
        blocked.append(box)
        dx = ((box[0] - px) if side == "right" else (box[2] - px)) * 72 / fig.dpi
        dy = ((box[1] + box[3]) / 2 - py) * 72 / fig.dpi
        t.xyann = (dx, dy)
        t.set_horizontalalignment("left" if side == "right" else "right")
        if abs(dy) > 1:
            line = ax.annotate("", (x, y), xytext=(dx, dy), textcoords="offset points",
                               arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5, "shrinkA": 0,
                                           "shrinkB": 3})
            line.set_in_layout(False)


def _split_ranges(ours: list[float], paper: list[float]) -> list[tuple[float, float]] | None:
    """The y ranges (top first) of a broken axis when ours and the paper's values lie apart (the
    miniature's mIoU is far below the paper's): each group gets its own range; None when they mix."""
    if not ours or not paper:
        return None
    lo_o, hi_o, lo_p, hi_p = min(ours), max(ours), min(paper), max(paper)
    total = max(hi_o, hi_p) - min(lo_o, lo_p)
    gap = max(lo_p - hi_o, lo_o - hi_p)
    if gap < 0.35 * total:
        return None
    groups = sorted([(lo_o, hi_o), (lo_p, hi_p)], key=lambda g: -g[0])
    return [(lo - 0.12 * max(hi - lo, 2.0), hi + 0.12 * max(hi - lo, 2.0)) for lo, hi in groups]


def plot_miou_vs_params(results: list[dict], stem: Path) -> list[Path]:
    """One panel per backbone: trainable backbone parameters (M, symlog) against the mean mIoU over the
    targets; ours filled and labelled, the paper's hollow. Where ours and the paper's lie far apart
    (the miniature), the y axis is broken in two parts of equal height, each with its own range and scale."""
    from matplotlib.lines import Line2D

    backbones = _backbone_order(results)
    table = results[0]["manifest"]["table"]
    targets = list(results[0]["config"]["targets"])
    colour = colours([r["row"] for r in results] + list(METHOD_COLOURS))
    ncols = min(len(backbones), 3)
    nrows = math.ceil(len(backbones) / ncols)
    fig = _figure(4.8 * ncols + 0.3, 4.4 * nrows + 0.9)
    subfigs = fig.subfigures(nrows, ncols, squeeze=False, wspace=0.02, hspace=0.02)
    any_paper = False
    labels: list[tuple[Any, list]] = []
    for k, backbone in enumerate(backbones):
        sf = subfigs[k // ncols][k % ncols]
        family = _family(backbone)
        ours = sorted((r for r in results if r["backbone"] == backbone), key=_row_order)
        pts = [(r["params"]["backbone_trainable"] / 1e6, r["aggregate"]["miou"], r["row"]) for r in ours]
        paper = _paper_points(table, family, targets)
        any_paper |= bool(paper)
        positive = [p for p, _, _ in pts if p > 0] + [p for _, p, _ in paper if p > 0]
        lo = min(positive) if positive else 1e-3
        hi = max(positive) if positive else 1.0
        linthresh = 10.0 ** math.floor(math.log10(lo))
        split = _split_ranges([v for _, v, _ in pts], [v for _, _, v in paper])
        if split:
            axes = sf.subplots(2, 1, sharex=True, gridspec_kw={"hspace": 0.06})  # equal heights, own scales
        else:
            axes = [sf.subplots()]
            ys = [v for _, v, _ in pts] + [v for _, _, v in paper]
            span = max(max(ys) - min(ys), 2.0)
            split = [(min(ys) - 0.1 * span, max(ys) + 0.1 * span)]
        for ax, (ylo, yhi) in zip(axes, split):
            ax.set_xscale("symlog", linthresh=linthresh, linscale=0.6)
            mine = []
            for p, v, row in pts:
                if ylo <= v <= yhi:
                    ax.plot([p], [v], marker="o", markersize=7, color=colour[row], linestyle="none", zorder=3)
                    mine.append((p, v, row, {}))
            for method, p, v in paper:
                if ylo <= v <= yhi:
                    ax.plot([p], [v], marker="o", markersize=7, markerfacecolor="white",
                            markeredgecolor=colour.get(method, "black"), markeredgewidth=1.5, linestyle="none",
                            zorder=3)
                    mine.append((p, v, method, {"color": "0.4", "fontstyle": "italic"}))
            labels.append((ax, mine))
            ax.set_ylim(ylo, yhi)
            ax.set_xlim(-linthresh * 0.5, hi * 12)  # room on the right for the labels
            _symlog_ticks(ax, lo, hi, linthresh)
            ax.grid(alpha=0.3)
            ax.tick_params(axis="y", labelsize=7)
        if len(axes) == 2:  # the break: no spine between the parts, diagonal marks on the axis
            top, bottom = axes
            top.spines.bottom.set_visible(False)
            bottom.spines.top.set_visible(False)
            top.tick_params(axis="x", bottom=False, labelbottom=False)
            marks = {"marker": [(-1, -0.5), (1, 0.5)], "markersize": 8, "linestyle": "none", "color": "k",
                     "mec": "k", "mew": 1, "clip_on": False}
            top.plot([0, 1], [0, 0], transform=top.transAxes, **marks)
            bottom.plot([0, 1], [1, 1], transform=bottom.transAxes, **marks)
        sf.suptitle(backbone + (f"  (paper: {PAPER_BACKBONE[family]})" if paper else "  (no paper rows)"),
                    fontsize=9)
        sf.supxlabel("trainable backbone parameters (M)", fontsize=8)
        sf.supylabel(f"mIoU, mean over {len(targets)} targets (%)", fontsize=8)
    for k in range(len(backbones), nrows * ncols):
        subfigs[k // ncols][k % ncols].set_visible(False)
    key = [Line2D([], [], marker="o", color="0.3", linestyle="none", label="ours")]
    if any_paper:
        key.append(Line2D([], [], marker="o", markerfacecolor="white", markeredgecolor="0.3", linestyle="none",
                          label="paper (italic labels)"))
    fig.legend(handles=key, loc="outside lower center", ncols=len(key), fontsize=8, frameon=False)
    _title(fig, f"mIoU against trainable backbone parameters ({_route(results[0])}); 0 = frozen backbone", results)
    fig.draw_without_rendering()  # settle the layout, then place the labels in it
    for ax, items in labels:
        _spread_labels(ax, items)
    return save_figure(fig, stem)


# ---------------------------------------------------------------------------------- training loss


def _curve_label(r: dict, rows: list[dict]) -> str:
    """A cell's legend entry: its row, with its seed when the row has cells of several seeds."""
    seeds = {x["config"].get("seed") for x in rows if x["row"] == r["row"]}
    return f"{r['row']} (seed {r['config'].get('seed')})" if len(seeds) > 1 else r["row"]


def plot_training_loss(results: list[dict], stem: Path) -> list[Path]:
    """One panel per backbone: each cell's training loss against the iteration (the mean over each
    logging interval, as the result records it in ``train.losses``), a line per cell in its method's
    colour, log y, so that a loss that diverges, stays flat or stalls stands out; nothing when no cell
    recorded losses."""
    have = [r for r in results if (r.get("train") or {}).get("losses")]
    if not have:
        return []
    backbones = _backbone_order(have)
    colour = colours([r["row"] for r in have])
    ncols = min(len(backbones), 3)
    nrows = math.ceil(len(backbones) / ncols)
    fig = _figure(4.8 * ncols + 0.3, 3.6 * nrows + 1.0)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, backbone in enumerate(backbones):
        ax = axes[k // ncols][k % ncols]
        rows = sorted((r for r in have if r["backbone"] == backbone), key=_row_order)
        for r in rows:
            its, losses = zip(*r["train"]["losses"])
            ax.plot(its, losses, color=colour[r["row"]], linewidth=1.2, marker="." if len(its) < 20 else None,
                    label=_curve_label(r, rows))
        ax.set_yscale("log")
        ax.set_title(backbone, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylabel("training loss (log)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, frameon=False, ncols=2 if len(rows) > 5 else 1)
    for k in range(len(backbones), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    _title(fig, f"Training loss per cell ({_route(have[0])}; the mean over each logging interval)", results)
    return save_figure(fig, stem)


# ------------------------------------------------------------------------------------- qualitative


def _reader_sample(rec: dict, readers: dict) -> tuple[np.ndarray, np.ndarray]:
    """Image and train-id label of one saved prediction's pair, read by its data set's reader."""
    from fishertune.data import build_dataset

    key = (rec["dataset"], rec["root"], rec["split"])
    if key not in readers:
        readers[key] = build_dataset(*key)
    reader = readers[key]
    index = next((i for i, (img, _) in enumerate(reader.pairs) if str(img) == rec["image"]), None)
    if index is None:
        raise UserError(f"{rec['image']} is no longer among the {rec['dataset']} {rec['split']} images under "
                        f"{rec['root']}")
    sample = reader[index]
    return sample["image"], np.asarray(sample["label"])


def _read_prediction(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im)


def plot_qualitative(results: list[dict], results_dir: Path, backbone: str, target: str, methods: list[str],
                     images: int, stem: Path, say: Say = _stderr) -> list[Path]:
    """Input, ground truth and each method's prediction for the first ``images`` images of ``target``."""
    from matplotlib.patches import Patch

    cells = {}
    for m in methods:
        hit = [r for r in results if r["backbone"] == backbone and r["row"] == m] or \
              [r for r in results if r["backbone"] == backbone and r["method"] == m and r["row"] == r["method"]]
        if hit and (hit[0].get("predictions") or {}).get(target):
            cells[m] = hit[0]
    if not cells:
        return []
    recs = {m: r["predictions"][target][:images] for m, r in cells.items()}
    first = next(iter(recs.values()))
    readers: dict = {}
    tiles = []
    for n, rec in enumerate(first):
        try:
            image, label = _reader_sample(rec, readers)
        except UserError as e:
            say(f"qualitative {backbone} {target}: cannot read image {n} ({e}); skipped")
            continue
        preds = []
        for m, rs in recs.items():
            same = [q for q in rs if _same_image(q, rec)]
            if not same:
                say(f"qualitative {backbone} {target}: {cells[m]['cell_id']} saved no prediction of "
                    f"{Path(rec['image']).name}")
                preds.append((m, None))
                continue
            path = results_dir / cells[m]["_dir"] / same[0]["prediction"]
            try:
                pred = _read_prediction(path)
            except OSError:
                say(f"qualitative {backbone} {target}: prediction {path} is missing; rerun the cell "
                    f"{cells[m]['cell_id']} to save it again")
                pred = None
            if pred is not None and pred.shape != label.shape:
                say(f"qualitative: {path} is {pred.shape}, its label {label.shape}; skipped")
                pred = None
            preds.append((m, pred))
        tiles.append((rec, image, label, preds))
    if not tiles:
        return []
    ncols = 2 + len(recs)
    h, w = tiles[0][2].shape
    tile_w = 2.3
    fig = _figure(tile_w * ncols + 0.3, tile_w * h / w * len(tiles) + 1.5)
    axes = fig.subplots(len(tiles), ncols, squeeze=False, gridspec_kw={"wspace": 0.02, "hspace": 0.02})
    for i, (rec, image, label, preds) in enumerate(tiles):
        panels = [("input", image), ("ground truth", colourize(label))]
        panels += [(f"{m} ({cells[m]['targets'][target]['miou']:.1f})", None if p is None else colourize(p))
                   for m, p in preds]
        for j, (name, pic) in enumerate(panels):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if pic is None:
                ax.text(0.5, 0.5, "no prediction", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            else:
                ax.imshow(pic, interpolation="nearest")
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0:
                file = Path(rec["image"]).name
                file = file if len(file) <= 22 else file[:21] + "\u2026"
                ax.set_ylabel(f"#{rec.get('index', i)}\n{file}", fontsize=6)
    legend = [Patch(facecolor=np.array(PALETTE[k]) / 255, label=c) for k, c in enumerate(CLASSES)]
    legend.append(Patch(facecolor="black", label="ignore"))
    fig.legend(handles=legend, loc="outside lower center", ncols=10, fontsize=7, frameon=False,
               handlelength=1.2, columnspacing=0.8)
    _title(fig, f"Predictions on {NAMES.get(target, target)}, {backbone} (first {len(tiles)} images; "
                "method columns: prediction, target mIoU (%) in brackets)", results)
    return save_figure(fig, stem)


# ------------------------------------------------------------------------------------------ driver


def _tables_present(results_dir: Path, manifest: str | None) -> list[str]:
    tables = []
    for _, r in iter_results(results_dir):
        man = r.get("manifest") or {}
        if man.get("table") and (manifest is None or man.get("name") == manifest) and man["table"] not in tables:
            tables.append(man["table"])
    if not tables:
        which = f" of manifest {manifest!r}" if manifest else ""
        raise UserError(f"no finished cells{which} under {results_dir}; run `fishertune run MANIFEST` first "
                        "or pass --results DIR")
    return tables


def _same_image(a: dict, b: dict) -> bool:
    """Two saved predictions' records name the same image: its data set, index and file name. Not its whole
    path: cells run with another cache or data root (``FISHERTUNE_CACHE``, another machine) read the same
    image from elsewhere."""
    return (a.get("dataset"), a.get("index"), Path(a["image"]).name) == \
        (b.get("dataset"), b.get("index"), Path(b["image"]).name)


def _with_dirs(results_dir: Path, results: list[dict]) -> list[dict]:
    """Each result with ``_dir``, its JSON's directory relative to ``results_dir`` (predictions are
    relative to it)."""
    by_id = {}
    for path, r in iter_results(results_dir):
        man = r.get("manifest") or {}
        by_id[(man.get("name"), man.get("data_subset"), r.get("cell_id"))] = path.parent
    out = []
    for r in results:
        key = (r["manifest"]["name"], r["manifest"].get("data_subset"), r["cell_id"])
        out.append({**r, "_dir": by_id[key].relative_to(results_dir)})
    return out


def plot_results(results_dir: str | Path, out_dir: str | Path | None = None, manifest: str | None = None, *,
                 methods: list[str] | None = None, backbone: str | None = None, images: int = DEFAULT_IMAGES,
                 say: Say = _stderr) -> list[Path]:
    """Draw every figure the results under ``results_dir`` allow, one folder per manifest:
    ``<out_dir>/<manifest name>/`` (default ``results/plots/<manifest name>/``; ``-subsetN`` appended for a
    subset run). Per-class bars for Table 2 results; mIoU against parameters and the training-loss
    curves for any table; the
    qualitative figure (``methods``, default :data:`DEFAULT_METHODS`, those present; ``backbone``,
    default the first in the paper's order with predictions; ``images`` per target) where predictions
    were saved. Results of several manifests, versions or data kinds in one table are refused
    (:func:`~fishertune.report.tables.load_table_results`). Returns the files written; ``say`` gets
    what could not be drawn and why."""
    results_dir = Path(results_dir)
    if images < 1:
        raise UserError(f"--images must be at least 1, got {images}")
    root = Path(out_dir) if out_dir else DEFAULT_OUT
    loaded = [_with_dirs(results_dir, load_table_results(results_dir, table, manifest))
              for table in _tables_present(results_dir, manifest)]
    everything = [r for results in loaded for r in results]  # the choices are checked before any drawing
    if backbone is not None and backbone not in {r["backbone"] for r in everything}:
        raise UserError(f"--backbone {backbone}: no results for it under {results_dir}; backbones: "
                        f"{', '.join(_backbone_order(everything))}")
    unknown = [m for m in methods or () if m not in {r["row"] for r in everything} | {r["method"] for r in everything}]
    if unknown:
        rows = sorted({r["row"] for r in everything}, key=lambda x: _row_order({"method": x, "row": x}))
        raise UserError(f"--methods {' '.join(unknown)}: no rows of that name under {results_dir}; rows: "
                        f"{', '.join(rows)}")
    written: list[Path] = []
    for results in loaded:
        table = results[0]["manifest"]["table"]
        out = root / output_name(results)
        if table == "table2":
            for target in results[0]["config"]["targets"]:
                for bb in _backbone_order(results):
                    written += plot_per_class(results, target, bb, out / f"per-class-{target}-{bb}")
        written += plot_miou_vs_params(results, out / "miou-vs-params")
        written += plot_training_loss(results, out / "training-loss")
        written += _qualitative(results, results_dir, out, methods, backbone, images, say)
    return written


def _qualitative(results: list[dict], results_dir: Path, out: Path, methods: list[str] | None,
                 backbone: str | None, images: int, say: Say) -> list[Path]:
    name = output_name(results)
    backbones = _backbone_order(results)
    if backbone is not None and backbone not in backbones:
        say(f"{name}: no {backbone} results; no qualitative figure")
        return []
    rows = {r["row"] for r in results} | {r["method"] for r in results}
    chosen = [m for m in methods or DEFAULT_METHODS if m in rows]
    if not chosen:
        say(f"{name}: none of the rows {', '.join(methods or DEFAULT_METHODS)} ran; no qualitative figure "
            "(pick rows with --methods)")
        return []

    def cells_of(bb: str) -> list[dict]:
        return [r for r in results if r["backbone"] == bb and (r["row"] in chosen or
                                                               (r["method"] in chosen and r["row"] == r["method"]))]

    def with_predictions(bb: str) -> list[dict]:
        return [r for r in cells_of(bb) if r.get("predictions")]

    if backbone is None:
        ranked = sorted(backbones, key=lambda b: (-len(with_predictions(b)), -(_family(b) == "dinov2"),
                                                   backbones.index(b)))
        backbone = ranked[0]
    lacking = [r for r in cells_of(backbone) if not r.get("predictions")]
    if lacking:
        man = results[0]["manifest"]
        files = " ".join(str(results_dir / r["_dir"] / f"{r['cell_id']}.json") for r in lacking)
        only = " ".join(f"'{r['cell_id']}'" for r in lacking)
        say(f"{name}: no saved predictions in {len(lacking)} cell(s) of {backbone} (run before predictions were "
            f"saved): {', '.join(r['cell_id'] for r in lacking)}. To get them: rm {files} && fishertune run "
            f"{man['path']} --only {only} (on the device and thread count they recorded, "
            f"{', '.join(sorted({str(r.get('device')) for r in lacking}))}, or the numbers may move)")
    if not with_predictions(backbone):
        say(f"{name}: no qualitative figure for {backbone} (no cell of {', '.join(chosen)} has predictions)")
        return []
    written = []
    for target in results[0]["config"]["targets"]:
        written += plot_qualitative(results, results_dir, backbone, target, chosen, images,
                                    out / f"qualitative-{backbone}-{target}", say)
    return written
