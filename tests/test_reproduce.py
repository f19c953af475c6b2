"""`fishertune reproduce` (the tox reproduce-* envs): without data or weights it stops before any work,
listing every missing data set and checkpoint with the path where it is expected."""

import configparser
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _reproduce(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "fishertune.cli", "reproduce", *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "TQDM_DISABLE": "1", **env})


def test_without_data_or_weights_every_problem_is_listed_and_nothing_runs(tmp_path):
    data, weights, results = tmp_path / "data", tmp_path / "weights", tmp_path / "runs"
    out = _reproduce([str(ROOT / "benchmarks" / "table1.yaml"), "--results", str(results)],
                     {"FISHERTUNE_DATA": str(data), "FISHERTUNE_WEIGHTS": str(weights),
                      "FISHERTUNE_CACHE": str(tmp_path / "cache")}, tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    for name in ("gtav", "cityscapes", "bdd100k", "mapillary"):
        assert any(ln.startswith("data: ") and str(data / name) in ln for ln in lines), name
    for file in ("ViT-L-14.pt", "mae_pretrain_vit_large.pth", "sam_vit_h_4b8939.pth", "eva02_L_pt_m38m_p14.pt",
                 "dinov2_vitl14_pretrain.pth"):
        assert any(ln.startswith("weights: ") and str(weights / file) in ln for ln in lines), file
    assert any(ln.startswith("device: ") for ln in lines) != torch.cuda.is_available()
    assert "nothing was run" in lines[-1]
    assert not results.exists()  # no half-written results


def test_a_checkpoint_that_does_not_fit_is_named(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save({"not": torch.zeros(2)}, weights / "dinov2_vitl14_pretrain.pth")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"version: 1\nname: m\ntable: table2\ninclude: {ROOT / 'benchmarks' / 'table2.yaml'}\n"
                        "backbones: [dinov2-l]\nmethods: [freeze]\n")
    out = _reproduce([str(manifest), "--device", "cpu", "--results", str(tmp_path / "runs")],
                     {"FISHERTUNE_DATA": str(tmp_path / "data"), "FISHERTUNE_WEIGHTS": str(weights),
                      "FISHERTUNE_CACHE": str(tmp_path / "cache")}, tmp_path)
    assert out.returncode == 2
    bad = [ln for ln in out.stderr.splitlines() if ln.startswith("weights: ")]
    assert len(bad) == 1 and "does not fit" in bad[0] and "dinov2_vitl14_pretrain.pth" in bad[0]
    assert not any(ln.startswith("device: ") for ln in out.stderr.splitlines())  # --device cpu said so


def test_tox_has_a_reproduce_env_per_table_passing_the_arguments_through():
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    for table in ("table1", "table2", "ablation", "estimation"):
        command = tox[f"testenv:reproduce-{table}"]["commands"].strip()
        assert command == f"fishertune reproduce benchmarks/{table}.yaml {{posargs}}"
        assert (ROOT / "benchmarks" / f"{table}.yaml").is_file()


def test_tiny_override_swaps_backbones_and_protocol_but_keeps_the_grid_and_data():
    from fishertune.runner.manifest import load_manifest

    real = load_manifest(ROOT / "benchmarks" / "table1.yaml")
    tiny = load_manifest(ROOT / "benchmarks" / "table1.yaml", tiny=True)
    mini = load_manifest(ROOT / "benchmarks" / "mini" / "table1.yaml")
    assert tiny.manifest.backbones == ["clip-tiny", "mae-tiny", "sam-tiny", "eva02-tiny", "dinov2-tiny"]
    assert tiny.results_name == "table1-tiny" and real.results_name == "table1"
    # real data; the tiny foundation models shipped in the package, no checkpoint paths
    assert tiny.manifest.pretrained and not tiny.manifest.weights and tiny.manifest.data == real.manifest.data
    for field in ("head", "train", "eval", "method_configs"):
        assert getattr(tiny.manifest, field) == getattr(mini.manifest, field), field
    # the same grid as the real manifest, row for row; the cells of the mini table but for the data kind
    assert [c.row for c in tiny.cells()] == [c.row for c in real.cells()]
    strip = lambda c: {k: v for k, v in c.config.items() if k not in ("data", "pretrained")}  # noqa: E731
    assert [strip(c) for c in tiny.cells()] == [strip(c) for c in mini.cells()]
    # MAE-H and MAE-L share one tiny variant
    both = load_manifest(ROOT / "benchmarks" / "table1.yaml", {"backbones": ["mae-l", "mae-h"]}, tiny=True)
    assert both.manifest.backbones == ["mae-tiny"]


def test_tiny_override_without_data_asks_for_data_only(tmp_path):
    data = tmp_path / "data"
    out = _reproduce([str(ROOT / "benchmarks" / "table1.yaml"), "--tiny", "--results", str(tmp_path / "runs")],
                     {"FISHERTUNE_DATA": str(data), "FISHERTUNE_WEIGHTS": str(tmp_path / "weights"),
                      "FISHERTUNE_CACHE": str(tmp_path / "cache")}, tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.splitlines()[:-1]
    assert len(lines) == 4 and all(ln.startswith("data: ") for ln in lines)  # no weights, no GPU needed
    assert not (tmp_path / "runs").exists()


def test_tox_regression_env_checks_the_mini_manifests_or_the_given_ones():
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    command = tox["testenv:regression"]["commands"].strip()
    assert command.startswith("fishertune regression check --run {posargs:")
    for name in command.split("{posargs:")[1].rstrip("}").split():
        assert (ROOT / name).is_file() and (ROOT / "results" / "regression" / f"mini-{Path(name).stem}.json").is_file()
