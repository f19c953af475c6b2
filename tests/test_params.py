"""`fishertune params`: every full-size backbone x every method, counted on the meta device."""

import json
from pathlib import Path

import pytest

from fishertune.backbones import BACKBONES
from fishertune.cli import main
from fishertune.report.paper import paper_table
from fishertune.tuning import registered_methods

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"clip", "mae", "sam", "eva02", "dinov2"}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("params") / "params.json"
    assert main(["params", "--format", "json", "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_every_full_size_backbone_meets_every_registered_method(rows):
    full_size = {n for n in BACKBONES.names() if BACKBONES.get(n).weights}
    assert {r["family"] for r in rows} == FAMILIES
    assert {(r["backbone"], r["method"]) for r in rows} == {(b, m) for b in full_size for m in registered_methods()}
    assert all(set(r) == {"backbone", "family", "method", "backbone_trainable", "head_trainable", "backbone_total",
                          "kept_bytes", "paper_trainable_m"} for r in rows)


def test_counts_follow_what_each_method_trains(rows):
    for r in rows:
        assert r["head_trainable"] > 0, r  # the decode head always trains
        if r["method"] == "full":
            assert r["backbone_trainable"] == r["backbone_total"]
        if r["method"] == "freeze":
            assert r["backbone_trainable"] == 0
        assert 0 <= r["backbone_trainable"] <= r["backbone_total"]


def test_kept_model_size_is_what_trains_plus_the_head_in_float32_and_sparse_elements_with_their_indices(rows):
    for r in rows:
        head = 4 * r["head_trainable"]
        if r["method"] in ("childtune", "fishertune"):  # value + int32 index per chosen element
            assert r["kept_bytes"] == 8 * r["backbone_trainable"] + head, r
        else:  # full: the whole backbone; freeze: the head alone
            assert r["kept_bytes"] == 4 * r["backbone_trainable"] + head, r
    dinov2 = {r["method"]: r["kept_bytes"] for r in rows if r["backbone"] == "dinov2-l"}
    assert dinov2["freeze"] < dinov2["lora"] < dinov2["rein"] < dinov2["fishertune"] < dinov2["full"]


def test_paper_column_is_the_papers_printed_number_or_null(rows):
    paper = paper_table("table1")
    family_key = {"clip": "clip-vit-l", "mae": "mae-vit-h", "sam": "sam-vit-h", "eva02": "eva02-l", "dinov2": "dinov2-l"}
    for r in rows:
        hit = paper[(paper.backbone == family_key[r["family"]]) & (paper.method == r["method"])]
        if hit.empty:
            assert r["paper_trainable_m"] is None, r
        else:
            assert r["paper_trainable_m"] == pytest.approx(float(hit.trainable_params_m.iloc[0])), r
    sam_full = next(r for r in rows if r["backbone"] == "sam-h" and r["method"] == "full")
    # the paper prints 632.18M for SAM-H: its image encoder at 512 without the neck
    assert sam_full["backbone_total"] / 1e6 == pytest.approx(sam_full["paper_trainable_m"], abs=0.01)


def test_committed_markdown_is_what_the_command_writes(tmp_path):
    out = tmp_path / "params.md"
    assert main(["params", "--output", str(out)]) == 0
    committed = ROOT / "results" / "tables" / "params.md"
    assert committed.read_text() == out.read_text(), (
        "results/tables/params.md is stale: regenerate it with "
        "`fishertune params --format md --output results/tables/params.md`")


def test_unknown_backbone_or_method_is_one_line_and_exit_2(capsys, tmp_path):
    out = tmp_path / "p.md"
    assert main(["params", "--backbones", "dinov2-x", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dinov2-" in err and "did you mean" in err
    assert main(["params", "--methods", "lorra", "--output", str(out)]) == 2
    assert not out.exists()


@pytest.mark.parametrize("method, backbone, count", [
    ("lora", "clip-l", 24 * 2 * (8 * 1024 + 1024 * 8)),  # 786,432: rank 8 on q and v, the paper's 0.79M
    ("lora", "dinov2-l", 786_432), ("lora", "eva02-l", 786_432), ("lora", "mae-l", 786_432),
    ("lora", "sam-h", 32 * 2 * (8 * 1280 + 1280 * 8)),  # 1,310,720 on the 32-block, width-1280 ViT-H
    ("lora", "mae-h", 1_310_720),
    ("adaptformer", "clip-l", 24 * (1024 * 64 + 64 + 64 * 1024 + 1024)),  # 3,171,840: the paper's 3.17M
    ("adaptformer", "dinov2-l", 3_171_840), ("adaptformer", "eva02-l", 3_171_840), ("adaptformer", "mae-l", 3_171_840),
    ("adaptformer", "sam-h", 32 * (1280 * 64 + 64 + 64 * 1280 + 1280)),  # 5,285,888
    ("adaptformer", "mae-h", 5_285_888),
])
def test_peft_methods_train_the_paper_sized_parameter_sets_on_every_full_size_backbone(method, backbone, count):
    from fishertune.report.params import parameter_rows

    (row,) = parameter_rows([backbone], [method])
    assert row["backbone_trainable"] == count
