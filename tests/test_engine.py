"""Sliding-window evaluation, the poly schedule and the optimizer's parameter groups."""

import pytest
import torch
from torch import nn

from fishertune.engine.evaluate import slide_logits, window_origins
from fishertune.engine.optim import param_groups, poly_factor


@pytest.mark.parametrize("length,crop,stride,expected", [
    (512, 512, 341, [0]),
    (1024, 512, 341, [0, 341, 512]),
    (720, 512, 341, [0, 208]),
    (300, 512, 341, [0]),  # smaller than the window: one padded window
])
def test_window_origins_follow_mmseg(length, crop, stride, expected):
    assert window_origins(length, crop, stride) == expected


def test_sliding_window_of_a_pointwise_model_equals_the_whole_image():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 5, 1)  # pointwise: every window sees the same thing the whole image does
    image = torch.randn(1, 3, 90, 160)
    with torch.no_grad():
        whole = model(image)
    for batch in (1, 3):
        out = slide_logits(model, image, 5, crop=64, stride=43, batch=batch)
        torch.testing.assert_close(out, whole)
    # an image smaller than the window is padded and cropped back
    small = torch.randn(1, 3, 40, 50)
    torch.testing.assert_close(slide_logits(model, small, 5, crop=64, stride=43, batch=2), model(small).detach())


def test_poly_schedule():
    assert poly_factor(0, 100) == 1.0
    assert poly_factor(100, 100) == 0.0
    assert poly_factor(50, 100, power=0.9) == pytest.approx(0.5 ** 0.9)
    assert poly_factor(0, 100, warmup=10) == pytest.approx(1e-6)
    # Rein's 1024 schedule: linear warm-up to 1 over 10k iterations, then poly over the remaining 30k
    assert poly_factor(5, 100, warmup=10) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert poly_factor(10, 100, warmup=10) == 1.0
    assert poly_factor(55, 100, warmup=10) == pytest.approx(0.5 ** 0.9)
    assert poly_factor(100, 100, warmup=10) == 0.0


def test_param_groups_exempt_norms_embeddings_tokens_and_scales():
    from fishertune.backbones import build_backbone

    model = build_backbone("dinov2-tiny", pretrained=False, seed=0)
    decay, plain = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert {"vit.pos_embed", "vit.cls_token", "vit.blocks.0.norm1.weight", "vit.blocks.0.ls1.gamma",
            "vit.norm.bias"} <= plain_names
    assert {"vit.blocks.0.attn.qkv.weight", "vit.blocks.0.mlp.fc1.weight", "vit.patch_embed.proj.weight"} <= decay_names
    assert not plain_names & decay_names
    assert len(plain_names) + len(decay_names) == sum(1 for _ in model.parameters())


def test_training_batches_do_not_depend_on_the_number_of_loader_workers(synth_root):
    from fishertune.data import TrainTransform, build_dataset
    from fishertune.engine.train import source_batches

    gtav = build_dataset("gtav", synth_root / "gtav", "train")
    transform = TrainTransform(crop_size=32, short_edge_range=(32, 64), max_long_edge=128)
    runs = [list(source_batches(gtav, transform, seed=5, batch_size=2, num_workers=w, start=1, stop=4)) for w in (0, 2)]
    assert len(runs[0]) == len(runs[1]) == 3
    for (xa, ya), (xb, yb) in zip(*runs):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
