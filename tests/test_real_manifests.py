"""The shipped full-size manifests expand to the paper's grids, and their miniature twins mirror them."""

from pathlib import Path

import pandas as pd
import pytest

from fishertune.backbones import BACKBONES
from fishertune.report.paper import PAPER_BACKBONE
from fishertune.runner.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [("table1.yaml", "mini/table1.yaml"), ("ablation.yaml", "mini/ablation.yaml"),
         ("estimation.yaml", "mini/estimation.yaml"), ("table2.yaml", "mini/table2.yaml")]


def _grid(lm):
    return {(BACKBONES.get(c.backbone).family, c.row) for c in lm.cells()}


@pytest.mark.parametrize("real, mini", PAIRS)
def test_miniature_twins_mirror_the_real_grids(real, mini):
    a, b = load_manifest(ROOT / "benchmarks" / real), load_manifest(ROOT / "benchmarks" / mini)
    assert _grid(a) == _grid(b)  # same families x rows
    assert (a.manifest.table, a.manifest.source, a.manifest.targets) == (b.manifest.table, b.manifest.source,
                                                                         b.manifest.targets)
    assert a.manifest.data.kind == "real" and b.manifest.data.kind == "miniature"


@pytest.mark.parametrize("manifest, csv, key", [("table1.yaml", "table1", "method"),
                                                ("ablation.yaml", "ablation", "selector"),
                                                ("table2.yaml", "table2", "method")])
def test_every_paper_row_has_a_cell(manifest, csv, key):
    grid = _grid(load_manifest(ROOT / "benchmarks" / manifest))
    family = {v: k for k, v in PAPER_BACKBONE.items()}
    paper = pd.read_csv(ROOT / "results" / "paper" / f"{csv}.csv")
    missing = [(b, r) for b, r in zip(paper.backbone, paper[key]) if (family[b], r) not in grid]
    assert not missing


def test_table1_is_every_family_times_every_method():
    lm = load_manifest(ROOT / "benchmarks" / "table1.yaml")
    assert len(lm.cells()) == 5 * 9 and {c.backbone for c in lm.cells()} == {"clip-l", "mae-l", "sam-h", "eva02-l",
                                                                             "dinov2-l"}
