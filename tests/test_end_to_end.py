"""The mini Table 1 end to end: manifest -> runner -> train -> evaluate -> result JSON -> table.

The CI cells of the mini table run once per session with 3 seeds (module fixture); their numbers are
compared with those stored in results/regression/ by `fishertune regression update`, within the bands
stored with them (measured over environments: fishertune/report/regression.py).
"""

import json
from pathlib import Path

import pytest

from fishertune.cli import main
from fishertune.report import regression
from fishertune.runner.manifest import load_manifest
from fishertune.runner.run import run_manifest, select_cells

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "benchmarks" / "mini" / "table1.yaml"
MINI_FP64 = ROOT / "benchmarks" / "mini" / "table1-fp64.yaml"

#: the rows CI runs in float64 on seed 42 against their floor bands (mini-table1-fp64.json): on SAM, whose
#: windowed blocks take the token methods' most particular path, full, freeze, LoRA, Rein and FisherTune
#: (the rows the planted faults of benchmarks/mini/faults.py touch: all six flagged there, against 5 by the
#: float32 bands), and DINOv2 frozen
FP64_CI_CELLS = ["sam-tiny--full--*", "sam-tiny--freeze--*", "sam-tiny--lora--*", "sam-tiny--rein--*",
                 "sam-tiny--fishertune--*", "dinov2-tiny--freeze--*"]
#: the rows CI runs in float32, the main job's precision, with 3 seeds against their measured bands
#: (mini-table1.json): full, freeze and FisherTune on SAM and DINOv2 frozen, 12 cells. LoRA and Rein left the
#: float32 rows when CI neared its 30 minutes (28 min 55 s of tests on 2026-12-06); the float64 rows keep
#: them, with a check that flags more. `fishertune run benchmarks/mini/table1.yaml` and `fishertune
#: regression check` cover every cell
CI_CELLS = ["sam-tiny--full--*", "sam-tiny--freeze--*", "sam-tiny--fishertune--*", "dinov2-tiny--freeze--*"]
CI_SEEDS = 3


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory, monkeypatch_module):
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch_module.setenv("FISHERTUNE_CACHE", str(cache))
    results = tmp_path_factory.mktemp("results")
    lm = load_manifest(MINI, {"seeds": CI_SEEDS})
    outcome = run_manifest(lm, str(results), only=CI_CELLS, progress=False)
    return lm, results, outcome


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_every_cell_runs_and_records_what_design_asks(mini_run):
    lm, results, outcome = mini_run
    ran = select_cells(lm.cells(), CI_CELLS)
    assert [s for _, s in outcome] == ["done"] * len(ran)
    assert {c.method for c in ran} == {"full", "freeze", "fishertune"}
    assert len(ran) == len(CI_CELLS) * CI_SEEDS and len({c.seed for c in ran}) == CI_SEEDS
    for cell in ran:
        r = json.loads((results / lm.manifest.name / f"{cell.id}.json").read_text())
        assert r["status"] == "done" and r["config"] == cell.config
        assert set(r["targets"]) == {"cityscapes", "bdd100k", "mapillary"}
        for t in r["targets"].values():
            assert len(t["per_class_iou"]) == 19 and len(t["confusion"]) == 19
            assert t["num_images"] > 0
        mean = sum(t["miou"] for t in r["targets"].values()) / 3
        assert r["aggregate"]["miou"] == pytest.approx(mean)
        for key in ("wall_time_s", "peak_memory_mb", "device", "seed", "git", "versions", "params"):
            assert key in r
        trainable, total = r["params"]["backbone_trainable"], r["params"]["backbone_total"]
        if cell.method in ("full", "freeze"):
            assert trainable == (0 if cell.method == "freeze" else total)
        else:
            assert 0 < trainable < 0.5 * total  # a part of the backbone (VPT's 150 prompts are 18% of a tiny one)
        losses = [loss for _, loss in r["train"]["losses"]]
        assert losses[-1] < losses[0]  # it trained


def test_trained_model_beats_chance(mini_run):
    lm, results, _ = mini_run
    for full in (c for c in select_cells(lm.cells(), CI_CELLS) if c.method == "full"):
        r = json.loads((results / lm.manifest.name / f"{full.id}.json").read_text())
        # 19 classes: a constant or random predictor stays near 100/19/19 ~ 0.3 mIoU on these scenes
        assert r["aggregate"]["miou"] > 5.0, full.id


def test_rerun_skips_finished_cells(mini_run):
    lm, results, _ = mini_run
    outcome = run_manifest(lm, str(results), only=CI_CELLS, progress=False)
    assert [s for _, s in outcome] == ["skipped"] * len(outcome) and len(outcome) == len(select_cells(lm.cells(), CI_CELLS))


def test_numbers_match_the_stored_regression_numbers_within_their_bands(mini_run):
    lm, results, _ = mini_run
    stored = ROOT / "results" / "regression" / "mini-table1.json"
    problems = regression.check(lm, results, stored, only=CI_CELLS)
    assert not problems, "\n".join(problems)
    record = json.loads(stored.read_text())
    ci_rows = {f"{c.backbone}--{c.row}" for c in select_cells(lm.cells(), CI_CELLS)}
    assert ci_rows <= set(record["rows"]) and all(len(record["rows"][r]["cells"]) == CI_SEEDS for r in ci_rows)
    assert record["made_with"]["torch"] and record["spread_from"], "stored without measured environment spread"


@pytest.fixture(scope="module")
def mini_run_fp64(tmp_path_factory, mini_run):
    """The CI rows in float64 (``benchmarks/mini/table1-fp64.yaml``), seed 42: after ``mini_run``, which made
    the miniature in this module's cache."""
    results = tmp_path_factory.mktemp("results-fp64")
    lm = load_manifest(MINI_FP64)
    return lm, results, run_manifest(lm, str(results), only=FP64_CI_CELLS, progress=False)


def test_float64_ci_rows_match_their_stored_numbers_within_the_floor_bands(mini_run_fp64):
    """In float64 the CI rows' numbers did not move with 2 threads or under torch 2.12.1 and 2.13.0 (measured:
    mini-signal.md figure 6, README "Regression numbers"), so the stored record's bands are the rule's floors
    (0.3 mIoU, 1 point of a class's IoU) and every class is compared, on one seed."""
    lm, results, outcome = mini_run_fp64
    assert [s for _, s in outcome] == ["done"] * len(FP64_CI_CELLS)
    stored = ROOT / "results" / "regression" / "mini-table1-fp64.json"
    problems, compared, _ = regression.check_report(lm, results, stored, only=FP64_CI_CELLS)
    assert not problems, "\n".join(problems)
    record = json.loads(stored.read_text())
    ci_rows = {f"{c.backbone}--{c.row}" for c in select_cells(lm.cells(), FP64_CI_CELLS)}
    assert record["spread_from"] and ci_rows <= set(record["rows"])
    assert compared == sum(len(t) for name in ci_rows for t in record["rows"][name]["targets"].values())
    # stored from measured environments that moved nothing, so more classes are compared than in float32
    fp32 = json.loads((ROOT / "results" / "regression" / "mini-table1.json").read_text())
    for name, row in record["rows"].items():
        assert all(e["sigma"] < 1e-6 for t in row["targets"].values() for e in t.values()), name
        assert sum(map(len, row["targets"].values())) > sum(map(len, fp32["rows"][name]["targets"].values())), name


def test_regression_check_notices_a_number_beyond_its_band(mini_run, tmp_path):
    lm, results, _ = mini_run
    stored = regression.build(lm, results, only=CI_CELLS)
    row = next(iter(stored["rows"].values()))
    entry = row["targets"]["cityscapes"]["miou"]
    entry["sigma"] = 0.2
    band = regression.band(entry, "miou", len(row["cells"]), stored["rule"])
    for seed in entry["values"]:
        entry["values"][seed] += band * 1.5
    problems = regression.compare(stored, regression.fresh_record(lm, results, CI_CELLS))
    assert len(problems) == 1 and "cityscapes miou" in problems[0] and f"band {band:.2f}" in problems[0]
    for seed in entry["values"]:
        entry["values"][seed] -= band  # now 0.5 bands off: within
    assert regression.compare(stored, regression.fresh_record(lm, results, CI_CELLS)) == []
    # what `regression check` says of a pass: how many statistics it compared, and the one nearest its band
    path = tmp_path / "stored.json"
    path.write_text(json.dumps(stored))
    problems, compared, closest = regression.check_report(lm, results, path, only=CI_CELLS)
    assert problems == [] and compared == sum(len(e) for r in stored["rows"].values() for e in r["targets"].values())
    assert closest.startswith(f"{next(iter(stored['rows']))} cityscapes miou:") and f"band {band:.2f}" in closest


def test_render_writes_markdown_and_latex_naming_the_miniature(mini_run, tmp_path, capsys):
    lm, results, _ = mini_run
    assert main(["render", "table1", "--results", str(results), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "table1.md").read_text()
    tex = (tmp_path / "table1.tex").read_text()
    assert "miniature" in md and "mini-table1 v1" in md and "Welch's t-test over seeds" in md
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"mIoU (\%)" in tex and r"$\pm$" in tex
    for cell in select_cells(lm.cells(), CI_CELLS):
        assert f"| {cell.row}" in md
    # each row is the mean over its 3 seeds with their standard deviation; DINOv2 has no row in the paper
    from fishertune.report.stats import estimate

    cells = [c for c in lm.cells() if c.method == "freeze" and c.backbone == "dinov2-tiny"]
    runs = [json.loads((results / lm.manifest.name / f"{c.id}.json").read_text()) for c in cells]
    assert len(runs) == CI_SEEDS
    citys = estimate(r["targets"]["cityscapes"]["miou"] for r in runs)
    assert f"| {citys.format(n=False)} / -" in md
    # the comparison column: each row against its backbone's full row (SAM's; DINOv2 ran no full row here)
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| Backbone")]
    assert "reference" in next(line for line in rows if line.startswith("| sam-tiny"))
    tested = [line for line in rows if "within noise" in line or "significant" in line]
    assert len(tested) == 2  # SAM's freeze and FisherTune rows, 3 seeds each


def test_same_seed_gives_identical_per_class_iou(tmp_path, mini_manifest):
    manifest = mini_manifest("det", "methods: [full]\ntrain: {iterations: 25}\n")
    lm = load_manifest(manifest)
    runs = []
    for name in ("a", "b"):
        run_manifest(lm, str(tmp_path / name), progress=False)
        (path,) = (tmp_path / name / lm.manifest.name).glob("*.json")
        runs.append(json.loads(path.read_text()))
    for target in runs[0]["targets"]:
        assert runs[0]["targets"][target]["per_class_iou"] == runs[1]["targets"][target]["per_class_iou"]
        assert runs[0]["targets"][target]["confusion"] == runs[1]["targets"][target]["confusion"]
    assert runs[0]["train"]["losses"] == runs[1]["train"]["losses"]


def test_paper_numbers_sit_beside_ours_with_the_papers_own_inconsistency_flagged(mini_run, tmp_path, monkeypatch):
    from fishertune.report import paper, tables

    lm, results, _ = mini_run
    # pretend our SAM rows (one seed's) are the paper's EVA02 rows, whose Full average is misprinted
    monkeypatch.setitem(paper.PAPER_BACKBONE, "sam", "eva02-l")
    sam = [r for r in tables.load_table_results(results, "table1")
           if r["backbone"] == "sam-tiny" and r["config"]["seed"] == lm.manifest.seed]
    df, notes = tables.table1_frame(sam)
    full = df.loc[("sam-tiny", "full")]
    r = next(r for r in sam if r["method"] == "full")
    ours = r["targets"]["cityscapes"]["miou"]
    assert full["Citys"] == f"{ours:.1f} / 62.1 ({ours - 62.1:+.1f})"
    assert full["Params (M)"].endswith("/ 304.20")
    assert full["Avg"].split(" / ")[1].startswith("60.9*")
    assert len(notes) == 1 and "60.97" in notes[0]


def test_table2_protocol_reports_acdc_per_condition_and_their_mean(tmp_path, mini_manifest):
    manifest = mini_manifest("t2", "methods: [freeze]\nsource: cityscapes\ntargets: [bdd100k, acdc]\n"
                                   "train: {iterations: 10}\n", table="table2")
    lm = load_manifest(manifest)
    run_manifest(lm, str(tmp_path / "runs"), progress=False)
    (path,) = (tmp_path / "runs" / "t2").glob("*.json")
    acdc = json.loads(path.read_text())["targets"]["acdc"]
    groups = acdc["groups"]
    assert set(groups) == {"fog", "night", "rain", "snow"}
    assert acdc["num_images"] == sum(g["num_images"] for g in groups.values())
    assert acdc["miou"] == pytest.approx(sum(g["miou"] for g in groups.values()) / 4)
    protocol = lm.manifest.eval  # the mini protocol's sliding window, recorded with the numbers
    assert acdc["test_size"] == list(protocol.test_sizes["acdc"]) and acdc["test_size"] != [1920, 1080]
    assert acdc["crop_size"] == lm.manifest.train.crop_size == 64 and acdc["stride"] == protocol.stride == 43
    # the pooled matrix is the sum of the conditions' matrices
    pooled = [[sum(g["confusion"][i][j] for g in groups.values()) for j in range(19)] for i in range(19)]
    assert acdc["confusion"] == pooled


def test_the_mask2former_head_trains_and_evaluates_through_the_runner(tmp_path, mini_manifest):
    from fishertune.heads import build_head

    manifest = mini_manifest("m2f", "methods: [freeze]\nhead: {name: mask2former-tiny, config: {}}\n"
                                    "train: {iterations: 60}\nexecution: {log_every: 10}\n")
    run_manifest(load_manifest(manifest), str(tmp_path / "runs"), progress=False)
    (path,) = (tmp_path / "runs" / "m2f").glob("*.json")
    r = json.loads(path.read_text())
    assert r["config"]["head"]["name"] == "mask2former-tiny"
    head = build_head("mask2former-tiny", 128, 19, **r["config"]["head"]["config"])  # the protocol's small one
    assert r["params"]["head_trainable"] == sum(p.numel() for p in head.parameters())
    losses = [loss for _, loss in r["train"]["losses"]]
    assert len(losses) == 6 and losses[-1] < 0.85 * losses[0]  # measured 0.71: its matched-mask losses fall
    assert all(t["num_images"] > 0 and sum(map(sum, t["confusion"])) > 0 for t in r["targets"].values())


def test_tiny_override_runs_the_real_manifest_on_a_miniature_in_fishertune_data(mini_run, tmp_path, monkeypatch, capsys):
    """`tox -e reproduce-table1 -- --tiny` with FISHERTUNE_DATA at a miniature: the real Table 1 manifest,
    tiny backbones, same protocol, same data as the mini table, so the same numbers, in a table of its own."""
    lm, results, _ = mini_run
    from fishertune.runner.data import miniature_dir

    synth = miniature_dir(lm.manifest)
    assert (synth / "SYNTH.json").is_file()
    monkeypatch.setenv("FISHERTUNE_DATA", str(synth))
    monkeypatch.delenv("FISHERTUNE_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)
    code = main(["reproduce", str(ROOT / "benchmarks" / "table1.yaml"), "--tiny", "--only", "sam-tiny--freeze--*",
                 "--results", str(tmp_path / "runs")])
    assert code == 0
    (ours,) = (tmp_path / "runs" / "table1-tiny").glob("sam-tiny--freeze--*.json")
    tiny = json.loads(ours.read_text())
    assert tiny["manifest"]["tiny"] and tiny["manifest"]["data_generated"] and tiny["manifest"]["data_kind"] == "real"
    mini = next(c for c in select_cells(lm.cells(), ["sam-tiny--freeze--*"]))
    ref = json.loads((results / lm.manifest.name / f"{mini.id}.json").read_text())
    for target in ref["targets"]:
        assert tiny["targets"][target]["per_class_iou"] == ref["targets"][target]["per_class_iou"]
    md = (tmp_path / "results" / "tables" / "table1-tiny" / "table1.md").read_text()
    assert "TINY OVERRIDE" in md and "NOT the real data" in md and "Manifest table1 v1" in md
    assert not (tmp_path / "results" / "tables" / "table1").exists()  # never where a real table goes


def test_regression_update_says_what_moved_and_keeps_the_rows_not_selected(mini_run, tmp_path, capsys):
    lm, results, _ = mini_run
    stored = tmp_path / "stored.json"
    seeds = ["--seeds", str(CI_SEEDS)]
    assert main(["regression", "update", str(MINI), "--results", str(results), "--only", *CI_CELLS, *seeds,
                 "--stored", str(stored)]) == 0
    first = json.loads(stored.read_text())
    assert set(first["rows"]) == {f"{c.backbone}--{c.row}" for c in select_cells(lm.cells(), CI_CELLS)}
    assert first["made_with"]["torch"] and first["rows"]["sam-tiny--full"]["cells"].keys() == {"42", "43", "44"}
    # an old mIoU that differs beyond its band, and a stored row outside the selection: update lists the
    # first and keeps the second
    some, other = "sam-tiny--full", "sam-tiny--freeze"
    entry = first["rows"][some]["targets"]["bdd100k"]["miou"]
    entry["values"] = {s: v + 25.0 for s, v in entry["values"].items()}
    first["bands_from"] = "lent.json"  # as if the first update had lent bands to the rows it stored
    stored.write_text(json.dumps(first))
    capsys.readouterr()
    assert main(["regression", "update", str(MINI), "--results", str(results), "--only", "sam-tiny--full--*", *seeds,
                 "--stored", str(stored)]) == 0
    out = capsys.readouterr().out
    assert f"{some} bdd100k miou" in out and "1 statistic(s) moved" in out
    second = json.loads(stored.read_text())
    assert set(second["rows"]) == set(first["rows"]) and second["rows"][other] == first["rows"][other]
    assert second["bands_from"] == "lent.json"  # the rows kept keep saying where their bands came from
    assert main(["regression", "check", str(MINI), "--results", str(results), "--only", *CI_CELLS, *seeds,
                 "--stored", str(stored)]) == 0
    # every row stored again, none lent a band: the record no longer names the file it once borrowed from
    assert main(["regression", "update", str(MINI), "--results", str(results), "--only", *CI_CELLS, *seeds,
                 "--stored", str(stored)]) == 0
    assert "bands_from" not in json.loads(stored.read_text())
