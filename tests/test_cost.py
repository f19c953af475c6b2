"""`fishertune cost`: the cost of a cell on paper, from fake tensors, checked against counts made otherwise.

On the miniature's cells (tiny DINOv2, the mini Mask2Former), where a real step is cheap: the backbone's
forward FLOPs against the ViT's closed form, the backward's against what each method trains, the bytes of
gradients and optimizer state against a real step's, the saved activations against the same count on real
tensors; and the command's files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fishertune.cli import main
from fishertune.engine.optim import build_optimizer
from fishertune.fisher.sparse import state_bytes
from fishertune.report import cost
from fishertune.report.perf import street_batch
from fishertune.runner.manifest import load_manifest
from fishertune.runner.run import select_cells
from fishertune.tuning import MethodContext, build_method

pytestmark = pytest.mark.usefixtures("one_thread")
MINI = Path(__file__).resolve().parents[1] / "benchmarks" / "mini" / "table1.yaml"
METHODS = ("full", "freeze", "lora", "rein", "fishertune")


@pytest.fixture(scope="module")
def costs():
    lm = load_manifest(MINI)
    cells = select_cells(lm.cells(), [f"dinov2-tiny--{m}--*" for m in METHODS])
    return lm, {c.method: c for c in cells}, {c.method: c for c in cost.manifest_costs(lm, cells, "fp32")}


def _shape() -> tuple[int, int, int]:
    """dinov2-tiny's patch, width and depth, read off the built model (not restated here)."""
    from fishertune.backbones import build_backbone

    vit = build_backbone("dinov2-tiny", pretrained=False, seed=0, img_size=64)
    return vit.patch_size, vit.embed_dim, vit.num_layers


PATCH, DIM, DEPTH = _shape()


def _patch_embed_flops(crop: int) -> int:
    return 2 * (crop // PATCH) ** 2 * 3 * PATCH * PATCH * DIM


def test_the_backbones_forward_flops_are_the_vits_closed_form(costs):
    lm, _, by_method = costs
    crop = lm.manifest.train.crop_size
    tokens = (crop // PATCH) ** 2 + 1  # and the class token
    per_block = 2 * tokens * 12 * DIM * DIM + 2 * 2 * tokens * tokens * DIM  # qkv, proj, MLP x4; q k^T and a v
    assert by_method["full"].flops["backbone"]["forward"] == DEPTH * per_block + _patch_embed_flops(crop)
    assert by_method["freeze"].flops["backbone"]["forward"] == DEPTH * per_block + _patch_embed_flops(crop)


def test_the_backward_costs_what_each_method_trains(costs):
    lm, _, by_method = costs
    fwd = {m: c.flops["backbone"]["forward"] for m, c in by_method.items()}
    bwd = {m: c.flops["backbone"]["backward"] for m, c in by_method.items()}
    assert bwd["freeze"] == 0  # nothing in the backbone needs a gradient, nor does its input
    assert 1.9 * fwd["full"] < bwd["full"] < 2.6 * fwd["full"]  # weights and inputs of every layer
    # the mask applies in the optimizer: the blocks' dense backward, all but the patch embedding's weights
    assert bwd["full"] - bwd["fishertune"] == _patch_embed_flops(lm.manifest.train.crop_size)
    patch_embed = _patch_embed_flops(lm.manifest.train.crop_size)
    for method in ("lora", "rein"):  # the inputs' gradients through every block (not the patch embedding), and
        assert fwd[method] - patch_embed <= bwd[method] < 1.5 * fwd[method], method  # the method's few weights
    for c in by_method.values():
        assert c.flops["pixel decoder"]["forward"] > 0 and c.flops["transformer decoder"]["forward"] > 0
        assert c.flops["losses"]["forward"] > 0  # the matching's cost matrices
        assert c.eval_flops == pytest.approx(sum(p["forward"] for p in c.flops.values()) - c.flops["losses"]["forward"],
                                             rel=0.05)  # one window's forward (no losses; drop path off)


def _real_step(lm, cell):
    """The cell built and stepped for real (as benchmarks/perf/test_methods.py does): its optimizer, model and
    the bytes autograd saved in the step's forward, for batch 4 of street-like labels."""
    from fishertune.backbones import build_backbone
    from fishertune.heads import build_head
    from fishertune.segmentor import Segmentor

    m = lm.manifest
    backbone = build_backbone(cell.backbone, seed=m.seed, img_size=m.train.crop_size)
    torch.manual_seed(m.seed)
    seg = Segmentor(backbone, build_head(m.head.name, backbone.embed_dim, 19, **m.head.config))
    images, labels = street_batch(m.train.batch_size, m.train.crop_size, 19)
    config = dict(cell.method_config)
    if cell.method == "fishertune":
        config |= {"estimator": "direct", "images": 4, "cache": False}
    method = build_method(cell.method, config)
    ctx = MethodContext(device=torch.device("cpu"), seed=m.seed, source_batches=lambda n: [(images, labels)] * n)
    method.apply(seg, ctx)
    seg.head.requires_grad_(True)
    method.before_training(seg, ctx)
    seg.train()
    optimizer = build_optimizer(seg, 1e-4, 0.05, sparse=method.sparse_indices(seg))
    with cost._Saved(exclude=list(seg.parameters())) as saved:
        loss = seg.loss(images, labels)
    loss.backward()
    optimizer.step()
    return seg, optimizer, saved.bytes


@pytest.mark.parametrize("method", ["full", "lora", "fishertune"])
def test_bytes_are_a_real_steps(costs, method):
    lm, cells, by_method = costs
    seg, optimizer, saved = _real_step(lm, cells[method])
    c = by_method[method]
    assert c.param_bytes == sum(p.numel() * 4 for p in seg.parameters())
    assert c.grad_bytes == sum(p.grad.numel() * 4 for p in seg.parameters() if p.grad is not None)
    assert c.state_bytes == state_bytes(optimizer)  # the closed form, SparseAdamW's indices included
    # the fake step saves what the real one saves (the losses' own tensors depend on the matching: within 5%)
    assert c.activation_bytes == pytest.approx(saved, rel=0.05)


def test_estimation_counts_the_configured_passes(costs):
    lm, _, by_method = costs
    fisher = lm.manifest.method_configs["fishertune"]  # the miniature's (benchmarks/mini/protocol.yaml)
    e = by_method["fishertune"].estimation
    assert e["passes"] == 2 * fisher["variational"]["steps"] * 2 * lm.manifest.train.batch_size  # x, x'; antithetic
    assert e["forwards"] == fisher["images"]  # the model's labels
    assert not by_method["full"].estimation and by_method["full"].estimation_flops == 0


def test_the_command_writes_markdown_and_json_saying_how_they_were_made(tmp_path, capsys):
    out = tmp_path / "projection.md"
    assert main(["cost", str(MINI), "--only", "dinov2-tiny--full--*", "dinov2-tiny--childtune--*",
                 "--output", str(out)]) == 0
    text = out.read_text()
    rec = json.loads(out.with_suffix(".json").read_text())
    assert f"fishertune cost {MINI} --only dinov2-tiny--full--* dinov2-tiny--childtune--* --precision bf16" in text
    assert [c["row"] for c in rec["cells"]] == ["full", "childtune"] and rec["precision"] == "bf16"
    for section in ("FLOPs per training image", "Memory in training", "One cell on an NVIDIA H100 SXM",
                    "The whole grid"):
        assert section in text
    child = rec["cells"][1]
    assert child["estimation"]["passes"] == 24966  # one pass over the real GTAV: the projection is of real runs
    hours = child["projection"]["40%"]
    assert hours["total_s"] == pytest.approx(hours["train_s"] + hours["eval_s"] + hours["estimation_s"])
    assert child["projection"]["30%"]["total_s"] == pytest.approx(hours["total_s"] * 4 / 3)
    assert main(["cost", str(MINI), "--only", "nope--*"]) == 2
    assert "matches no cell" in capsys.readouterr().err
