"""Issue 9's training options: bf16 autocast reaches the forward pass (and only where asked), and
``execution.compile`` puts the loss module through torch.compile; neither is in a cell's id at its default."""

import pytest
import torch

from fishertune.backbones import build_backbone
from fishertune.data import TrainTransform
from fishertune.engine import train as train_mod
from fishertune.heads import build_head
from fishertune.runner.manifest import load_manifest
from fishertune.segmentor import Segmentor
from fishertune.tuning import build_method

pytestmark = pytest.mark.usefixtures("one_thread")


class Images(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        image = (torch.rand(48, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        label = torch.randint(0, 19, (48, 48), generator=g).to(torch.uint8).numpy()
        return {"image": image, "label": label}


def _train(precision="fp32", compile=False, iterations=2):
    torch.manual_seed(0)
    seg = Segmentor(build_backbone("dinov2-tiny", pretrained=False, seed=0), build_head("light", 128, 19, channels=16))
    method = build_method("full")
    seen = []
    seg.backbone.blocks[-1].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    stats = train_mod.train(seg, method, Images(), TrainTransform(crop_size=32, short_edge_range=(32, 48),
                                                                   max_long_edge=64),
                            iterations=iterations, batch_size=2, lr=1e-3, weight_decay=0.0, poly_power=0.9, warmup=0,
                            seed=0, device=torch.device("cpu"), log_every=1, precision=precision, compile=compile)
    return seg, stats, seen


def test_bf16_runs_the_forward_in_bf16_and_keeps_the_weights_fp32():
    seg, stats, seen = _train("bf16")
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert all(p.dtype == torch.float32 for p in seg.parameters())
    assert all(torch.isfinite(torch.tensor(v)) for _, v in stats.losses)
    _, _, seen32 = _train("fp32")
    assert all(d == torch.float32 for d in seen32)


def test_compile_wraps_the_loss_module(monkeypatch):
    wrapped = []

    def fake_compile(module, **kwargs):
        wrapped.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    _train(compile=True, iterations=1)
    assert len(wrapped) == 1 and isinstance(wrapped[0], train_mod.LossModule)
    wrapped.clear()
    _train(compile=False, iterations=1)
    assert not wrapped


def test_precision_enters_a_cells_id_only_when_not_the_default(tmp_path, mini_manifest):
    base = mini_manifest("p", "methods: [freeze]\n")
    bf16 = mini_manifest("q", "methods: [freeze]\ntrain: {precision: bf16}\n")
    (a,), (b,) = load_manifest(base).cells(), load_manifest(bf16).cells()
    assert "precision" not in a.config["train"] and b.config["train"]["precision"] == "bf16"
    assert a.id != b.id
