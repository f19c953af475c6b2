"""``train.precision: fp64`` (fishertune/precision.py): a cell computes in float64 from start to end, its
numbers do not depend on the thread count, and its kept model predicts exactly what the cell saved."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from fishertune.cli import main
from fishertune.precision import autocast, compute_dtype, to_compute
from fishertune.runner.manifest import load_manifest
from fishertune.tuning import registered_methods

#: every registered method: each builds its own modules and some read the source data before training
METHODS = sorted(registered_methods())
STEPS = 4


def test_compute_dtype_is_float64_only_for_fp64_and_always_restored():
    assert torch.get_default_dtype() == torch.float32
    with compute_dtype("fp64") as dtype:
        assert dtype == torch.float64 == torch.get_default_dtype()
        assert torch.nn.Linear(2, 2).weight.dtype == torch.float64
        assert to_compute(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float64
        with compute_dtype("fp32"):
            assert torch.zeros(1).dtype == torch.float32
        assert torch.zeros(1).dtype == torch.float64
    with pytest.raises(RuntimeError), compute_dtype("fp64"):
        raise RuntimeError("a cell that fails")
    assert torch.get_default_dtype() == torch.float32
    with pytest.raises(ValueError, match="fp16"):
        with compute_dtype("fp16"):
            pass


def test_to_compute_is_what_float_was_in_fp32_cells():
    x = torch.ones(3, dtype=torch.float32)
    assert to_compute(x) is x  # no copy, as x.float()
    for dtype in (torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool):
        y = torch.ones(3, dtype=dtype)
        assert to_compute(y).dtype == y.float().dtype == torch.float32
    with compute_dtype("fp64"):
        assert to_compute(x).dtype == torch.float64
        assert to_compute(torch.ones(2, dtype=torch.float64)).dtype == torch.float64
    assert isinstance(autocast(torch.device("cpu"), "fp64"), type(autocast(torch.device("cpu"), "fp32")))


def _run(mini_manifest, tmp_path: Path, name: str, threads: int) -> dict[str, dict]:
    manifest = mini_manifest("fp64", f"methods: [{', '.join(METHODS)}]\ntargets: [cityscapes]\n"
                                     f"method_configs: {{fishertune: {{estimator: direct, images: 4, cache: false}}}}\n"
                                     f"train: {{iterations: {STEPS}, precision: fp64}}\n"
                                     f"execution: {{log_every: 1, threads: {threads}}}\n")
    assert main(["run", str(manifest), "--results", str(tmp_path / name), "--no-render"]) == 0
    return {r["row"]: r | {"path": p} for p in (tmp_path / name).glob("*/*.json")
            for r in [json.loads(p.read_text())]}


def test_an_fp64_cell_computes_in_float64_and_gives_the_same_numbers_with_1_and_2_threads(tmp_path, mini_manifest,
                                                                                         linear_dtypes):
    with linear_dtypes() as seen:
        one = _run(mini_manifest, tmp_path, "t1", 1)
    two = _run(mini_manifest, tmp_path, "t2", 2)
    assert seen == {"train": {torch.float64}, "eval": {torch.float64}}
    assert torch.get_default_dtype() == torch.float32  # the run left the process as it found it
    assert sorted(one) == sorted(two) == METHODS
    fp32 = mini_manifest("fp32", f"methods: [{', '.join(METHODS)}]\ntargets: [cityscapes]\n")
    fp32_ids = {c.id for c in load_manifest(fp32).cells()}
    for row, a in one.items():
        b = two[row]
        assert a["status"] == "done" and a["config"]["train"]["precision"] == "fp64" and a["cell_id"] not in fp32_ids
        assert "1 threads" in a["device"] and "2 threads" in b["device"]
        assert len(a["train"]["losses"]) == STEPS
        # the thread count still changes the last bits (VPT's third loss by one ulp, measured), but in float64
        # they stay there: float32's rounding is ~1e-7 of a loss and sends a tiny model's run elsewhere
        for (i, x), (j, y) in zip(a["train"]["losses"], b["train"]["losses"]):
            assert i == j and y == pytest.approx(x, rel=1e-12, abs=0), row
        ious_a, ious_b = a["targets"]["cityscapes"]["per_class_iou"], b["targets"]["cityscapes"]["per_class_iou"]
        assert ious_a.keys() == ious_b.keys() and len(ious_a) == 19
        for name, x in ious_a.items():
            y = ious_b[name]
            assert (x is None and y is None) or abs(x - y) <= 1e-9, (row, name)
        with safe_open(a["path"].with_suffix(".model") / "model.safetensors", "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith("@indices")}
        assert dtypes == {"F64"}, (row, dtypes)


def test_an_fp64_kept_model_predicts_exactly_what_its_cell_saved(tmp_path, mini_manifest):
    cells = _run(mini_manifest, tmp_path, "runs", 1)
    for row in ("lora", "fishertune"):
        result = cells[row]
        saved = result["predictions"]["cityscapes"]
        out = tmp_path / "pred" / row
        assert main(["predict", str(result["path"].with_suffix(".model")), *[p["image"] for p in saved],
                     "--out", str(out), "--target", "cityscapes"]) == 0
        for rec in saved:
            with Image.open(result["path"].parent / rec["prediction"]) as im:
                expected = np.array(im)
            with Image.open(out / f"{Path(rec['image']).stem}_trainid.png") as im:
                assert (np.array(im) == expected).all(), (row, rec["image"])
    assert torch.get_default_dtype() == torch.float32
