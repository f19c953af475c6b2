"""Where a selection lies: the selected fraction per block and per matrix, and its heat map (issue 7
item 7, like the paper's layer-wise figure).

Groups (:data:`GROUPS`), per block (the i-th module of ``backbone.blocks``):

* ``q``, ``k``, ``v``: the elements of :func:`~fishertune.fisher.select.qkv_elements` (the rows of the
  fused projection weight, the matching bias, EVA-02's separate ``q_bias`` / ``v_bias``), found from
  ``backbone.qkv()`` by tensor identity;
* every other element by its parameter's name (:data:`PATTERNS`, searched in the name in this order):
  - ``attn proj``: ``.attn.proj.`` (timm, SAM, EVA-02), ``.attn.out_proj.`` (open_clip), weight and bias;
  - ``mlp in``: ``.mlp.fc1.`` (timm), ``.mlp.fc1_g.`` and ``.mlp.fc1_x.`` (EVA-02's SwiGLU gate and
    value), ``.mlp.lin1.`` (SAM), ``.mlp.c_fc.`` (open_clip);
  - ``mlp out``: ``.mlp.fc2.`` (timm, EVA-02), ``.mlp.lin2.`` (SAM), ``.mlp.c_proj.`` (open_clip);
  - ``other``: everything else: norms (``norm1``, ``norm2``, ``ln_1``, ``ln_2``, EVA-02's inner
    ``mlp.norm``), DINOv2's layer scale ``ls1.gamma`` / ``ls2.gamma``, SAM's ``attn.rel_pos_h/w``,
    and any element of a fused q/k/v tensor outside its q/k/v rows (none in the five families).
Each candidate element is in exactly one group (one group per tensor, or one group id per element of
a tensor holding q/k/v elements, q/k/v overriding the name); only the fused q/k/v tensors get per-element
ids (int8), so counting a ViT-L selection needs ~3 MB per fused tensor, not one byte per candidate.

The fraction is selected elements / elements of the group in that block; NaN where a block has no
element of a group.

:func:`plot_selection` draws with matplotlib's object API on an Agg canvas (no pyplot, no display,
no global backend switch), at a size set by the grid (:func:`figure_size`, 100 dpi), and writes the
file atomically (``fishertune.runner.store.atomic_write``: a temporary file beside it, then a rename).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from fishertune.fisher.select import qkv_elements
from fishertune.fisher.sparse import block_parameters
from fishertune.runner.store import atomic_write

__all__ = ["GROUPS", "PATTERNS", "element_groups", "figure_size", "group_counts", "plot_selection",
           "selection_fractions"]

GROUPS = ("q", "k", "v", "attn proj", "mlp in", "mlp out", "other")
OTHER = GROUPS.index("other")
#: name patterns of the matrix groups (re.search on the parameter's full name); the rest is "other"
PATTERNS = (
    ("attn proj", re.compile(r"\.attn\.(proj|out_proj)\.")),
    ("mlp in", re.compile(r"\.mlp\.(fc1|fc1_g|fc1_x|lin1|c_fc)\.")),
    ("mlp out", re.compile(r"\.mlp\.(fc2|lin2|c_proj)\.")),
)
DPI = 100
ANNOTATE_MAX_CELLS = 7 * 32  # numbers in the cells up to 32 blocks (ViT-H / SAM-H)


def _name_group(name: str) -> int:
    for group, pattern in PATTERNS:
        if pattern.search(name):
            return GROUPS.index(group)
    return OTHER


def element_groups(backbone: nn.Module, prefix: str = "backbone") -> dict[str, tuple[int, int | torch.Tensor]]:
    """Candidate name -> (block index, group): the index in :data:`GROUPS` of all its elements, or, for a
    parameter holding q/k/v elements (the fused projection), an int8 tensor of one group id per flat
    element. Memory: one int8 per element of the fused q/k/v tensors only."""
    candidates = block_parameters(backbone, prefix)
    block_of = {}
    for i, blk in enumerate(backbone.blocks):
        for p in blk.parameters():
            block_of[id(p)] = i
    qkv = {which: qkv_elements(backbone, which, prefix) for which in "qkv"}
    out: dict[str, tuple[int, int | torch.Tensor]] = {}
    for name, p in candidates.items():
        group: int | torch.Tensor = _name_group(name)
        parts = [(g, qkv[which][name]) for g, which in enumerate("qkv") if name in qkv[which]]
        if len(parts) == 1 and parts[0][1].numel() == p.numel():
            group = parts[0][0]  # a whole tensor of one part (EVA-02's q_bias / v_bias)
        elif parts:
            ids = torch.full((p.numel(),), group, dtype=torch.int8)
            for g, idx in parts:
                ids[idx] = g
            group = ids
        out[name] = (block_of[id(p)], group)
    return out


def _counts(groups: dict, numel: dict[str, int], blocks: int, indices: dict[str, torch.Tensor] | None) -> np.ndarray:
    if indices is not None:
        unknown = [n for n in indices if n not in groups]
        if unknown:
            raise ValueError(f"selection names parameters that are not candidates: {unknown[:3]}")
    counts = np.zeros((blocks, len(GROUPS)), dtype=np.int64)
    for name, (block, group) in groups.items():
        idx = None
        if indices is not None:
            idx = indices.get(name)
            if idx is None or idx.numel() == 0:
                continue
            idx = idx.detach().to("cpu", torch.int64).reshape(-1)
        if isinstance(group, int):
            counts[block, group] += numel[name] if idx is None else idx.numel()
        else:
            ids = group if idx is None else group[idx]
            counts[block] += torch.bincount(ids.long(), minlength=len(GROUPS)).numpy()
    return counts


def _frame(values: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(values, columns=list(GROUPS))
    frame.index.name = "block"
    return frame


def group_counts(backbone: nn.Module, indices: dict[str, torch.Tensor] | None = None,
                 prefix: str = "backbone") -> pd.DataFrame:
    """Elements per block (rows 0..L-1) and group (columns :data:`GROUPS`): all candidate elements
    (``indices`` None) or the selected ones (``indices``: name -> flat indices, names as candidates)."""
    numel = {n: p.numel() for n, p in block_parameters(backbone, prefix).items()}
    return _frame(_counts(element_groups(backbone, prefix), numel, len(backbone.blocks), indices))


def selection_fractions(backbone: nn.Module, indices: dict[str, torch.Tensor], prefix: str = "backbone") -> pd.DataFrame:
    """Selected elements / elements of each group, per block (rows 0..L-1, columns :data:`GROUPS`);
    NaN where a block has no element of a group."""
    groups = element_groups(backbone, prefix)
    numel = {n: p.numel() for n, p in block_parameters(backbone, prefix).items()}
    total = _counts(groups, numel, len(backbone.blocks), None)
    chosen = _counts(groups, numel, len(backbone.blocks), indices)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _frame(np.where(total > 0, chosen / np.maximum(total, 1), np.nan))


def figure_size(rows: int, cols: int) -> tuple[float, float]:
    """(width, height) in inches of :func:`plot_selection`'s figure (pixels: times :data:`DPI`)."""
    return 1.0 * cols + 3.0, max(3.0, 0.32 * rows + 1.6)


def plot_selection(fractions: pd.DataFrame, path: str | os.PathLike, title: str) -> None:
    """Heat map of ``fractions`` (blocks down, groups across, colour = selected %, with a colour bar
    and, up to :data:`ANNOTATE_MAX_CELLS` cells, the percentages in the cells), written to ``path``
    as PNG (suffix ``.png``) or PDF (``.pdf``), atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib import colormaps

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "pdf"):
        raise ValueError(f"{path}: the heat map is written as .png or .pdf, not {path.suffix or 'no suffix'}")
    values = 100.0 * fractions.to_numpy(dtype=float)
    rows, cols = values.shape
    masked = np.ma.masked_invalid(values)
    vmax = float(masked.max()) if masked.count() and float(masked.max()) > 0 else 1.0
    cmap = colormaps["viridis"].with_extremes(bad="0.85")

    fig = Figure(figsize=figure_size(rows, cols), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(masked, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(cols), [str(c) for c in fractions.columns], rotation=30, ha="right")
    ax.set_yticks(range(rows), [str(i) for i in fractions.index])
    ax.set_xlabel("group")
    ax.set_ylabel(str(fractions.index.name or "block"))
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="selected (%)")
    if rows * cols <= ANNOTATE_MAX_CELLS:
        size = 8 if rows <= 24 else 7
        digits = 1 if vmax >= 10 else 2  # small budgets: 5% of a block is spread thin
        for r in range(rows):
            for c in range(cols):
                v = values[r, c]
                text = "n/a" if np.isnan(v) else f"{v:.{digits}f}"
                dark = np.isnan(v) or v / vmax > 0.6  # viridis is light at the top end
                ax.text(c, r, text, ha="center", va="center", fontsize=size, color="black" if dark else "white")

    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=DPI))
