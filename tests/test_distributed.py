"""Issue 9: one cell with two processes (torchrun, DistributedDataParallel over gloo on the CPU) gives the
result of one process with the same global batch.

The global batch stays 4: each process takes 2 of its samples, and the loss of each process is its
summed loss divided by the labelled pixels averaged over the processes, so DDP's mean gradient is the
single process's. What is left is float summation order: measured here, after 20 steps of full
fine-tuning, the per-class IoU of the two runs differed by at most 0.0025 points with the 4-block, 64-wide
tiny DINOv2 and by 0.0101 points with the 6-block, 128-wide one (one pixel of a small class on one image),
the logged losses by 2e-7 relative; the test allows 0.05 points and 1e-5 (a gradient reduced wrongly, e.g. a
sum where a mean belongs, moves them by whole points). The cell uses the light head without dropout
and the tiny DINOv2 without drop path, which draw no random numbers while training: with Mask2Former,
the processes' point samples are other random draws than one process's, so only statistics would agree.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from fishertune.runner.manifest import load_manifest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun's gloo rendezvous")

MANIFEST = """\
version: 1
name: ddp
table: table1
data: {{kind: miniature, root: {root}, synth_images: {images}}}
backbones: [dinov2-tiny]
methods: [full]
head: {{name: light, config: {{channels: 32, dropout: 0.0}}}}
train: {{iterations: 20, crop_size: 64, lr: 1.0e-3, short_edge_range: [32, 128], max_long_edge: 256}}
eval: {{crop_size: 64, stride: 43, test_sizes: {{cityscapes: [128, 64], bdd100k: [160, 90], mapillary: [128, 64]}}}}
execution: {{log_every: 2, num_workers: 0, threads: 1, eval_batch: 16}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, cwd, stderr: list | None = None):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    if stderr is not None:
        stderr.append(out.stderr)
    return out.stdout


def test_two_processes_give_one_process_result(tmp_path, synth_root, synth_images):
    manifest = tmp_path / "ddp.yaml"
    manifest.write_text(MANIFEST.format(root=synth_root, images=synth_images))
    (cell,) = load_manifest(manifest).cells()
    _run([sys.executable, "-m", "fishertune.cli", "run", str(manifest), "--results", str(tmp_path / "one"),
          "--no-render"], tmp_path)
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                "-m", "fishertune.cli", "run", str(manifest), "--results", str(tmp_path / "two"), "--no-render"],
               tmp_path)
    assert out.count(f"done     {cell.id}") == 2  # both processes ran the cell ...
    one = json.loads((tmp_path / "one" / "ddp" / f"{cell.id}.json").read_text())
    two = json.loads((tmp_path / "two" / "ddp" / f"{cell.id}.json").read_text())  # ... process 0 wrote it
    assert one["processes"] == 1 and two["processes"] == 2
    assert [i for i, _ in one["train"]["losses"]] == [i for i, _ in two["train"]["losses"]]
    for (_, a), (_, b) in zip(one["train"]["losses"], two["train"]["losses"]):
        assert b == pytest.approx(a, rel=1e-5)
    for target, a in one["targets"].items():
        b = two["targets"][target]
        for cls, v in a["per_class_iou"].items():
            assert (v is None) == (b["per_class_iou"][cls] is None)
            if v is not None:
                assert abs(v - b["per_class_iou"][cls]) <= 0.05, (target, cls)


#: the one warning a bf16 run on the CPU prints, once per process: oneDNN's bf16 convolution returns the 1x1
#: classifier's weight gradient with the strides of a channels-last tensor ([32, 1, 32, 32] for 19x32x1x1), DDP's
#: bucket has the contiguous ones ([32, 1, 1, 1]); over size-1 dimensions both are the same memory order, so the
#: copy into the bucket is right, only not a view (PyTorch's message says "may impair performance")
BF16_DDP_WARNING = "Grad strides do not match bucket view strides"


def test_two_processes_in_bf16_give_one_process_bf16_result(tmp_path, synth_root, synth_images):
    """The DDP path in bf16 (autocast in each process, fp32 gradients averaged over gloo) against one process in
    bf16. bf16 rounds differently at batch 2 per process than at batch 4: measured after 20 steps, the logged
    losses within 0.24% and the mIoU per target within 0.83 points (a tiny random model's per-class IoU moves by
    up to 15); allowed 1% and 2 points. The warnings printed are listed (BF16_DDP_WARNING, none else)."""
    manifest = tmp_path / "ddp.yaml"
    manifest.write_text(MANIFEST.format(root=synth_root, images=synth_images).replace(
        "max_long_edge: 256}", "max_long_edge: 256, precision: bf16}"))
    (cell,) = load_manifest(manifest).cells()
    assert cell.config["train"]["precision"] == "bf16"
    stderr: list[str] = []
    _run([sys.executable, "-m", "fishertune.cli", "run", str(manifest), "--results", str(tmp_path / "one"),
          "--no-render"], tmp_path, stderr)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
          "-m", "fishertune.cli", "run", str(manifest), "--results", str(tmp_path / "two"), "--no-render"],
         tmp_path, stderr)
    one = json.loads((tmp_path / "one" / "ddp" / f"{cell.id}.json").read_text())
    two = json.loads((tmp_path / "two" / "ddp" / f"{cell.id}.json").read_text())
    assert two["processes"] == 2
    for (i, a), (j, b) in zip(one["train"]["losses"], two["train"]["losses"], strict=True):
        assert i == j and b == pytest.approx(a, rel=0.01)
    for target, a in one["targets"].items():
        assert abs(two["targets"][target]["miou"] - a["miou"]) <= 2.0, target
    warnings = [line for text in stderr for line in text.splitlines() if "Warning" in line]
    assert all(BF16_DDP_WARNING in line for line in warnings), warnings


def test_a_global_batch_that_does_not_split_is_one_clear_error(tmp_path, synth_root, synth_images):
    manifest = tmp_path / "ddp.yaml"
    manifest.write_text(MANIFEST.format(root=synth_root, images=synth_images).replace("iterations: 20",
                                                                                      "iterations: 2, batch_size: 3"))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "fishertune.cli", "run", str(manifest), "--results",
                          str(tmp_path / "r"), "--no-render"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert "train.batch_size 3 does not split over 2 processes" in out.stderr
    assert not list((tmp_path / "r").rglob("*.json"))
