"""The paper's reference numbers (``results/paper/*.csv``) and how our rows map onto them.

Our backbone names (``dinov2-l``, ``dinov2-tiny``, ...) map to the paper's rows by family; the
miniature's tiny backbones therefore sit beside the paper row of their family, with the data set
named in the caption so that nobody mistakes the comparison for a reproduction.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pandas as pd

from fishertune.errors import UserError

#: where the reference numbers live: the clone this package runs from, else the working directory
PAPER_DIRS = (Path(__file__).resolve().parents[2] / "results" / "paper", Path("results") / "paper")
#: the paper's order of the method rows within a backbone (every table and plot keeps it)
METHOD_ORDER = ("full", "freeze", "lora", "adaptformer", "vpt", "rein", "vqt", "childtune", "fishertune")
#: our backbone family -> the paper's backbone key
PAPER_BACKBONE = {"clip": "clip-vit-l", "mae": "mae-vit-h", "sam": "sam-vit-h", "eva02": "eva02-l", "dinov2": "dinov2-l"}
#: average printed by the paper that disagrees with the mean of its own three numbers
TOLERANCE_AVG = 0.06


@lru_cache(maxsize=None)
def paper_table(name: str) -> pd.DataFrame:
    for directory in PAPER_DIRS:
        path = directory / f"{name}.csv"
        if path.is_file():
            return pd.read_csv(path)
    looked = " or ".join(str(d / f"{name}.csv") for d in PAPER_DIRS)
    raise UserError(f"the paper's reference numbers are not at {looked}; install fishertune-bench from a clone "
                    "with `pip install -e .` or run from the clone's top directory")


def paper_row(table: str, family: str, method: str) -> dict | None:
    """The paper's row for (backbone family, method) in ``table``, or None when the paper has none."""
    df = paper_table(table)
    key = PAPER_BACKBONE.get(family)
    hit = df[(df.backbone == key) & (df.method == method)]
    return None if hit.empty else hit.iloc[0].to_dict()


def inconsistent_average(row: dict, targets: tuple[str, ...] = ("citys", "bdd", "map")) -> float | None:
    """The true mean when the printed average differs from it by more than rounding, else None."""
    mean = sum(row[t] for t in targets) / len(targets)
    return mean if abs(mean - row["avg"]) > TOLERANCE_AVG else None
