"""Manifests: validation errors are one line naming file and field (exit 2); cells have stable ids."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fishertune.cli import main
from fishertune.runner.manifest import load_manifest

GOOD = """\
version: 1
name: t
table: table1
include: protocol.yaml
backbones: [dinov2-tiny]
methods: [full, freeze]
"""
PROTOCOL = """\
data: {kind: miniature}
train: {iterations: 3, crop_size: 64, short_edge_range: [32, 128]}
eval: {crop_size: 64, stride: 43}
"""


def write(tmp_path, text, protocol=PROTOCOL, name="m.yaml"):
    (tmp_path / "protocol.yaml").write_text(protocol)
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


BAD = [
    ("unknown key with suggestion", GOOD + "train: {lrr: 0.1}\n", "train.lrr: unknown field; did you mean 'lr'"),
    ("unknown top-level key", GOOD + "backbone: [x]\n", "backbone: unknown field; did you mean 'backbones'"),
    ("YAML 1.1 exponent read as text", GOOD + "train: {lr: 1e-4}\n", "train.lr: expected a number, got the string '1e-4'"),
    ("YAML 1.1 boolean", GOOD.replace("name: t", "name: off"), "name: expected text, got the boolean False"),
    ("wrong type", GOOD + "train: {iterations: many}\n", "train.iterations"),
    ("float for int", GOOD + "seed: 4.5\n", "seed"),
    ("negative iterations", GOOD + "train: {iterations: -1}\n", "train.iterations"),
    ("missing version", GOOD.replace("version: 1\n", ""), "version: required field is missing"),
    ("unknown backbone", GOOD.replace("dinov2-tiny", "dinov2-tinny"), "unknown backbone 'dinov2-tinny'; did you mean 'dinov2-tiny'"),
    ("unknown method", GOOD.replace("full, freeze", "full, frezze"), "unknown method 'frezze'; did you mean 'freeze'"),
    ("method config field", GOOD + "method_configs: {full: {rank: 8}}\n", "method 'full' config field 'rank'"),
    ("unknown target", GOOD + "targets: [cityscape]\n", "unknown target 'cityscape'"),
    ("test size not a pair", GOOD + "eval: {test_sizes: {cityscapes: [1024]}}\n", "eval.test_sizes.cityscapes"),
    ("YAML syntax", GOOD + "train: {iterations: 3\n", "not valid YAML"),
    ("not a mapping", "- a\n- b\n", "a manifest is a YAML mapping"),
    ("bad data kind", GOOD + "data: {kind: fake}\n", "data.kind"),
    ("unknown head", GOOD + "head: {name: mask2formr}\n", "unknown head 'mask2formr'"),
    ("head option", GOOD + "head: {config: {chanels: 8}}\n", "head 'mask2former' has no option 'chanels'"),
    ("duplicate cell", GOOD.replace("full, freeze", "full, full"), "the same cell appears twice"),
]


@pytest.mark.parametrize("case,text,message", BAD, ids=[b[0] for b in BAD])
def test_bad_manifest_is_one_line_exit_2(tmp_path, capsys, case, text, message):
    path = write(tmp_path, text)
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert str(path) in err and message in err, err
    assert not (tmp_path / "results").exists()


def test_two_levels_of_include_are_refused(tmp_path, capsys):
    path = write(tmp_path, GOOD, protocol=PROTOCOL + "include: other.yaml\n")
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "only one level of include" in capsys.readouterr().err


def test_missing_manifest_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "manifest not found" in capsys.readouterr().err


def test_console_script_prints_no_traceback(tmp_path):
    path = write(tmp_path, GOOD + "train: {lr: 1e-4}\n")
    proc = subprocess.run([sys.executable, "-m", "fishertune.cli", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("fishertune: error:")


def test_defaults_and_deltas_merge(tmp_path):
    lm = load_manifest(write(tmp_path, GOOD + "train: {iterations: 7}\n"))
    t = lm.manifest.train
    assert t.iterations == 7  # manifest over include
    assert t.crop_size == 64  # include over defaults
    assert t.lr == 1e-4 and t.batch_size == 4  # defaults (the paper's protocol)
    assert lm.manifest.eval.test_sizes["bdd100k"] == [1280, 720]
    one = load_manifest(write(tmp_path, GOOD + "eval: {test_sizes: {acdc: [480, 270]}}\n")).manifest.eval.test_sizes
    assert one["acdc"] == [480, 270] and one["cityscapes"] == [1024, 512]  # a delta keeps the other targets


def test_naming_another_head_replaces_the_included_heads_options(tmp_path):
    protocol = PROTOCOL + "head: {name: light, config: {channels: 32, dropout: 0.0}}\n"
    same = load_manifest(write(tmp_path, GOOD + "head: {config: {channels: 16}}\n", protocol=protocol)).manifest.head
    assert same.name == "light" and same.config == {"channels": 16, "dropout": 0.0}  # same head: merged
    other = load_manifest(write(tmp_path, GOOD + "head: {name: linear, config: {levels: [2]}}\n", protocol=protocol))
    assert other.manifest.head.name == "linear" and other.manifest.head.config == {"levels": [2]}  # not light's
    bad = write(tmp_path, GOOD + "head: {name: linear, config: {levels: [4]}}\n", protocol=protocol)
    assert main(["run", str(bad), "--dry-run"]) == 2  # the head's own check, one line


def test_cell_ids_are_stable_and_follow_what_changes_numbers(tmp_path):
    ids = [c.id for c in load_manifest(write(tmp_path, GOOD)).cells()]
    assert ids == [c.id for c in load_manifest(write(tmp_path, GOOD)).cells()]
    assert len(set(ids)) == 2 and ids[0].startswith("dinov2-tiny--full--gtav--")
    lr = [c.id for c in load_manifest(write(tmp_path, GOOD + "train: {lr: 2.0e-4}\n")).cells()]
    assert set(lr).isdisjoint(ids)
    workers = [c.id for c in load_manifest(write(tmp_path, GOOD + "execution: {num_workers: 7}\n")).cells()]
    assert workers == ids  # how a cell runs is not what it computes
    shuffled = load_manifest(write(tmp_path, GOOD, protocol=PROTOCOL.replace(
        "kind: miniature", "kind: miniature, synth_looks: shuffled")))
    assert set(c.id for c in shuffled.cells()).isdisjoint(ids)  # other images: other cells
    from fishertune.runner.data import miniature_dir

    plain = load_manifest(write(tmp_path, GOOD)).manifest
    assert miniature_dir(shuffled.manifest) == miniature_dir(plain).with_name(miniature_dir(plain).name + "-shuffled")


def test_data_verify_command(synth_root, tmp_path, capsys):
    assert main(["data", "verify", "cityscapes", "--root", str(synth_root / "cityscapes")]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["data", "verify", "cityscapes", "--root", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "absent") in err


def test_missing_weights_stop_the_run_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FISHERTUNE_WEIGHTS", raising=False)
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    path = write(tmp_path, GOOD.replace("dinov2-tiny", "dinov2-l"))
    assert main(["run", str(path), "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dinov2_vitl14_pretrain.pth" in err and "FISHERTUNE_WEIGHTS" in err
    assert not (tmp_path / "cache").exists()  # no data generated, nothing trained
    assert not list((tmp_path / "results").rglob("*.json"))


def test_data_verify_compares_counts(synth_root, tmp_path, capsys):
    import shutil

    copy = tmp_path / "synth"
    shutil.copytree(synth_root, copy)
    victim = sorted((copy / "bdd100k" / "images" / "10k" / "val").glob("*.jpg"))[0]
    victim.unlink()
    (copy / "bdd100k" / "labels" / "sem_seg" / "masks" / "val" / (victim.stem + ".png")).unlink()
    assert main(["data", "verify", "bdd100k", "--root", str(copy / "bdd100k")]) == 2
    out = capsys.readouterr().out
    assert "val: 5 found, 6 expected" in out
    assert main(["data", "verify", "bdd100k", "--root", str(copy / "bdd100k"), "--any-count"]) == 0


def test_manifest_knows_exactly_the_registered_data_sets():
    from fishertune.data import DATASETS
    from fishertune.runner.manifest import DATASET_NAMES

    assert set(DATASET_NAMES) == set(DATASETS)


def test_unwritable_table_directory_is_one_line(tmp_path, capsys):
    from fishertune.runner.store import atomic_write_text
    from fishertune.errors import UserError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write .*file/sub/t.md"):
        atomic_write_text(blocker / "sub" / "t.md", "text")


SHIPPED = sorted(p for p in (Path(__file__).resolve().parents[1] / "benchmarks").rglob("*.yaml")
                 if p.name != "protocol.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_manifest_loads_and_expands(path):
    lm = load_manifest(path)
    cells = lm.cells()
    assert cells and len({c.id for c in cells}) == len(cells)


@pytest.mark.parametrize("name, key, value", [("table1-fp64.yaml", "precision", "fp64"),
                                              ("signal-budget100.yaml", "iterations", 100)])
def test_copies_of_the_mini_table1_grid_differ_from_it_in_their_one_setting(name, key, value):
    """The mini manifests that repeat table1.yaml's grid (one level of include) to change one training setting:
    the same cells, configs equal but for that setting, ids of their own, so mini-signal.md's figures 6 (float64)
    and 7 (100 iterations) compare like with like. A protocol change made to one file and not the other fails."""
    mini = Path(__file__).resolve().parents[1] / "benchmarks" / "mini"
    base, copy = load_manifest(mini / "table1.yaml").cells(), load_manifest(mini / name).cells()
    assert [(c.backbone, c.row, c.seed) for c in base] == [(c.backbone, c.row, c.seed) for c in copy]
    for a, b in zip(base, copy):
        assert b.config["train"].pop(key) == value and a.config["train"].pop(key, None) != value
        assert a.config == b.config and a.id != b.id


BEST_ROWS = {("eva02-tiny", "full"), ("clip-tiny", "full")}
LOOKS_ROWS = {("eva02-tiny", "full"), ("eva02-tiny", "freeze")}


@pytest.mark.parametrize("name, base_name, iterations, pretrained, rows", [
    ("signal-budget400.yaml", "table1.yaml", 400, True, BEST_ROWS),
    ("signal-budget800.yaml", "table1.yaml", 800, True, BEST_ROWS),
    ("signal-budget1600.yaml", "table1.yaml", 1600, True, BEST_ROWS),
    ("signal-budget1600-random.yaml", "table1.yaml", 1600, False, BEST_ROWS),
    ("looks-shuffled-budget1600.yaml", "looks-shuffled-table1.yaml", 1600, True, LOOKS_ROWS),
    ("looks-shuffled-budget1600-random.yaml", "looks-shuffled-table1.yaml", 1600, False, LOOKS_ROWS)])
def test_the_long_budget_manifests_are_their_base_cells_but_for_the_iterations(name, base_name, iterations,
                                                                              pretrained, rows):
    """Figure 8 of mini-signal.md sets these cells beside the 200-iteration cells of their base manifest (same
    family, row and seed): they must be those cells with only ``train.iterations`` changed (and, for the
    random-init copies, ``pretrained``), or the curve would mix in another change."""
    mini = Path(__file__).resolve().parents[1] / "benchmarks" / "mini"
    base = {(c.backbone, c.row, c.seed): c for c in load_manifest(mini / base_name).cells()}
    cells = load_manifest(mini / name).cells()
    assert {(c.backbone, c.row) for c in cells} == rows
    for c in cells:
        a = base[c.backbone, c.row, c.seed]
        assert c.config["train"].pop("iterations") == iterations and a.config["train"].pop("iterations") == 200
        assert c.config.pop("pretrained") is pretrained and a.config.pop("pretrained") is True
        assert a.config == c.config and a.id != c.id


def test_table2_manifests_carry_reins_two_protocols():
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    m512 = load_manifest(root / "table2.yaml").manifest
    m1024 = load_manifest(root / "table2-1024.yaml").manifest
    for m in (m512, m1024):
        assert m.source == "cityscapes" and list(m.targets) == ["bdd100k", "acdc"] and m.table == "table2"
    assert (m512.train.crop_size, m512.eval.crop_size, m512.eval.stride, m512.train.lr) == (512, 512, 341, 1e-4)
    assert list(m512.eval.test_sizes["acdc"]) == [960, 540] and list(m512.eval.test_sizes["bdd100k"]) == [1280, 720]
    assert (m1024.train.crop_size, m1024.eval.crop_size, m1024.eval.stride) == (1024, 1024, 683)
    assert (m1024.train.batch_size, m1024.train.lr, m1024.train.warmup_iterations) == (8, 6e-5, 10000)
    assert list(m1024.eval.test_sizes["acdc"]) == [1920, 1080]
    # the two settings never share a cell id
    assert not {c.id for c in load_manifest(root / "table2.yaml").cells()} & {
        c.id for c in load_manifest(root / "table2-1024.yaml").cells()}


def test_every_table_a_manifest_can_name_has_a_renderer():
    from fishertune.report.tables import RENDERERS
    from fishertune.runner.manifest import TABLES

    assert set(TABLES) == set(RENDERERS)


def test_other_counts_are_an_option_recorded_in_results_tables_and_captions(tmp_path, synth_root, mini_manifest,
                                                                            monkeypatch, capsys):
    import shutil

    from fishertune.errors import UserError
    from fishertune.report.tables import caption, table_dir
    from fishertune.runner.data import open_datasets
    from fishertune.runner.run import _identity

    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    root = Path(shutil.copytree(synth_root, tmp_path / "data"))
    (root / "SYNTH.json").unlink()  # a tree in the official layout with other than the official counts
    path = mini_manifest("part", "methods: [freeze]\n", data=f"{{kind: real, root: {root}}}")
    official = load_manifest(path)
    with pytest.raises(UserError, match="counts that differ from the expected.*--any-count"):
        open_datasets(official.manifest, progress=False)
    other = load_manifest(path, {"data": {"counts": "any"}})
    source, targets = open_datasets(other.manifest, progress=False)  # every other check still made
    assert other.results_name == "part-anycount" and official.results_name == "part"
    assert other.cells()[0].id == official.cells()[0].id  # the same cell, kept apart by its folder
    record = _identity(other, other.cells()[0], "done")
    assert record["manifest"]["data_counts"] == "any"
    record |= {"targets": {t: {"num_images": len(d)} for t, d in targets.items()},
               "train": {"source_images": len(source)}}
    text = caption("table1", [record])
    assert f"OTHER COUNTS than the official ones (data.counts: any): gtav {len(source)} train, cityscapes " \
           f"{len(targets['cityscapes'])} val" in text
    assert table_dir([record]) == Path("results/tables/part-anycount")
    assert main(["run", str(path), "--any-count", "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == other.cells()[0].id
