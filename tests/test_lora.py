"""LoRA: q and v only, frozen weights untouched, mergeable, counts on the full-size backbones."""

from types import SimpleNamespace

import pytest
import torch
from torch.nn.utils import parametrize

from fishertune.backbones import BACKBONES, build_backbone
from fishertune.backbones.base import QKV
from fishertune.errors import UserError
from fishertune.heads import build_head
from fishertune.segmentor import Segmentor
from fishertune.tuning import MethodContext, build_method

TINY = [n for n in BACKBONES.names() if n.endswith("-tiny")]
CTX = MethodContext(device=torch.device("cpu"), seed=0)


def _segmentor(name: str) -> Segmentor:
    torch.manual_seed(0)
    return Segmentor(build_backbone(name, pretrained=False, seed=0), build_head("light", 128, 19, channels=32))


def _loras(seg):
    for slot in seg.backbone.qkv():
        yield slot, getattr(slot.module.parametrizations, slot.weight)[0]


def _features(seg, x):
    with torch.no_grad():
        return seg.backbone.forward_features(x)


def _randomise_b(seg):
    with torch.no_grad():
        for _, lora in _loras(seg):
            lora.lora_B_q.normal_(0, 0.05)
            lora.lora_B_v.normal_(0, 0.05)


@pytest.mark.parametrize("backbone", TINY)
def test_starts_as_the_frozen_model_and_trains_only_q_and_v(backbone):
    seg = _segmentor(backbone)
    seg.eval()
    x = torch.randn(2, 3, 64, 64)
    frozen = _features(seg, x)
    slots = seg.backbone.qkv()
    w0 = [getattr(s.module, s.weight).detach().clone() for s in slots]
    m = build_method("lora")
    m.apply(seg, CTX)
    assert all(torch.equal(a, b) for a, b in zip(frozen, _features(seg, x)))  # B = 0 at init

    seg.train()
    seg.head.requires_grad_(True)
    lora_before = {n: p.detach().clone() for n, p in seg.backbone.named_parameters() if "lora_" in n}
    frozen_before = {n: p.detach().clone() for n, p in seg.backbone.named_parameters() if "lora_" not in n}
    assert all(not p.requires_grad for n, p in seg.backbone.named_parameters() if "lora_" not in n)
    opt = torch.optim.Adam([p for p in seg.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # step 1 moves B (A's gradient is B^T(...) = 0), step 2 moves A too
        opt.zero_grad()
        seg.loss(torch.randn(2, 3, 64, 64), torch.randint(0, 19, (2, 64, 64))).backward()
        opt.step()
    for n, p in seg.backbone.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, lora_before[n]), n
        else:
            assert torch.equal(p, frozen_before[n]), n
    for slot, w in zip(slots, w0):
        eff = getattr(slot.module, slot.weight).detach()
        assert torch.equal(eff[slot.rows("k")], w[slot.rows("k")])  # the key rows never change
        assert not torch.equal(eff[slot.rows("q")], w[slot.rows("q")])
        assert not torch.equal(eff[slot.rows("v")], w[slot.rows("v")])
        assert torch.equal(slot.module.parametrizations[slot.weight].original, w)  # frozen W kept as it is


@pytest.mark.parametrize("backbone", TINY)
def test_merge_gives_identical_outputs(backbone):
    seg = _segmentor(backbone)
    m = build_method("lora", {"rank": 4, "alpha": 16.0})
    m.apply(seg, CTX)
    _randomise_b(seg)
    seg.eval()
    x = torch.randn(2, 3, 64, 64)
    expected = []
    for slot, lora in _loras(seg):
        w = slot.module.parametrizations[slot.weight].original.detach()
        delta = torch.cat([lora.lora_B_q @ lora.lora_A_q, torch.zeros_like(w[slot.rows("k")]),
                           lora.lora_B_v @ lora.lora_A_v]).detach()
        expected.append(w + 4.0 * delta)  # alpha / rank = 16 / 4
    before = _features(seg, x)
    m.merge(seg)
    slots = seg.backbone.qkv()
    assert not any(parametrize.is_parametrized(s.module) for s in slots)
    assert not any("lora_" in n for n, _ in seg.backbone.named_parameters())
    for slot, w in zip(slots, expected):
        assert torch.allclose(getattr(slot.module, slot.weight), w, atol=1e-6)
    after = _features(seg, x)
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_multihead_attention_reads_the_parametrised_in_proj_weight():
    """open_clip's nn.MultiheadAttention: a non-zero update changes its output, exactly as the merged weight does."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 5, 32)
    m = build_method("lora")
    backbone = SimpleNamespace(requires_grad_=mha.requires_grad_, family="clip",
                               qkv=lambda: [QKV(0, mha, "in_proj_weight", "in_proj_bias", 32)])
    m.apply(SimpleNamespace(backbone=backbone), CTX)
    assert [n for n, p in mha.named_parameters() if p.requires_grad] == [
        "parametrizations.in_proj_weight.0.lora_A_q", "parametrizations.in_proj_weight.0.lora_B_q",
        "parametrizations.in_proj_weight.0.lora_A_v", "parametrizations.in_proj_weight.0.lora_B_v"]
    with torch.no_grad():
        base = mha(x, x, x, need_weights=False)[0]
        mha.parametrizations.in_proj_weight[0].lora_B_v.normal_()
        changed = mha(x, x, x, need_weights=False)[0]
        merged_w = mha.in_proj_weight.clone()
    assert not torch.allclose(base, changed)
    plain = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    plain.load_state_dict({"in_proj_weight": merged_w, "in_proj_bias": mha.in_proj_bias,
                           "out_proj.weight": mha.out_proj.weight, "out_proj.bias": mha.out_proj.bias})
    with torch.no_grad():
        assert torch.allclose(plain(x, x, x, need_weights=False)[0], changed, atol=1e-6)


def test_dropout_on_linear_slots_is_on_the_lora_input_only():
    seg = _segmentor("dinov2-tiny")
    m = build_method("lora", {"dropout": 0.5})
    m.apply(seg, CTX)
    _randomise_b(seg)
    slot = seg.backbone.qkv()[0]
    lin, lora = slot.module, slot.module.parametrizations.weight[0]
    w = lin.parametrizations.weight.original.detach()
    x = torch.randn(3, 7, seg.backbone.embed_dim)
    lin.train()
    torch.manual_seed(1)
    out = lin(x)
    torch.manual_seed(1)
    dx = torch.nn.functional.dropout(x, 0.5, training=True)
    dq = dx @ lora.lora_A_q.t() @ lora.lora_B_q.t()
    dv = dx @ lora.lora_A_v.t() @ lora.lora_B_v.t()
    expected = x @ w.t() + lin.bias + lora.scale * torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)
    assert torch.allclose(out, expected, atol=1e-5)
    lin.eval()  # no dropout: the parametrised weight alone
    assert torch.allclose(lin(x), x @ lin.weight.t() + lin.bias, atol=1e-6)
    m.merge(seg)
    assert not lin._forward_hooks


def test_dropout_on_multihead_attention_is_a_user_error():
    seg = _segmentor("clip-tiny")
    with pytest.raises(UserError, match="dropout.*MultiheadAttention"):
        build_method("lora", {"dropout": 0.1}).apply(seg, CTX)


@pytest.mark.parametrize("config, field", [({"rank": 0}, "rank"), ({"alpha": -1.0}, "alpha"),
                                           ({"dropout": 1.0}, "dropout"), ({"rnak": 8}, "rnak")])
def test_config_errors_are_one_line(config, field):
    with pytest.raises(UserError) as e:
        build_method("lora", config, where="manifest.yaml")
    assert "\n" not in str(e.value) and repr(field) in str(e.value)
