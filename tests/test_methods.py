"""Contract test: every registered method on every tiny backbone.

After ``apply``, ``before_training`` (with a small random source) and two steps of the runner's
optimizer (a zero-initialised factor, as LoRA's B or AdaptFormer's up
projection, leaves its partner without gradient on the first), exactly the parameters the method reports as trainable
(backbone side) have moved, the head always trains, and the count equals the paper-column number.
"""

import pytest
import torch

from fishertune.backbones import BACKBONES, build_backbone
from fishertune.engine.optim import build_optimizer
from fishertune.heads import build_head
from fishertune.segmentor import Segmentor
from fishertune.tuning import MethodContext, build_method, registered_methods

TINY = [n for n in BACKBONES.names() if n.endswith("-tiny")]
#: methods that read source data before training, on a budget that suits 4 random images
QUICK = {"fishertune": {"images": 4, "variational": {"steps": 3}}}


@pytest.mark.parametrize("backbone", TINY)
@pytest.mark.parametrize("method", registered_methods())
def test_method_contract(backbone, method):
    torch.manual_seed(0)
    seg = Segmentor(build_backbone(backbone, pretrained=False, seed=0), build_head("mask2former-tiny", 128, 19))
    m = build_method(method, QUICK.get(method))
    gen = torch.Generator().manual_seed(1)
    source = [(torch.randn(2, 3, 64, 64, generator=gen), torch.randint(0, 19, (2, 64, 64), generator=gen))
              for _ in range(2)]
    ctx = MethodContext(device=torch.device("cpu"), seed=0, source_images=4,
                        source_batches=lambda n: (source[i % len(source)] for i in range(n)))
    m.apply(seg, ctx)
    seg.head.requires_grad_(True)
    m.before_training(seg, ctx)
    before = {n: p.detach().clone() for n, p in seg.named_parameters()}
    # Adam (AdamW without decay, as the runner builds it, sparse for methods that select elements)
    # moves every element with a non-zero gradient by about lr, however small the gradient (layer
    # scale makes raw gradients too small for SGD to register in float32)
    opt = build_optimizer(seg, lr=1e-2, weight_decay=0.0, sparse=m.sparse_indices(seg))
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 19, (2, 64, 64))
    for it in range(2):
        opt.zero_grad()
        seg.loss(images, labels).backward()
        m.after_backward(seg, it)
        opt.step()
    sparse = m.sparse_indices(seg)
    moved = 0
    for name, p in seg.backbone.named_parameters(prefix="backbone"):
        changed = (p.detach() != before[name]).flatten()
        allowed = torch.zeros_like(changed)
        if name in sparse:
            allowed[sparse[name]] = True
        elif p.requires_grad:
            allowed[:] = True
        assert not (changed & ~allowed).any(), f"{name}: an element outside the trainable set changed"
        moved += int(changed.sum())
    reported = m.trainable_backbone_params(seg)
    assert reported == sum(int(t.numel()) for t in sparse.values()) + sum(
        p.numel() for n, p in seg.backbone.named_parameters(prefix="backbone") if p.requires_grad and n not in sparse)
    if reported:
        assert moved > 0.5 * reported  # and the reported set really trains
    assert all(not torch.equal(p, before[f"head.{n}"]) for n, p in seg.head.named_parameters() if p.ndim > 1)


def test_full_and_freeze_counts():
    seg = Segmentor(build_backbone("dinov2-tiny", pretrained=False, seed=0), build_head("light", 128, 19, channels=32))
    total = sum(p.numel() for p in seg.backbone.parameters())
    ctx = MethodContext(device=torch.device("cpu"), seed=0)
    full, freeze = build_method("full"), build_method("freeze")
    full.apply(seg, ctx)
    assert full.trainable_backbone_params(seg) == total
    freeze.apply(seg, ctx)
    assert freeze.trainable_backbone_params(seg) == 0
