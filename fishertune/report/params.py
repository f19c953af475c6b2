"""``fishertune params``: trainable parameters of every full-size backbone x every registered method.

Each backbone is built on PyTorch's meta device (shapes without storage, so ViT-H costs no memory and
no weights file is needed), the decode head of the protocol defaults is put on it, and each method's
``apply`` decides what trains. The backbone-side trainable count is the paper's "Trainable Params"
column, printed beside it; the last column is the size of the model a finished cell keeps
(:func:`fishertune.runner.model.kept_bytes`).
"""

from __future__ import annotations

import json
import math

import pandas as pd
import torch

from fishertune.backbones import BACKBONES, build_backbone
from fishertune.data import NUM_CLASSES
from fishertune.errors import UserError
from fishertune.heads import build_head
from fishertune.progress import bar
from fishertune.report.paper import METHOD_ORDER, PAPER_BACKBONE, paper_row
from fishertune.runner.model import kept_bytes
from fishertune.segmentor import Segmentor
from fishertune.tuning import MethodContext, build_method, parameter_counts, registered_methods

#: the paper's family order (Table 1)
FAMILY_ORDER = tuple(PAPER_BACKBONE)


def full_size_backbones() -> list[str]:
    """Every registered variant with official weights (the tiny ones have none), in the paper's order."""
    specs = [s for s in (BACKBONES.get(n) for n in BACKBONES.names()) if s.weights]
    rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
    return [s.name for s in sorted(specs, key=lambda s: (rank.get(s.family, len(rank)), s.name))]


def _paper_trainable_m(family: str, method: str) -> float | None:
    row = paper_row("table1", family, method)
    if row is None or row.get("trainable_params_m") is None or math.isnan(row["trainable_params_m"]):
        return None
    return float(row["trainable_params_m"])


def parameter_rows(backbones: list[str] | None = None, methods: list[str] | None = None,
                   head: str | None = None, head_config: dict | None = None,
                   img_size: int = 512) -> list[dict]:
    """One record per (backbone, method): the counts of :func:`fishertune.tuning.parameter_counts`."""
    from fishertune.runner.manifest import defaults

    protocol = defaults()["head"]
    head = head or protocol["name"]
    head_config = protocol["config"] if head_config is None else head_config
    backbones = backbones or full_size_backbones()
    if not methods:
        rank = {m: i for i, m in enumerate(METHOD_ORDER)}
        methods = sorted(registered_methods(), key=lambda m: (rank.get(m, len(rank)), m))
    meta = torch.device("meta")
    rows = []
    for name in bar(backbones, desc="params", unit="backbone"):
        family = BACKBONES.get(name, "--backbones").family
        for method_name in methods:
            method = build_method(method_name, where="--methods")
            with meta:
                backbone = build_backbone(name, pretrained=False, img_size=img_size, where="--backbones")
                seg = Segmentor(backbone, build_head(head, backbone.embed_dim, NUM_CLASSES, where="--head",
                                                     **head_config))
                method.apply(seg, MethodContext(device=meta, seed=0))
            seg.head.requires_grad_(True)  # as in a run: the decode head always trains
            counts = parameter_counts(seg, method)
            rows.append({"backbone": name, "family": family, "method": method_name,
                         "backbone_trainable": counts["backbone_trainable"],
                         "head_trainable": counts["head_trainable"],
                         "backbone_total": counts["backbone_total"],
                         "kept_bytes": kept_bytes(seg, method),
                         "paper_trainable_m": _paper_trainable_m(family, method_name)})
    return rows


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=1) + "\n"


def to_markdown(rows: list[dict], head: str, img_size: int = 512) -> str:
    if not rows:
        raise UserError("no backbone x method to count")

    def m(n: int) -> str:
        return f"{n / 1e6:.2f}"

    table = pd.DataFrame([{
        "Backbone": r["backbone"],
        "Method": r["method"],
        "Trainable backbone (M)": m(r["backbone_trainable"]),
        "Paper (M)": "—" if r["paper_trainable_m"] is None else f"{r['paper_trainable_m']:.2f}",
        "Difference (M)": "" if r["paper_trainable_m"] is None
        else f"{round(r['backbone_trainable'] / 1e6 - r['paper_trainable_m'], 2) + 0.0:+.2f}",  # no "-0.00"
        "Trainable head (M)": m(r["head_trainable"]),
        "Backbone total (M)": m(r["backbone_total"]),
        "Kept model (MB)": f"{r['kept_bytes'] / 1e6:.1f}",
    } for r in rows])
    caption = (
        "# Trainable parameters\n\n"
        f"Written by `fishertune params --format md`. Each backbone is built on the meta device at "
        f"{img_size}x{img_size} with patch 16 (Rein's setting: position grid {img_size // 16}x{img_size // 16}), "
        f"with the protocol's `{head}` decode head; a method's count is what its `apply` leaves trainable. "
        "\"Paper\" is the Trainable Params column of the paper's Table 1 (the backbone side only; — where the "
        "paper has no such row). MAE: the paper's row is labelled Huge but its numbers are Rein's MAE ViT-L "
        "runs; both sizes are listed. \"Kept model\" is the tensor data a finished cell keeps "
        "(`<cell id>.model/model.safetensors`: what trains plus the head, float32; a sparse method's chosen "
        "elements as value and int32 index, 8 bytes each), in 10^6 bytes.\n\n"
    )
    return caption + table.to_markdown(index=False, disable_numparse=True,
                                       colalign=("left", "left") + ("right",) * 6) + "\n"
