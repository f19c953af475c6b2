"""Sweeps through submitit (issue 9): one job per cell, one job array, resources from manifest and CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fishertune.cli import main
from fishertune.runner.executors import make_executor, slurm_config
from fishertune.runner.manifest import load_manifest

MINI_CELL = "methods: [freeze]\ntrain: {iterations: 5}\n"


@pytest.fixture
def env(tmp_path, monkeypatch):
    # the submitit-local jobs are subprocesses: they inherit this environment (cache, no progress bars)
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TQDM_DISABLE", "1")


def test_a_mini_cell_through_submitit_local_matches_the_local_run_and_a_rerun_submits_nothing(
        tmp_path, mini_manifest, env, capsys):
    path = mini_manifest("sub", MINI_CELL)
    (cell,) = load_manifest(path).cells()
    local, remote = tmp_path / "local", tmp_path / "remote"

    assert main(["run", str(path), "--results", str(local), "--no-render"]) == 0
    assert main(["run", str(path), "--results", str(remote), "--no-render", "--executor", "submitit-local",
                 "--wait"]) == 0
    out = capsys.readouterr().out
    logs = remote / "sub" / "slurm"
    result = remote / "sub" / f"{cell.id}.json"
    assert result.is_file(), out + "".join(p.read_text() for p in logs.rglob("*.err"))
    assert f"done     {cell.id}" in out
    jobs = [p for p in logs.iterdir() if p.is_dir() and any(p.glob("*_log.err"))]
    assert len(jobs) == 1  # one job, its log where the README says

    # Bitwise, not approximately: the job reloads the manifest and runs the cell through the same
    # run_manifest code path as the local run, from the same seed, with the same intra-op thread count
    # (execution.threads of the mini protocol; the count changes CPU sums in the last bits), on the same
    # CPU. Any difference would mean the job ran something other than what `fishertune run` runs.
    a = json.loads((local / "sub" / f"{cell.id}.json").read_text())
    b = json.loads(result.read_text())
    assert set(b["targets"]) == {"cityscapes", "bdd100k", "mapillary"}
    for target in a["targets"]:
        assert b["targets"][target]["per_class_iou"] == a["targets"][target]["per_class_iou"], target
        assert b["targets"][target]["confusion"] == a["targets"][target]["confusion"], target
    assert b["train"]["losses"] == a["train"]["losses"]
    assert b["manifest"] == a["manifest"] and b["cell_id"] == a["cell_id"] == cell.id

    # rerunning the same command submits nothing: the cell is finished
    stamp = result.stat().st_mtime_ns
    assert main(["run", str(path), "--results", str(remote), "--no-render", "--executor", "submitit-local"]) == 0
    out = capsys.readouterr().out
    assert f"skipped  {cell.id}" in out and "queued" not in out and "started" not in out
    assert [p for p in logs.iterdir() if p.is_dir() and any(p.glob("*_log.err"))] == jobs
    assert result.stat().st_mtime_ns == stamp


def _fake_slurm(tmp_path: Path, monkeypatch) -> Path:
    """``srun`` and ``sbatch`` stand-ins on PATH: sbatch keeps the script it was given and answers as
    Slurm does; nothing runs."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    kept = tmp_path / "sbatch-script"
    (bin_ / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_ / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {kept}\necho 'Submitted batch job 4242'\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    return kept


SLURM_BODY = ("methods: [freeze, full]\nexecution: {slurm: {partition: cpu, account: lab, mem_gb: 32, "
              "array_parallelism: 8, setup: ['module load cuda'], additional_parameters: {requeue: true}}}\n")


def test_slurm_parameters_come_from_the_manifest_and_the_command_line(tmp_path, mini_manifest, env, monkeypatch,
                                                                       capsys):
    kept = _fake_slurm(tmp_path, monkeypatch)
    path = mini_manifest("arr", SLURM_BODY)
    lm = load_manifest(path)
    cfg = slurm_config(lm, {"partition": "gpu", "timeout_min": 30, "gpus_per_node": 2, "array_parallelism": 1,
                            "cpus_per_task": None})
    ex = make_executor("slurm", tmp_path / "logs" / "%j", cfg, "fishertune-arr")
    assert ex.parameters == {"job_name": "fishertune-arr", "partition": "gpu", "account": "lab", "time": 30,
                             "gpus_per_node": 2, "cpus_per_task": 8, "mem": "32GB", "array_parallelism": 1,
                             "setup": ["module load cuda"], "additional_parameters": {"requeue": True}}

    # the whole command: the two cells go to sbatch as one array of two jobs, nothing is waited for
    results = tmp_path / "runs"
    code = main(["run", str(path), "--results", str(results), "--executor", "slurm", "--slurm-partition", "gpu",
                 "--slurm-time", "30", "--slurm-gpus", "2", "--slurm-array-parallelism", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    ids = [c.id for c in lm.cells()]
    assert f"queued   {ids[0]}  job 4242_0" in out and f"queued   {ids[1]}  job 4242_1" in out
    assert "squeue -j 4242" in out
    script = kept.read_text().splitlines()
    for flag in ("--partition=gpu", "--account=lab", "--time=30", "--gpus-per-node=2", "--cpus-per-task=8",
                 "--mem=32GB", "--array=0-1%1", "--job-name=fishertune-arr", "--requeue"):
        assert f"#SBATCH {flag}" in script, flag
    assert "module load cuda" in script
    assert any(ln.startswith("#SBATCH --output=") and str(results / "arr" / "slurm" / "%A_%a") in ln for ln in script)
    assert not list((results / "arr").glob("*.json"))  # submitted, not run


@pytest.mark.parametrize("args, body, says", [
    (["--executor", "submitit-local", "--slurm-time", "0"], "", "--slurm-time: Input should be greater than 0"),
    (["--executor", "slurm", "--slurm-gpus", "-1"], "", "--slurm-gpus: Input should be greater than or equal to 0"),
    (["--executor", "submitit-local"], "execution: {slurm: {partiton: gpu}}\n",
     "execution.slurm.partiton: unknown field; did you mean 'partition'?"),
    (["--slurm-partition", "gpu"], "", "--slurm-partition is for --executor slurm or submitit-local"),
])
def test_a_bad_value_is_one_line_and_exit_2(args, body, says, tmp_path, mini_manifest, env, monkeypatch, capsys):
    _fake_slurm(tmp_path, monkeypatch)
    path = mini_manifest("bad", MINI_CELL + body)
    results = tmp_path / "runs"
    assert main(["run", str(path), "--results", str(results), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and says in err, err
    assert not (results / "bad" / "slurm").exists()  # nothing submitted


def test_slurm_without_srun_says_where_to_submit_from(tmp_path, mini_manifest, env, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here
    path = mini_manifest("nosrun", MINI_CELL)
    assert main(["run", str(path), "--results", str(tmp_path / "runs"), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "no `srun` on PATH" in err


def test_a_failed_job_is_reported_with_its_cell_its_error_and_its_log(tmp_path, mini_manifest, env):
    from fishertune.runner.executors import CellJob, Submission, run_cell_job, wait

    path = mini_manifest("fail", MINI_CELL)
    (cell,) = load_manifest(path).cells()
    folder = tmp_path / "runs" / "fail" / "slurm" / "%j"
    ex = make_executor("submitit-local", folder, slurm_config(load_manifest(path)), "fishertune-fail")
    # a job whose cell is not in the manifest (as if the manifest had been edited after submission)
    (job,) = ex.map_array(run_cell_job, [CellJob(str(path), {}, False, str(tmp_path / "runs"), "gone--cell", None,
                                                 os.getcwd())])
    lines: list[str] = []
    outcome = wait(Submission("submitit-local", folder, [(cell, job)]), out=lines.append)
    assert [status for _, status in outcome] == ["failed"]
    (line,) = lines
    assert line.startswith(f"failed   {cell.id}: fishertune.errors.UserError: --only gone--cell matches no cell")
    log = Path(line.rsplit("(log: ", 1)[1].rstrip(")"))
    assert log.is_file() and "matches no cell" in log.read_text()
