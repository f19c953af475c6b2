"""Seeds as a grid axis, the statistics over seeds, and `fishertune compare`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from fishertune.cli import main
from fishertune.errors import UserError
from fishertune.report.stats import estimate, welch
from fishertune.runner.manifest import extend_seeds, load_manifest


def test_seeds_expand_to_cells_and_the_first_seed_keeps_its_ids(mini_manifest):
    one = load_manifest(mini_manifest("s1", "methods: [full, freeze]\n"))
    three = load_manifest(mini_manifest("s3", "methods: [full, freeze]\nseeds: [42, 43, 44]\n"))
    by_flag = load_manifest(mini_manifest("s1", "methods: [full, freeze]\n"), {"seeds": 3})
    assert [c.seed for c in three.cells()] == [42, 43, 44, 42, 43, 44]
    assert len({c.id for c in three.cells()}) == 6
    assert {c.id for c in one.cells()} == {c.id for c in three.cells() if c.seed == 42}
    assert [c.id for c in by_flag.cells()] == [c.id for c in three.cells()]
    assert three.manifest.seed == 42 and three.manifest.seed_list == [42, 43, 44]


def test_extend_seeds_continues_or_cuts():
    assert extend_seeds([42], 3) == [42, 43, 44]
    assert extend_seeds([7, 3], 4) == [7, 3, 8, 9]
    assert extend_seeds([42, 43, 44], 1) == [42]


@pytest.mark.parametrize("body, message", [
    ("seeds: [1, 1]\n", "appears twice"),
    ("seeds: []\n", "seeds"),
    ("seed: 1\nseeds: [1, 2]\n", "give one of them"),
])
def test_bad_seeds_are_one_clear_error(mini_manifest, body, message):
    with pytest.raises(UserError, match=message):
        load_manifest(mini_manifest("bad", "methods: [full]\n" + body)).cells()


def test_welch_interval_agrees_with_its_test_and_needs_two_values():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = estimate(rng.normal(0, 1, 3))
        b = estimate(rng.normal(rng.uniform(-3, 3), 1, 4))
        d = welch(a, b)
        assert d.diff == pytest.approx(a.mean - b.mean)
        assert d.p == pytest.approx(stats.ttest_ind(a.values, b.values, equal_var=False).pvalue)
        assert d.significant == (not d.low <= 0 <= d.high)  # the 95% interval excludes 0 iff p < 0.05
    one = welch(estimate([1.0]), estimate([2.0, 3.0]))
    assert not one.tested and one.significant is None and "(n=1)" in one.format()
    same = welch(estimate([1.0, 1.0]), estimate([1.0, 1.0]))
    assert same.tested and not same.significant


def test_estimate_formats_mean_std_and_count():
    e = estimate([50.0, 52.0, 51.0])
    assert e.format() == "51.0 ± 1.0 (n=3)" and e.format(latex=True, n=False) == r"51.0 $\pm$ 1.0"
    assert estimate([3.14159]).format() == "3.1"


def _result(root, manifest, backbone, row, seed, values):
    folder = root / manifest
    folder.mkdir(parents=True, exist_ok=True)
    r = {"status": "done", "manifest": {"name": manifest}, "backbone": backbone, "row": row, "seed": seed,
         "cell_id": f"{backbone}--{row}--{seed}", "method": row, "config": {"seed": seed}, "params": {},
         "targets": {t: {"miou": v, "per_class_iou": {}} for t, v in values.items()},
         "aggregate": {"miou": sum(values.values()) / len(values)}}
    (folder / f"{backbone}--{row}--{seed}.json").write_text(json.dumps(r))


def test_compare_marks_a_shift_beyond_the_noise_and_not_one_within(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for seed, noise in zip((42, 43, 44), (0.0, 0.3, -0.3)):
        _result(a, "m", "dinov2-tiny", "lora", seed, {"cityscapes": 30 + noise, "bdd100k": 20 + noise})
        _result(b, "m", "dinov2-tiny", "lora", seed, {"cityscapes": 35 + noise, "bdd100k": 20.1 - noise})
    _result(a, "m", "dinov2-tiny", "full", 42, {"cityscapes": 30, "bdd100k": 20})
    _result(b, "m", "dinov2-tiny", "full", 42, {"cityscapes": 31, "bdd100k": 20})
    assert main(["compare", str(a), str(b), "--fail-on-difference"]) == 1
    out = capsys.readouterr().out
    lines = {tuple(c.strip() for c in line.split("|")[2:5]): line for line in out.splitlines() if "|" in line}
    assert "significant" in lines[("dinov2-tiny", "lora", "cityscapes")]
    assert "within noise" in lines[("dinov2-tiny", "lora", "bdd100k")]
    assert "(n=1)" in lines[("dinov2-tiny", "full", "cityscapes")]
    assert "with one seed on a side are not tested" in out
    assert main(["compare", str(a), str(a)]) == 0


def test_a_row_whose_config_changed_averages_only_its_newest_configuration(tmp_path, capsys):
    """Cells of one row made before and after a method's config changed (other cell ids, same row) are two
    experiments: tables and compare keep the newest configuration's seeds and say what they left out."""
    import os

    from fishertune.report.compare import grouped
    from fishertune.report.tables import latest_configs
    from fishertune.runner.store import iter_results

    root = tmp_path / "runs"
    for seed in (42, 43):
        _result(root, "m", "sam-tiny", "vpt", seed, {"cityscapes": 10.0})
    for path in (root / "m").glob("*.json"):  # the old configuration, written an hour earlier
        os.utime(path, (path.stat().st_mtime - 3600,) * 2)
    new = json.loads((root / "m" / "sam-tiny--vpt--42.json").read_text())
    new.update(cell_id="sam-tiny--vpt--new42", config={"seed": 42, "method_config": {"prompts": 10}})
    new["targets"]["cityscapes"]["miou"] = 30.0
    (root / "m" / "sam-tiny--vpt--new42.json").write_text(json.dumps(new))
    kept = latest_configs(list(iter_results(root)))
    assert [r["cell_id"] for r in kept] == ["sam-tiny--vpt--new42"]
    err = capsys.readouterr().err
    assert "m sam-tiny vpt: left out 2 older result(s) of another configuration" in err
    assert "sam-tiny--vpt--42" in err and "sam-tiny--vpt--43" in err
    assert [r["seed"] for r in grouped(root)[("m", "sam-tiny", "vpt")]] == [42]
    assert "left out 2 older" in capsys.readouterr().err
    unchanged = tmp_path / "unchanged"
    for seed in (42, 43):
        _result(unchanged, "m", "sam-tiny", "vpt", seed, {"cityscapes": 10.0})
    assert len(latest_configs(list(iter_results(unchanged)))) == 2 and not capsys.readouterr().err


def _stored_result(root, lm, cell, miou: float, road: float, torch_version: str) -> None:
    """A finished result of ``cell`` under ``root`` as the runner stores it, with the given numbers."""
    from fishertune.runner.store import ResultStore

    store = ResultStore(root, lm.results_name)
    targets = {t: {"miou": miou, "per_class_iou": {"road": road}} for t in cell.config["targets"]}
    record = {"status": "done", "cell_id": cell.id, "manifest": {"name": lm.manifest.name, "version": 1},
              "config": cell.config, "backbone": cell.backbone, "row": cell.row, "seed": cell.seed,
              "targets": targets, "aggregate": {"miou": miou}, "params": {}, "device": "cpu (test, 1 threads)",
              "versions": {"torch": torch_version, "python": "3"}}
    store.path(cell.id).parent.mkdir(parents=True, exist_ok=True)
    store.path(cell.id).write_text(json.dumps(record))


def test_regression_bands_are_measured_on_the_cells_a_variant_ran(tmp_path, mini_manifest):
    """An environment variant that ran one seed of a row gives that row's spread; one that ran none of the
    cells is refused in one line (a band from nothing would be the seeds' spread, silently)."""
    from fishertune.report import regression

    lm = load_manifest(mini_manifest("bands", "methods: [freeze]\nseeds: [1, 2]\n"))
    first, second = lm.cells()
    main, variant, empty = tmp_path / "main", tmp_path / "variant", tmp_path / "empty"
    _stored_result(main, lm, first, 20.0, 50.0, "2.14")
    _stored_result(main, lm, second, 21.0, 52.0, "2.14")
    _stored_result(variant, lm, first, 20.2, 50.0, "2.12")  # seed 1 only, 0.2 mIoU off
    record = regression.build(lm, main, [variant])
    assert record["spread_from"] == [{"device": "cpu (test, 1 threads)", "torch": "2.12", "python": "3"}]
    row = record["rows"]["dinov2-tiny--freeze"]
    assert row["cells"] == {"1": first.id, "2": second.id}
    # one deviation d = 0.2 per target: 2 sigma^2 = d^2, pooled with the same prior, so sigma = d / sqrt(2)
    assert row["targets"]["cityscapes"]["miou"]["sigma"] == pytest.approx(0.2 / np.sqrt(2))
    assert row["targets"]["cityscapes"]["road"]["sigma"] == pytest.approx(0.0)  # unmoved, hence compared
    # a check of one seed (tox -e regression runs the manifest's one) compares the stored classes too
    fresh = regression.fresh_record(lm, variant, only=[first.id])
    assert set(fresh["rows"]["dinov2-tiny--freeze"]["targets"]["cityscapes"]) == {"miou", "road"}
    assert regression.compare(record, fresh) == []  # 0.2 off, within the band of one seed
    empty.mkdir()
    with pytest.raises(UserError, match="holds none of the selected cells"):
        regression.build(lm, main, [empty])


def test_a_partial_regression_update_keeps_each_rows_provenance(tmp_path, mini_manifest):
    """`regression update --only ROWS` rewrites those rows; the others keep their numbers, and every row names
    the machine and torch that made it, since the record's own made_with is only the last update's."""
    from fishertune.report import regression

    lm = load_manifest(mini_manifest("partial", "methods: [freeze, full]\n"))
    cells = {c.row: c for c in lm.cells()}
    freeze, full = cells["freeze"], cells["full"]
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "stored.json"
    for cell in (freeze, full):
        _stored_result(first, lm, cell, 20.0, 50.0, "2.12")
    regression.update(lm, first, out=out)
    _stored_result(second, lm, full, 25.0, 55.0, "2.14")
    _, moved = regression.update(lm, second, out=out, only=[full.id])
    record = json.loads(out.read_text())
    assert moved  # full moved by 5 mIoU, and the update says so
    assert record["made_with"]["torch"] == "2.14"
    rows = record["rows"]
    assert rows["dinov2-tiny--freeze"]["made_with"]["torch"] == "2.12"  # kept, with what made it
    assert rows["dinov2-tiny--freeze"]["targets"]["cityscapes"]["miou"]["values"] == {"42": 20.0}
    assert rows["dinov2-tiny--full"]["made_with"]["torch"] == "2.14"
    assert rows["dinov2-tiny--full"]["spread_from"] == []  # no variant ran its cells
    assert rows["dinov2-tiny--full"]["targets"]["cityscapes"]["miou"]["values"] == {"42": 25.0}
    assert regression.check(lm, second, stored=out, only=[full.id]) == []
    assert regression.check(lm, first, stored=out, only=[freeze.id]) == []
    assert regression.check(lm, first, stored=out, only=[full.id])  # the old full is 5 mIoU off the new one


def test_a_record_from_another_machine_is_a_spread(tmp_path, mini_manifest):
    """A stored record made elsewhere (its runs gone) lends its per-seed values as an environment variant of the
    cells whose ids are unchanged: the band then covers that machine's move, and spread_from names it."""
    from fishertune.report import regression

    lm = load_manifest(mini_manifest("record-spread", "methods: [freeze]\nseeds: [1, 2]\n"))
    first, second = lm.cells()
    other, here, out = tmp_path / "other", tmp_path / "here", tmp_path / "other.json"
    _stored_result(other, lm, first, 20.0, 50.0, "2.12")
    _stored_result(other, lm, second, 21.0, 52.0, "2.12")
    regression.update(lm, other, out=out)
    _stored_result(here, lm, first, 20.6, 50.0, "2.14")
    _stored_result(here, lm, second, 21.0, 52.0, "2.14")
    record = regression.build(lm, here, [out])
    assert record["spread_from"] == [{"device": "cpu (test, 1 threads)", "torch": "2.12", "python": "3"}]
    assert record["rows"]["dinov2-tiny--freeze"]["spread_from"] == record["spread_from"]
    assert record["rows"]["dinov2-tiny--freeze"]["made_with"]["torch"] == "2.14"
    entry = record["rows"]["dinov2-tiny--freeze"]["targets"]["cityscapes"]
    # deviations 0.6 and 0 (2 sigma^2 = d^2 each), pooled with the same prior: sigma^2 = 0.09
    assert entry["miou"]["sigma"] == pytest.approx(0.3)
    assert entry["road"]["sigma"] == pytest.approx(0.0)
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps({**json.loads(out.read_text()), "rows": {"x": {"cells": {"1": first.id}}}}))
    with pytest.raises(UserError, match="a damaged regression record"):
        regression.build(lm, here, [damaged])
    with pytest.raises(UserError, match="not a stored regression record of record-spread"):
        regression.build(lm, here, [tmp_path / "here" / "record-spread" / f"{first.id}.json"])


def test_regression_update_says_a_dropped_class_apart_from_a_move(tmp_path, mini_manifest, capsys):
    """A class whose new spread is too wide to compare is dropped from the record; update's summary says so and
    does not count it as a statistic that moved."""
    from fishertune.cli import main

    path = mini_manifest("dropped", "methods: [freeze]\n")
    lm = load_manifest(path)
    (cell,) = lm.cells()
    here, calm, loud, out = tmp_path / "here", tmp_path / "calm", tmp_path / "loud", tmp_path / "stored.json"
    _stored_result(here, lm, cell, 20.0, 50.0, "2.14")
    _stored_result(calm, lm, cell, 20.0, 50.0, "2.12")  # road unmoved elsewhere: stable, stored
    _stored_result(loud, lm, cell, 20.0, 65.0, "2.13")  # road 15 points off elsewhere: too unstable to compare
    assert main(["regression", "update", str(path), "--results", str(here), "--spread", str(calm), "--stored", str(out)]) == 0
    assert "road" in json.loads(out.read_text())["rows"]["dinov2-tiny--freeze"]["targets"]["cityscapes"]
    capsys.readouterr()
    assert main(["regression", "update", str(path), "--results", str(here), "--spread", str(loud), "--stored", str(out)]) == 0
    said = capsys.readouterr().out
    assert "road" not in json.loads(out.read_text())["rows"]["dinov2-tiny--freeze"]["targets"]["cityscapes"]
    assert "no longer stored (now too unstable to compare)" in said and "moved beyond" not in said
