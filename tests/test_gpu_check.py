"""benchmarks/perf/gpu_check.py's dry run on the CPU: the script a GPU's first user runs works end to end on
the miniature's cells (eager steps, FLOPs, evaluation windows, the projection, a mini cell against its stored
CPU numbers, the compiled steps on dynamo's eager backend) and writes its record naming the device. The GPU-only
figures (allocator peak, sync count, largest batch) stay empty on the CPU; nothing here has run on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "perf" / "gpu_check.py"


def test_the_gpu_check_runs_dry_on_the_cpu_and_writes_its_record(tmp_path):
    out = tmp_path / "dry.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--families", "dinov2-tiny",
                           "--mini-iterations", "4", "--steps", "2", "--compile-backend", "eager", "--out", str(out)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["device"] == "CPU" and rec["device_slug"].startswith("cpu-")
    fig = rec["families"]["dinov2-tiny"]
    assert fig["images_per_s"] > 0 and fig["gflop_per_step"] > 0 and fig["eval_windows_per_s"] > 0
    # one step's FLOPs over its batch (4 in Rein's protocol, the miniature's own with --tiny) times images/s
    assert abs(fig["tflops"] - fig["gflop_per_step"] / fig["batch"] * fig["images_per_s"] / 1e3) < 0.01
    assert fig["projected_cell_h"] > 0 and fig["images_per_s_compiled"] > 0 and fig["compile_s"] > 0
    assert "peak_memory_gb" not in fig and "largest_batch" not in fig  # GPU only
    mini = rec["mini"]
    assert mini["iterations"] == 4 and mini["stored_cell"]  # compared with the CPU numbers of dinov2-tiny full
    assert {"cityscapes", "bdd100k", "mapillary"} <= set(mini) and "miou_cpu" in mini["cityscapes"]
    text = out.read_text()
    assert text.startswith("# GPU check on CPU") and "`dinov2-tiny`" in text and "gpu_check.py --device cpu" in text
