"""Table 2 (per class) rendering: our rows beside the paper's, from synthetic result records (no training)."""

import json
from pathlib import Path

import pandas as pd
import pytest

import fishertune.report.table2 as t2
from fishertune.data import CLASSES
from fishertune.errors import UserError
from fishertune.report.paper import PAPER_BACKBONE, paper_table
from fishertune.report.table2 import CLASS_HEADERS, render_table2, table2_frame

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "freeze", "lora", "adaptformer", "vpt", "rein", "vqt", "childtune", "fishertune")
COLUMNS = list(CLASS_HEADERS) + ["mIoU"]


def _per_class(seed: float) -> dict:
    return {c: 10.0 + seed + 1.37 * i for i, c in enumerate(CLASSES)}


def _result(backbone, method, row=None, targets=("bdd100k", "acdc"), version=1, kind="miniature",
            name="mini-table2", seed=0.0, nulls=()):
    per_target = {}
    for k, t in enumerate(targets):
        pc = _per_class(seed + 3.1 * k)
        for c in nulls:
            pc[c] = None
        values = [v for v in pc.values() if v is not None]
        per_target[t] = {"miou": sum(values) / len(values), "per_class_iou": pc}
        if t == "acdc":
            per_target[t]["groups"] = {g: {"miou": 1.0} for g in ("fog", "night", "rain", "snow")}
    return {"status": "done", "backbone": backbone, "method": method, "row": row or method,
            "manifest": {"name": name, "version": version, "table": "table2", "data_kind": kind,
                         "data_subset": None},
            "config": {"source": "cityscapes", "targets": list(targets),
                       "data": {"synth_seed": 0, "synth_images": 12}, "method_config": {}},
            "targets": per_target, "aggregate": {"miou": 0.0},
            "params": {"backbone_trainable": 1_230_000 + 1000 * len(method)}}


def _grid(**kw):
    return [_result(b, m, seed=0.5 * i + (7 if b.startswith("eva") else 0), **kw)
            for b in ("eva02-tiny", "dinov2-tiny") for i, m in enumerate(METHODS)]


def _methods(df, target, backbone):
    idx = df.index
    keep = (idx.get_level_values("Target") == target) & (idx.get_level_values("Backbone") == backbone)
    return list(dict.fromkeys(idx[keep].get_level_values("Method")))


def _num(cell: str) -> float:
    return float(cell.rstrip("*+"))


def test_paper_rows_equal_the_csv_cell_by_cell():
    df, _ = table2_frame(_grid())
    paper = paper_table("table2")
    family = {v: k for k, v in PAPER_BACKBONE.items()}
    tiny = {"dinov2": "dinov2-tiny", "eva02": "eva02-tiny"}
    seen = 0
    for p in paper.to_dict("records"):
        got = df.loc[(p["target"], tiny[family[p["backbone"]]], p["method"], "paper")]
        for header, cls in zip(CLASS_HEADERS, CLASSES):
            assert _num(got[header]) == pytest.approx(p[cls.replace(" ", "_")]), (p["target"], p["method"], cls)
        assert _num(got["mIoU"]) == pytest.approx(p["miou"])
        assert float(got["Params (M)"]) == pytest.approx(p["trainable_params_m"])
        seen += 1
    assert seen == len(paper) == 24
    # rows the paper lacks (LoRA, AdaptFormer, VPT) show "-" on the paper and difference rows
    for row in ("paper", "ours - paper"):
        assert set(df.loc[("bdd100k", "dinov2-tiny", "lora", row)]) == {"-"}
    # one block per target, BDD100K first; the paper's backbone order within (DINOv2-L, then EVA02-L)
    blocks = list(dict.fromkeys(df.index.get_level_values("Target")))
    assert blocks == ["bdd100k", "acdc"]
    assert list(dict.fromkeys(df.loc["bdd100k"].index.get_level_values("Backbone"))) == ["dinov2-tiny", "eva02-tiny"]
    assert _methods(df, "bdd100k", "dinov2-tiny") == list(METHODS)


def test_difference_rows_are_ours_minus_paper():
    results = _grid()
    df, _ = table2_frame(results)
    by_key = {(r["backbone"], r["row"]): r for r in results}
    checked = 0
    for (target, backbone, method, row), values in df.iterrows():
        if row != "ours - paper" or values["mIoU"] == "-":
            continue
        r = by_key[(backbone, method)]["targets"][target]
        paper = df.loc[(target, backbone, method, "paper")]
        ours = df.loc[(target, backbone, method, "ours")]
        for header, cls in zip(CLASS_HEADERS, CLASSES):
            expected = r["per_class_iou"][cls] - _num(paper[header])
            assert float(values[header]) == pytest.approx(expected, abs=0.051)
            assert values[header] == f"{expected:+.1f}"
            assert ours[header] == f"{r['per_class_iou'][cls]:.1f}"
        assert values["mIoU"] == f"{r['miou'] - _num(paper['mIoU']):+.1f}"
        checked += 1
    assert checked == 2 * 2 * 6  # targets x backbones x the paper's methods


def test_classes_absent_from_the_target_show_na():
    results = [_result("dinov2-tiny", "rein", nulls=("train", "motorcycle"))]
    df, _ = table2_frame(results)
    for target in ("bdd100k", "acdc"):
        for row in ("ours", "ours - paper"):
            got = df.loc[(target, "dinov2-tiny", "rein", row)]
            assert got["Train"] == got["M.bike"] == "n/a"
            assert got["Road"] not in ("n/a", "-", "not run")
        assert df.loc[(target, "dinov2-tiny", "rein", "paper")]["Train"] not in ("n/a", "-")


def test_cells_not_run_show_as_such():
    results = [r for r in _grid() if not (r["backbone"] == "dinov2-tiny" and r["method"] == "vqt")]
    results.append(_result("dinov2-tiny", "fishertune", row="dr_fim"))  # a labelled row: no paper numbers
    results = [r if (r["backbone"], r["row"]) != ("eva02-tiny", "rein") else
               _result("eva02-tiny", "rein", targets=("bdd100k",)) for r in results]
    df, _ = table2_frame(results)
    missing = df.loc[("bdd100k", "dinov2-tiny", "vqt", "ours")]
    assert set(missing) == {"not run"}
    assert set(df.loc[("bdd100k", "dinov2-tiny", "vqt", "ours - paper")]) == {"-"}
    assert _num(df.loc[("bdd100k", "dinov2-tiny", "vqt", "paper")]["mIoU"]) == 63.1
    # a target the cell did not evaluate
    assert set(df.loc[("acdc", "eva02-tiny", "rein", "ours")][COLUMNS]) == {"not run"}
    assert df.loc[("bdd100k", "eva02-tiny", "rein", "ours")]["mIoU"] != "not run"
    # the labelled row sits after the plain FisherTune row, with no paper numbers
    methods = _methods(df, "bdd100k", "dinov2-tiny")
    assert methods[-2:] == ["fishertune", "dr_fim"]
    assert set(df.loc[("bdd100k", "dinov2-tiny", "dr_fim", "paper")]) == {"-"}


def test_an_inconsistent_paper_row_gets_a_footnote(monkeypatch):
    real = paper_table("table2")
    _, notes = table2_frame(_grid())
    assert not [n for n in notes if n.startswith("* ")]  # every printed mIoU is its classes' mean
    assert any(n.startswith("+ EVA02-L, Cityscapes -> BDD100K") and "results/paper/README.md" in n for n in notes)

    bad = real.copy()
    hit = (bad.target == "acdc") & (bad.backbone == "dinov2-l") & (bad.method == "rein")
    bad.loc[hit, "miou"] = 70.0
    monkeypatch.setattr(t2, "paper_table", lambda name: bad)
    df, notes = table2_frame(_grid())
    flagged = [n for n in notes if n.startswith("* ")]
    true_mean = sum(real[hit].iloc[0][c.replace(" ", "_")] for c in CLASSES) / 19
    assert flagged == [f"* ACDC dinov2-l rein: the paper prints mIoU 70.0, but the mean of its 19 classes is "
                       f"{true_mean:.2f}."]
    assert df.loc[("acdc", "dinov2-tiny", "rein", "paper")]["mIoU"] == "70.0*"
    assert df.loc[("bdd100k", "dinov2-tiny", "rein", "paper")]["mIoU"] == "66.4"


def _write(root: Path, results: list) -> Path:
    for i, r in enumerate(results):
        path = root / r["manifest"]["name"] / f"{r['backbone']}--{r['row']}--{i}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    return root


def test_render_writes_md_and_tex_to_the_manifests_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = _grid() + [_result("dinov2-tiny", "fishertune", row="delta_fim")]
    md, tex = render_table2(_write(tmp_path / "runs", results))
    assert md == Path("results/tables/mini-table2/table2.md") and tex == Path("results/tables/mini-table2/table2.tex")
    text, latex = md.read_text(), tex.read_text()
    assert text.startswith("Table 2: Cityscapes -> BDD100K, ACDC; per-class IoU")
    assert "generated miniature" in text and "Manifest mini-table2 v1." in text
    assert text.index("**BDD100K**") < text.index("**ACDC**") and text.count("**BDD100K**") == 1
    assert "| ours - paper |" in text and "S.walk" in text
    assert latex.startswith(r"\begin{table}") and r"\toprule" in latex and r"\bottomrule" in latex
    assert r"delta\_fim" in latex and "delta_fim" not in latex
    assert r"Cityscapes $\rightarrow$ BDD100K" in latex and r"\label{tab:table2}" in latex
    assert latex.count(r"\midrule") == 2  # under the header and between the two target blocks
    # real data: the folder of its manifest's name, as any other; an explicit out_dir is used as given
    real = [_result("dinov2-l", "rein", kind="real", name="table2")]
    assert render_table2(_write(tmp_path / "real", real))[0] == Path("results/tables/table2/table2.md")
    # another miniature manifest (a user's own) never overwrites the committed one
    mine = [_result("dinov2-tiny", "rein", name="my-mini")]
    assert render_table2(_write(tmp_path / "mine", mine))[0] == Path("results/tables/my-mini/table2.md")
    assert render_table2(tmp_path / "runs", tmp_path / "elsewhere")[0] == tmp_path / "elsewhere" / "table2.md"


def test_mixing_manifest_versions_is_refused(tmp_path):
    root = tmp_path / "runs"
    _write(root, [_result("dinov2-tiny", "rein", version=1)])
    (root / "mini-table2" / "v2.json").write_text(json.dumps(_result("dinov2-tiny", "full", version=2)))
    with pytest.raises(UserError, match="several manifests or versions"):
        render_table2(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _md_rows(block: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()
            if line.startswith("|") and not line.startswith("|--") and not set(line) <= set("|-: ")]


def test_committed_miniature_table_has_both_blocks_and_the_papers_rein_rows():
    text = (ROOT / "results" / "tables" / "mini-table2" / "table2.md").read_text()
    assert text.count("**BDD100K**") == text.count("**ACDC**") == 1
    bdd, acdc = text.split("**ACDC**")
    paper = paper_table("table2")
    for target, block in (("bdd100k", bdd.split("**BDD100K**")[1]), ("acdc", acdc)):
        rows = _md_rows(block)
        header = rows[0]
        backbone, at = None, None
        for i, r in enumerate(rows[1:], start=1):
            backbone = r[header.index("Backbone")] or backbone  # a backbone's name only on its first row
            if backbone == "dinov2-tiny" and r[header.index("Method")] == "rein":
                at = i
        assert at is not None and rows[at][header.index("")] == "ours"
        assert rows[at + 1][header.index("")] == "paper"
        want = paper[(paper.target == target) & (paper.backbone == "dinov2-l") & (paper.method == "rein")].iloc[0]
        got = dict(zip(header, rows[at + 1]))
        assert [_num(got[h]) for h in CLASS_HEADERS] == [want[c.replace(" ", "_")] for c in CLASSES]
        assert _num(got["mIoU"]) == want["miou"]


def test_csv_columns_are_our_classes():
    cols = list(pd.read_csv(ROOT / "results" / "paper" / "table2.csv").columns)
    assert cols[4:-1] == [c.replace(" ", "_") for c in CLASSES] and cols[-1] == "miou"
