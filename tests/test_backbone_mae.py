"""The MAE family: official checkpoint layout (timm ViT names inside {"model": ...}), resampling, sizes."""

import pickle

import pytest
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import VisionTransformer

from fishertune.backbones import build_backbone
from fishertune.backbones.mae import load_mae
from fishertune.errors import UserError

DIM, DEPTH, GRID = 64, 4, 6


SHAPE = {"embed_dim": 64, "depth": 4}  # the small shape these checkpoint tests are written for
def _upstream(patch=14, grid=GRID, init_values=None):
    """An independent MAE-style encoder (MAE's models_vit is this timm class), at tiny width."""
    torch.manual_seed(5)
    return VisionTransformer(img_size=patch * grid, patch_size=patch, embed_dim=DIM, depth=DEPTH, num_heads=4,
                             num_classes=0, global_pool="", init_values=init_values).eval()


def _official_file(tmp_path, upstream, pretrain_extras=True, name="mae_pretrain_vit_huge.pth"):
    """Written as MAE's release writes it: {"model": encoder state}; a full pretraining checkpoint
    also carries the mask token and the pixel decoder."""
    state = dict(upstream.state_dict())
    if pretrain_extras:
        state["mask_token"] = torch.zeros(1, 1, 32)
        state["decoder_embed.weight"] = torch.zeros(32, DIM)
        state["decoder_pos_embed"] = torch.zeros(1, 1 + GRID * GRID, 32)
        state["decoder_blocks.0.attn.qkv.weight"] = torch.zeros(96, 32)
        state["decoder_pred.weight"] = torch.zeros(14 * 14 * 3, 32)
    path = tmp_path / name
    torch.save({"model": state}, path)
    return path


def _block_outputs(vit, x):
    outs = []
    hooks = [blk.register_forward_hook(lambda m, i, o: outs.append(o)) for blk in vit.blocks]
    with torch.no_grad():
        vit.forward_features(x)
    for h in hooks:
        h.remove()
    return outs


def test_native_patch_features_equal_the_upstream_encoders_block_outputs(tmp_path):
    up = _upstream()
    path = _official_file(tmp_path, up)
    ours = build_backbone("mae-tiny", pretrained=False, **SHAPE, seed=0, img_size=14 * GRID, patch_size=14).eval()
    load_mae(ours, path)
    for (n, p), q in zip(ours.vit.named_parameters(), up.parameters()):
        assert torch.equal(p, q), n
    x = torch.randn(2, 3, 14 * GRID, 14 * GRID)
    ref = _block_outputs(up, x)
    with torch.no_grad():
        feats = ours.forward_features(x)
    # the stride-1x level is block out_indices[2] (layer 2 of 4), laid out on the 6x6 grid
    level = ref[ours.out_indices[2]][:, 1:, :].transpose(1, 2).reshape(2, DIM, GRID, GRID)
    torch.testing.assert_close(feats[2], level)
    assert [f.shape[-1] for f in feats] == [GRID * 4, GRID * 2, GRID, GRID // 2]


def test_reins_setting_resamples_the_14_kernel_to_16_and_the_grid_to_the_input(tmp_path):
    up = _upstream()
    path = _official_file(tmp_path, up)
    ours = build_backbone("mae-tiny", pretrained=False, **SHAPE, seed=0, img_size=64, patch_size=16)
    load_mae(ours, path)
    expect_kernel = resample_patch_embed(up.patch_embed.proj.weight.detach(), [16, 16], interpolation="bicubic",
                                         antialias=True)
    torch.testing.assert_close(ours.vit.patch_embed.proj.weight.detach(), expect_kernel)
    expect_pos = resample_abs_pos_embed(up.pos_embed.detach(), new_size=[4, 4], old_size=[GRID, GRID],
                                        num_prefix_tokens=1)
    torch.testing.assert_close(ours.vit.pos_embed.detach(), expect_pos)
    assert torch.equal(ours.vit.blocks[3].mlp.fc2.weight, up.blocks[3].mlp.fc2.weight)


def test_encoder_only_safetensors_export_loads(tmp_path):
    from safetensors.torch import save_file

    up = _upstream(patch=8, grid=8)
    path = tmp_path / "mae_pretrain_vit_large.safetensors"
    save_file({k: v.contiguous() for k, v in up.state_dict().items()}, str(path))
    ours = build_backbone("mae-tiny", pretrained=False, **SHAPE, seed=1)
    load_mae(ours, path)
    assert torch.equal(ours.vit.cls_token, up.cls_token)


def test_a_dinov2_checkpoint_is_refused_naming_its_layer_scale_keys(tmp_path):
    dino = _upstream(init_values=1e-5)  # DINOv2's layout: the same ViT plus layer scale
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(dino.state_dict(), path)
    with pytest.raises(UserError, match=r"dinov2_vitl14_pretrain\.pth.*unexpected: blocks\.0\.ls1\.gamma"):
        load_mae(build_backbone("mae-tiny", pretrained=False, **SHAPE, seed=0, img_size=84, patch_size=14), path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_truncated_file_and_pickled_code_are_refused_without_running_it(tmp_path, capsys):
    path = _official_file(tmp_path, _upstream())
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"cut\.pth cannot be read"):
        load_mae(build_backbone("mae-tiny", pretrained=False, **SHAPE, seed=0), cut)

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(UserError, match="evil.pth"):
        load_mae(build_backbone("mae-tiny", pretrained=False, **SHAPE, seed=0), evil)
    assert "code ran" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, millions, out_indices",
    [
        # 24 x 12.596M blocks + 1025 x 1024 positions (32x32 grid + class) + 16x16x3x1024 kernel + class + norm
        ("mae-l", 304.150, (7, 11, 15, 23)),
        # 32 x 19.677M blocks + 1025 x 1280 positions + 16x16x3x1280 kernel + class + norm
        ("mae-h", 631.978, (7, 15, 23, 31)),
    ],
)
def test_full_size_counts_at_512_patch16(name, millions, out_indices):
    with torch.device("meta"):
        b = build_backbone(name, pretrained=False)
    assert sum(p.numel() for p in b.parameters()) / 1e6 == pytest.approx(millions, abs=0.0005)
    assert b.out_indices == out_indices and b.patch_size == 16
