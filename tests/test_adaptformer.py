"""AdaptFormer: parallel MLP adapters fed the pre-MLP residual stream, on every family."""


import pytest
import torch

from fishertune.backbones import BACKBONES, build_backbone
from fishertune.errors import UserError
from fishertune.heads import build_head
from fishertune.segmentor import Segmentor
from fishertune.tuning import MethodContext, build_method

TINY = [n for n in BACKBONES.names() if n.endswith("-tiny")]
CTX = MethodContext(device=torch.device("cpu"), seed=0)


def _segmentor(name: str) -> Segmentor:
    torch.manual_seed(0)
    return Segmentor(build_backbone(name, pretrained=False, seed=0), build_head("light", 128, 19, channels=32))


def _features(seg, x):
    with torch.no_grad():
        return seg.backbone.forward_features(x)


@pytest.mark.parametrize("backbone", TINY)
def test_starts_as_the_frozen_model_and_trains_only_the_adapters(backbone):
    seg = _segmentor(backbone)
    seg.eval()
    x = torch.randn(2, 3, 64, 64)
    frozen = _features(seg, x)
    build_method("adaptformer").apply(seg, CTX)
    assert all(torch.equal(a, b) for a, b in zip(frozen, _features(seg, x)))  # up projection zero at init
    names = [n for n, p in seg.backbone.named_parameters() if p.requires_grad]
    assert names and all(".adaptformer." in n for n in names)
    assert len(names) == 4 * seg.backbone.num_layers  # down/up weight and bias per block

    seg.train()
    seg.head.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in seg.backbone.named_parameters()}
    opt = torch.optim.Adam([p for p in seg.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # step 1 moves the up projection (down's gradient goes through up = 0), step 2 both
        opt.zero_grad()
        seg.loss(torch.randn(2, 3, 64, 64), torch.randint(0, 19, (2, 64, 64))).backward()
        opt.step()
    for n, p in seg.backbone.named_parameters():
        if ".adaptformer." in n:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(a, b) for a, b in zip(frozen, _features(seg.eval(), x)))


@pytest.mark.parametrize("backbone", TINY)
def test_adapter_reads_the_residual_stream_before_the_mlp_norm_and_adds_to_the_block_output(backbone):
    seg = _segmentor(backbone)
    bb = seg.backbone
    frozen_out, norm_in, norm_out, adapter_in = {}, {}, {}, {}
    handles = []
    for i, block in enumerate(bb.blocks):  # registered before apply: they see the frozen block
        handles.append(block.register_forward_hook(lambda mod, a, out, i=i: frozen_out.__setitem__(i, out)))
    build_method("adaptformer", {"dropout": 0.0}).apply(seg, CTX)
    for i, block in enumerate(bb.blocks):
        norm = bb.mlp_norm(i)
        def keep(mod, a, out, i=i):
            norm_in[i], norm_out[i] = a[0], out

        handles.append(norm.register_forward_hook(keep))
        handles.append(block.adaptformer.down.register_forward_pre_hook(
            lambda mod, a, i=i: adapter_in.__setitem__(i, a[0])))
        with torch.no_grad():
            block.adaptformer.up.weight.normal_(0, 0.1)
    final_out = {}
    for i, block in enumerate(bb.blocks):
        handles.append(block.register_forward_hook(lambda mod, a, out, i=i: final_out.__setitem__(i, out)))
    seg.eval()
    _features(seg, torch.randn(2, 3, 64, 64))
    assert len(adapter_in) == bb.num_layers
    for i, block in enumerate(bb.blocks):
        assert adapter_in[i] is norm_in[i]  # the pre-MLP residual stream x, as in AdaptFormer's code ...
        assert not torch.allclose(adapter_in[i], norm_out[i])  # ... not norm2(x)
        with torch.no_grad():
            branch = 0.1 * block.adaptformer.up(torch.relu(block.adaptformer.down(norm_in[i])))
        assert torch.allclose(final_out[i], frozen_out[i] + branch, atol=1e-6)
        assert block.adaptformer._input is None  # nothing kept between calls
    for h in handles:
        h.remove()


@pytest.mark.parametrize("config, field", [({"scale": -0.1}, "scale"), ({"bottleneck": 0}, "bottleneck"),
                                           ({"dropout": 1.5}, "dropout"), ({"bottelneck": 64}, "bottelneck"),
                                           ({"bottleneck": 64.0}, "bottleneck")])
def test_config_errors_are_one_line(config, field):
    with pytest.raises(UserError) as e:
        build_method("adaptformer", config, where="manifest.yaml")
    assert "\n" not in str(e.value) and repr(field) in str(e.value)
