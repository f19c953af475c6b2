"""benchmarks/perf/full_size_cpu.py's report, without its hour of full-size steps: a report read back for
``--resume`` renders the same table, rows come out in the grid's order whatever order they ran in, and a
report made on another machine is not continued (one line, exit code 2)."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

PERF = Path(__file__).resolve().parents[1] / "benchmarks" / "perf"


@pytest.fixture(scope="module")
def smoke():
    sys.path.insert(0, str(PERF))
    try:
        import full_size_cpu
    finally:
        sys.path.remove(str(PERF))
    return full_size_cpu


def _row(backbone: str, method: str, step_s: float) -> dict:
    return {"backbone": backbone, "method": method, "checkpoint_gb": 0.8, "backbone_trainable": 304.15e6,
            "build_s": 3.0, "estimate_s": 0.0, "step_s": step_s, "step_cpu_s": 2 * step_s, "loss": 133.69,
            "peak_rss_gb": 6.2, "step_peak_rss_gb": None if method == "freeze" else 5.9}


def _render(smoke, rows: list[dict], **kw) -> str:
    return smoke.render(rows, [], datetime(2026, 12, 5, tzinfo=timezone.utc), 1.0, 1.0, ["clip-l", "mae-l"],
                        ["full", "freeze"], **kw)


def test_a_report_read_back_renders_the_same_rows_in_the_grids_order(smoke, tmp_path):
    ran = [_row("mae-l", "full", 19.2), _row("clip-l", "freeze", 9.1), _row("clip-l", "full", 51.7)]
    out = tmp_path / "smoke.md"
    out.write_text(_render(smoke, ran, total=4))
    text = out.read_text()
    assert "**Partial**: 3 of 4 rows" in text
    table = [line for line in text.splitlines() if line.startswith("| `")]
    assert [line.split("|")[1:3] for line in table] == [[" `clip-l` ", " `full` "], [" `clip-l` ", " `freeze` "],
                                                        [" `mae-l` ", " `full` "]]
    again = smoke.read_rows(out)
    assert _render(smoke, again, total=4) == text
    assert smoke.read_machine(out) == smoke.machine()


def test_resume_refuses_a_report_made_on_another_machine(smoke, tmp_path, capsys):
    out = tmp_path / "smoke.md"
    out.write_text(_render(smoke, [_row("clip-l", "full", 51.7)], total=4).replace(
        smoke.machine(), "a 2-core CPU (Some Other CPU), PyTorch 2.0.0, 2 intra-op threads"))
    before = out.read_text()
    with pytest.raises(SystemExit) as stop:
        smoke.run(["clip-l"], ["full", "freeze"], out, resume=True)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Some Other CPU" in err[0] and "without --resume" in err[0]
    assert out.read_text() == before


def test_resume_refuses_a_damaged_report_in_one_line(smoke, tmp_path, capsys):
    out = tmp_path / "smoke.md"
    out.write_text(_render(smoke, [_row("clip-l", "full", 51.7)], total=4).replace("51.7", "fast"))
    with pytest.raises(SystemExit) as stop:
        smoke.run(["clip-l"], ["full", "freeze"], out, resume=True)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read" in err[0] and "without --resume" in err[0]
