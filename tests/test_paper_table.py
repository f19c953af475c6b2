"""The paper-only Table 1 (no runs) carries the paper's numbers cell by cell, and is what the command writes."""

import re
from pathlib import Path

import pandas as pd
import pytest

from fishertune.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results" / "tables" / "table1-paper.md"
#: the paper's numbers as transcribed for the project (../shared, beside the clone, where there is one)
SHARED = ROOT.parent / "shared" / "paper" / "table1.csv"


def _rows(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")][2:]  # header and rule dropped
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def _paper(cell: str) -> float:
    m = re.fullmatch(r"not run / (\d+\.\d)\*?", cell)
    assert m, cell
    return float(m.group(1))


def test_every_cell_is_the_papers_number():
    paper = pd.read_csv(ROOT / "results" / "paper" / "table1.csv")
    rows = _rows(COMMITTED.read_text())
    assert len(rows) == len(paper)
    backbone = ""
    for row, p in zip(rows, paper.to_dict("records")):
        backbone = row[0] or backbone
        assert row[1] == p["method"]
        assert float(row[2].split(" / ")[1]) == pytest.approx(p["trainable_params_m"])
        assert [_paper(c) for c in row[3:7]] == pytest.approx([p["citys"], p["bdd"], p["map"], p["avg"]])
    starred = [r[1] for r in rows if r[6].endswith("*")]
    assert len(starred) == 2  # the paper's own two averages that are not the mean of their targets


@pytest.mark.skipif(not SHARED.is_file(), reason="../shared/paper is not beside this clone")
def test_the_projects_copy_is_the_shared_transcription():
    assert pd.read_csv(SHARED).equals(pd.read_csv(ROOT / "results" / "paper" / "table1.csv"))


def test_committed_table_is_what_the_command_writes(tmp_path):
    assert main(["render", "table1", "--paper-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "table1-paper.md").read_text() == COMMITTED.read_text()
    assert (tmp_path / "table1-paper.tex").read_text() == COMMITTED.with_suffix(".tex").read_text()
