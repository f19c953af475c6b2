"""Issue 10: a killed run resumes to the same numbers, two runners never compute a cell twice at once,
a non-finite loss fails its cell and the sweep goes on, and `fishertune status` says where each cell is."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fishertune.cli import main
from fishertune.engine.checkpoint import Checkpoint
from fishertune.runner.lock import CellLock, holder
from fishertune.runner.manifest import load_manifest
from fishertune.runner.run import run_manifest
from fishertune.runner.store import ResultStore

ITERATIONS = 24
#: a cell long enough to be killed in the middle: full fine-tuning of the tiny DINOv2 with Mask2Former
RESUMABLE = (f"methods: [full]\ntrain: {{iterations: {ITERATIONS}}}\n"
             "execution: {checkpoint_every: 4, log_every: 3}\n")


def _cli(args, cwd, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "fishertune.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1", **(env or {})}, **kw)


def _only_result(results: Path, name: str) -> dict:
    (path,) = (results / name).glob("*.json")
    return json.loads(path.read_text())


def test_a_run_killed_at_a_random_iteration_resumes_to_exactly_the_uninterrupted_numbers(tmp_path, mini_manifest):
    manifest = mini_manifest("resume", RESUMABLE)
    lm = load_manifest(manifest)
    (cell,) = lm.cells()
    whole = _cli(["run", str(manifest), "--results", str(tmp_path / "whole"), "--no-render"], tmp_path)
    assert whole.wait(timeout=600) == 0, whole.stderr.read()

    killed_at = random.Random().randrange(5, ITERATIONS - 4)  # after at least one checkpoint, before the end
    store = ResultStore(tmp_path / "cut", lm.results_name)
    ckpt = Checkpoint(store.checkpoint_path(cell.id), 0)
    run = _cli(["run", str(manifest), "--results", str(tmp_path / "cut"), "--no-render"], tmp_path)
    deadline = time.time() + 600
    while run.poll() is None and time.time() < deadline:
        saved = ckpt.iteration() if ckpt.exists() else None
        if saved is not None and saved + 4 > killed_at:
            time.sleep(random.Random().uniform(0, 0.5))  # somewhere between two checkpoints
            run.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert run.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not store.done(cell.id) and ckpt.exists()
    resumed_from = ckpt.iteration()

    again = _cli(["run", str(manifest), "--results", str(tmp_path / "cut"), "--no-render"], tmp_path)
    assert again.wait(timeout=600) == 0, again.stderr.read()
    a, b = _only_result(tmp_path / "whole", lm.results_name), _only_result(tmp_path / "cut", lm.results_name)
    assert b["train"]["resumed_from"] == resumed_from > 0 and a["train"]["resumed_from"] == 0
    assert a["train"]["losses"] == b["train"]["losses"]
    for target in a["targets"]:
        assert a["targets"][target]["per_class_iou"] == b["targets"][target]["per_class_iou"]
        assert a["targets"][target]["confusion"] == b["targets"][target]["confusion"]
    assert not ckpt.exists()  # removed once the result is written
    assert not list(store.dir.glob("locks/*.lock"))


def test_two_runners_on_one_sweep_compute_each_cell_once(tmp_path, mini_manifest):
    manifest = mini_manifest("two", "methods: [full, freeze, lora]\ntrain: {iterations: 6}\n")
    lm = load_manifest(manifest)
    results = tmp_path / "runs"
    runners = [_cli(["run", str(manifest), "--results", str(results), "--no-render"], tmp_path) for _ in range(2)]
    outs = []
    for r in runners:
        out, err = r.communicate(timeout=900)
        assert r.returncode == 0, err
        outs.append(out)
    done = [{ln.split()[1] for ln in out.splitlines() if ln.startswith("done")} for out in outs]
    ids = {c.id for c in lm.cells()}
    assert done[0] | done[1] == ids and not done[0] & done[1]  # every cell once, none twice
    for out in outs:  # what a runner did not compute, the other held or had finished
        assert {ln.split()[1] for ln in out.splitlines() if ln.split()[0] in ("busy", "skipped", "done")} == ids
    store = ResultStore(results, lm.results_name)
    for cell_id in ids:
        assert store.read(cell_id)["status"] == "done"
    assert not list(store.dir.glob("locks/*.lock")) and not list(store.dir.glob(".*tmp*"))


def test_a_lock_is_exclusive_and_a_dead_holder_keeps_nothing(tmp_path):
    path = tmp_path / "locks" / "cell.lock"
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from fishertune.runner.lock import CellLock
assert CellLock({str(path)!r}).acquire()
print("held", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    info = holder(path)
    assert info is not None and info["pid"] == child.pid
    assert not CellLock(path).acquire()  # held by a live process
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert holder(path) is None  # the kernel dropped the dead holder's lock; its file is left behind
    lock = CellLock(path)
    assert lock.acquire()
    lock.release()
    assert not path.exists()


def test_the_last_lock_released_takes_its_folder_along_and_takers_racing_it_still_exclude_each_other(tmp_path):
    import threading

    folder = tmp_path / "locks"
    first, second = CellLock(folder / "a.lock"), CellLock(folder / "b.lock")
    assert first.acquire() and second.acquire()
    second.release()
    assert folder.is_dir()  # another lock is still held there
    first.release()
    assert not folder.exists()  # nothing left behind, e.g. by a run a later check refused
    holders, errors = [], []

    def contend(k: int) -> None:  # takers and releasers of locks in one folder, all at once
        try:
            for i in range(150):
                lock = CellLock(folder / f"{i % 3}.lock")
                if lock.acquire():
                    holders.append((i % 3, k, "in"))
                    holders.append((i % 3, k, "out"))
                    lock.release()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=contend, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and holders and not folder.exists()
    for key in range(3):  # per lock: every holder in and out before the next one comes in
        events = [(k, what) for name, k, what in holders if name == key]
        assert all(a[1] == "in" and b == (a[0], "out") for a, b in zip(events[::2], events[1::2])), events


def test_a_non_finite_loss_fails_its_cell_and_the_sweep_goes_on(tmp_path, mini_manifest, monkeypatch, capsys):
    from fishertune.segmentor import Segmentor

    manifest = mini_manifest("nan", "methods: [full, freeze]\ntrain: {iterations: 6}\nexecution: {log_every: 4}\n")
    lm = load_manifest(manifest)
    real_loss = Segmentor.loss
    calls = {"n": 0}

    def loss(self, images, labels):
        value = real_loss(self, images, labels)
        calls["n"] += 1
        full_cell_step = calls["n"] <= 6  # cells run in manifest order: full first
        return value * float("nan") if full_cell_step and calls["n"] == 3 else value

    monkeypatch.setattr(Segmentor, "loss", loss)
    code = main(["run", str(manifest), "--results", str(tmp_path), "--no-render"])
    assert code == 1
    out = capsys.readouterr().out
    full, freeze = lm.cells()
    assert f"failed   {full.id}" in out and f"done     {freeze.id}" in out
    store = ResultStore(tmp_path, lm.results_name)
    failed = store.read(full.id)
    assert failed["status"] == "failed" and failed["failure"]["iteration"] == 3
    last_it, last_loss = failed["failure"]["last_finite"]
    assert last_it == 2 and last_loss > 0 and "iteration 3" in failed["failure"]["reason"]
    assert "targets" not in failed and failed["git"]["commit"]  # no numbers; where it ran is kept

    # status lists it with its reason; a rerun keeps it; --retry-failed runs it again (now finite)
    assert main(["status", str(manifest), "--results", str(tmp_path)]) == 0
    status = capsys.readouterr().out
    assert f"failed   {full.id}" in status and "non-finite loss (nan) at iteration 3" in status
    assert f"done     {freeze.id}" in status and "1 done, 0 running, 1 failed, 0 pending" in status
    monkeypatch.setattr(Segmentor, "loss", real_loss)
    assert run_manifest(lm, str(tmp_path), progress=False) == [(full, "skipped"), (freeze, "skipped")]
    assert [(c.id, st) for c, st in run_manifest(lm, str(tmp_path), progress=False, retry_failed=True)] == [
        (freeze.id, "skipped"), (full.id, "done")]
    assert store.read(full.id)["status"] == "done"


def test_status_names_running_and_pending_cells_with_their_checkpoints(tmp_path, mini_manifest, capsys):
    manifest = mini_manifest("st", "methods: [full, freeze]\ntrain: {iterations: 6}\n")
    lm = load_manifest(manifest)
    full, freeze = lm.cells()
    store = ResultStore(tmp_path, lm.results_name)
    lock = CellLock(store.lock_path(full.id))
    assert lock.acquire()
    Checkpoint(store.checkpoint_path(freeze.id), 1).save({
        "iteration": 4, "model": {"w": torch.zeros(2)}, "optimizer": {}, "scheduler": {}, "losses": [],
        "last_finite": None, "window": torch.zeros(1), "seconds": 1.0, "rng": []})
    try:
        assert main(["status", str(manifest), "--results", str(tmp_path)]) == 0
    finally:
        lock.release()
    out = capsys.readouterr().out
    assert f"running  {full.id}" in out and f"process {os.getpid()} on this machine" in out
    assert f"pending  {freeze.id}" in out and "checkpoint after iteration 4" in out


@pytest.mark.parametrize("payload", ["truncated", "code"])
def test_a_damaged_or_code_carrying_checkpoint_is_refused_in_one_line(tmp_path, payload):
    path = tmp_path / "c.pt"
    if payload == "truncated":
        Checkpoint(path, 1).save({"iteration": 3, "model": {"w": torch.zeros(1000)}})
        path.write_bytes(path.read_bytes()[:300])
    else:
        import pickle

        class Evil:
            def __reduce__(self):
                return (os.system, ("echo owned > " + str(tmp_path / "owned"),))

        path.write_bytes(pickle.dumps({"version": 1, "iteration": Evil()}))
    from fishertune.errors import UserError

    with pytest.raises(UserError, match="not a loadable checkpoint") as e:
        Checkpoint(path, 1).load()
    assert "\n" not in str(e.value) and "delete it" in str(e.value)
    assert not (tmp_path / "owned").exists()  # no code ran


def test_a_result_that_cannot_be_written_leaves_no_predictions_behind(tmp_path, mini_manifest, monkeypatch):
    import fishertune.runner.run as run_module
    from fishertune.errors import UserError

    lm = load_manifest(mini_manifest("pred", "methods: [freeze]\n"))
    store = ResultStore(tmp_path, lm.results_name)

    def evaluated(lm, cell, source, targets, dev, result_path, checkpoint):  # as run_cell: predictions first
        run_module.save_predictions(result_path, "cityscapes", type("D", (), {
            "pairs": [("i.png", "l.png")], "name": "cityscapes", "root": "r", "split": "val"})(),
                                    [(0, np.zeros((4, 4), np.uint8))])
        assert store.predictions_dir(cell.id).is_dir()
        return {"status": "done"}

    def full_disk(self, cell_id, result):
        raise UserError(f"cannot write {self.path(cell_id)} (No space left on device)")

    monkeypatch.setattr(run_module, "open_datasets", lambda m, progress: ([], {}))
    monkeypatch.setattr(run_module, "run_cell", evaluated)
    monkeypatch.setattr(ResultStore, "write", full_disk)
    with pytest.raises(UserError, match="No space left"):
        run_manifest(lm, str(tmp_path), progress=False)
    (cell,) = lm.cells()
    assert not store.predictions_dir(cell.id).exists() and not store.path(cell.id).exists()


def test_status_piped_into_head_stops_quietly(tmp_path, mini_manifest):
    manifest = mini_manifest("pipe", "methods: [full, freeze]\n")
    child = _cli(["status", str(manifest), "--results", str(tmp_path)], cwd=tmp_path)
    child.stdout.close()  # the reader is gone (as `| head -1` once it has its line) before a word is written
    err = child.stderr.read()
    assert child.wait(60) == 141 and err == "", err  # as a program stopped by SIGPIPE; no traceback, no message
