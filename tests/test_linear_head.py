"""The linear probe head (fishertune/heads/linear.py): linear in the features at evaluation, the documented
parameter count, the levels it is told to read, and it learns a linearly separable labelling."""

import pytest
import torch

from fishertune.heads import build_head
from fishertune.heads.linear import LinearHead

C, K = 8, 5


def features(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, C, 16 // 2**i, 32 // 2**i, generator=g) for i in range(4)]


def test_it_is_affine_in_the_features_at_evaluation_and_has_the_documented_size():
    head = build_head("linear", C, K)
    head.train()
    head.predict(features(seed=5))  # move BatchNorm's running statistics off identity
    head.eval()
    x, y = features(seed=1), features(seed=2)
    p = head.predict
    zero = [torch.zeros_like(f) for f in x]
    both = p([a + b for a, b in zip(x, y)])
    torch.testing.assert_close(both - p(y), p(x) - p(zero), atol=1e-5, rtol=1e-5)
    assert both.shape == (2, K, 16, 32)  # the finest level's grid
    assert sum(t.numel() for t in head.parameters()) == 4 * C * K + K + 2 * 4 * C


def test_levels_pick_the_feature_maps_it_reads():
    head = build_head("linear", C, K, levels=[2]).eval()
    x = features()
    moved = [f + 3.0 if i != 2 else f for i, f in enumerate(x)]
    torch.testing.assert_close(head.predict(x), head.predict(moved))
    assert head.predict(x).shape[-2:] == x[2].shape[-2:]
    with pytest.raises(ValueError, match="distinct indices"):
        LinearHead(C, K, levels=[1, 1])


def test_it_learns_a_linearly_separable_labelling():
    torch.manual_seed(0)
    truth = torch.randn(4 * C, K)
    head = build_head("linear", C, K)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        x = [torch.randn(4, C, 16, 32, generator=g) for _ in range(4)]  # four maps on one grid: no resizing
        labels = torch.einsum("bchw,ck->bkhw", torch.cat(x, 1), truth).argmax(1)
        labels[:, :2] = 255  # ignored rows
        return x, labels

    for step in range(200):
        x, labels = batch(step)
        opt.zero_grad()
        sum(head.losses(x, labels).values()).backward()
        opt.step()
    head.eval()
    x, labels = batch(1000)
    pred = head.predict(x).argmax(1)
    keep = labels != 255
    assert (pred[keep] == labels[keep]).float().mean() > 0.9  # chance: 1 in 5
