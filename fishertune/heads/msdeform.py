"""Multi-scale deformable attention and the Mask2Former pixel decoder, in plain PyTorch.

Deformable attention (Zhu et al., Deformable DETR) lets each query look at ``num_points`` sampled
locations per head and per level around a reference point; the sampled values are mixed by
softmax-normalised weights predicted from the query. The sampling here is ``F.grid_sample``
(bilinear, zero padding outside the map, ``align_corners=False``), the same arithmetic as the
compiled kernel of mmcv/Deformable DETR, so it runs wherever PyTorch runs (CPU, CUDA, meta).

:class:`MSDeformAttnPixelDecoder` follows mmdet's decoder of the same name as Rein configures it: the
three coarsest backbone levels (strides 8/16/32) are projected to ``channels`` (1x1 conv + GroupNorm),
given sine position encodings plus a learned level embedding, refined by ``num_layers`` deformable
encoder layers (post-norm, FFN), and the finest level (stride 4) joins FPN-style (1x1 lateral conv +
upsampled stride-8 output, 3x3 conv + GroupNorm + ReLU); a 1x1 conv turns that into the mask features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def ms_deform_attn_sample(value: torch.Tensor, spatial_shapes: list[tuple[int, int]],
                          sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """The core of multi-scale deformable attention.

    ``value``: ``B x S x M x D`` (S = sum of H_l*W_l over levels, flattened row-major level by level;
    M heads of D channels). ``sampling_locations``: ``B x Q x M x L x P x 2`` as (x, y) in [0, 1] of
    each level's map (0 and 1 are the outer pixel edges). ``attention_weights``: ``B x Q x M x L x P``.
    Returns ``B x Q x (M*D)``: per head, the weighted sum of bilinearly sampled values (0 outside).
    """
    b, _, m, d = value.shape
    _, q, _, n_levels, n_points, _ = sampling_locations.shape
    sizes = [h * w for h, w in spatial_shapes]
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for level, (value_l, (h, w)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes)):
        # B x HW x M x D -> (B*M) x D x H x W
        value_l = value_l.permute(0, 2, 3, 1).reshape(b * m, d, h, w)
        # B x Q x M x P x 2 -> (B*M) x Q x P x 2
        grid_l = grids[:, :, :, level].transpose(1, 2).reshape(b * m, q, n_points, 2)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*M) x D x Q x L x P, weighted by (B*M) x 1 x Q x L x P, summed over levels and points
    stacked = torch.stack(sampled, dim=3)
    weights = attention_weights.transpose(1, 2).reshape(b * m, 1, q, n_levels, n_points)
    out = (stacked * weights).sum(dim=(3, 4))  # (B*M) x D x Q
    return out.reshape(b, m * d, q).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention over ``num_levels`` maps (mmcv's ``MultiScaleDeformableAttention``, no residual).

    Sampling offsets are predicted from the query (plus its position encoding) and normalised by each
    level's width/height; weights are a softmax over the ``num_levels * num_points`` samples of a head.
    Initialised as Deformable DETR: zero offset weights, the offset bias pointing each head in its own
    direction at distances 1..P, zero attention logits, Xavier value/output projections.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 3, num_points: int = 4):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.num_levels, self.num_points = embed_dim, num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.sampling_offsets.weight.is_meta:
            return
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
                spatial_shapes: list[tuple[int, int]]) -> torch.Tensor:
        """``query`` B x Q x C (position already added), ``reference_points`` B x Q x L x 2 in [0, 1]
        (x, y), ``value`` B x S x C; returns B x Q x C."""
        b, q, _ = query.shape
        m, n_l, n_p = self.num_heads, self.num_levels, self.num_points
        if len(spatial_shapes) != n_l:
            raise ValueError(f"expected {n_l} levels, got {len(spatial_shapes)}")
        v = self.value_proj(value).view(b, value.shape[1], m, self.embed_dim // m)
        offsets = self.sampling_offsets(query).view(b, q, m, n_l, n_p, 2)
        weights = self.attention_weights(query).view(b, q, m, n_l * n_p).softmax(-1).view(b, q, m, n_l, n_p)
        # offsets are in pixels of each level: divide by (W, H), filled in on the device (a tensor made from the
        # shapes on the host would be a copy the step waits for)
        normalizer = torch.stack([torch.stack((query.new_full((), w), query.new_full((), h))) for h, w in spatial_shapes])
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn_sample(v, spatial_shapes, locations, weights))


def sine_position_encoding(mask_shape: tuple[int, int, int], num_feats: int, device=None, dtype=torch.float32,
                           temperature: float = 10000.0) -> torch.Tensor:
    """mmdet's ``SinePositionalEncoding(num_feats, normalize=True)`` for an unpadded ``B x H x W`` map.

    Returns ``B x 2*num_feats x H x W``: the first ``num_feats`` channels encode y, the rest x; each
    coordinate is the 1-based cumulative count normalised to (0, 2*pi], channels alternate sin/cos with
    frequencies ``temperature ** (2*(i//2)/num_feats)``.
    """
    b, h, w = mask_shape
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, device=device, dtype=dtype).view(1, h, 1).expand(b, h, w)
    x = torch.arange(1, w + 1, device=device, dtype=dtype).view(1, 1, w).expand(b, h, w)
    y = y / (h + eps) * scale
    x = x / (w + eps) * scale
    dim_t = torch.arange(num_feats, device=device, dtype=dtype)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_x = x[..., None] / dim_t
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: ``x = LN(x + MSDA(x + pos)); x = LN(x + FFN(x))`` (ReLU FFN)."""

    def __init__(self, channels: int, num_heads: int, num_levels: int, num_points: int, ffn_channels: int):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(channels, num_heads, num_levels, num_points)
        self.norm1 = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, ffn_channels), nn.ReLU(inplace=True),
                                 nn.Linear(ffn_channels, channels))
        self.norm2 = nn.LayerNorm(channels)

    def forward(self, x, pos, reference_points, spatial_shapes):
        x = self.norm1(x + self.self_attn(x + pos, reference_points, x, spatial_shapes))
        return self.norm2(x + self.ffn(x))


def _conv_gn(cin: int, cout: int, kernel: int, groups: int, relu: bool) -> nn.Sequential:
    """mmcv ``ConvModule`` with GroupNorm: a bias-free conv, GN, optional ReLU."""
    layers = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.GroupNorm(groups, cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MSDeformAttnPixelDecoder(nn.Module):
    """mmdet's ``MSDeformAttnPixelDecoder`` for four input levels (strides 4/8/16/32) and ``num_outs=3``.

    ``forward(features)`` takes the four maps (finest first) and returns ``(mask_features,
    multi_scale)``: ``mask_features`` B x out_channels x H/4 x W/4 and ``multi_scale`` the three
    encoder outputs from the coarsest (stride 32) to stride 8, each B x channels x h x w.
    """

    def __init__(self, in_channels: int, channels: int = 256, out_channels: int = 256, num_layers: int = 6,
                 num_heads: int = 8, num_points: int = 4, ffn_channels: int = 1024, num_groups: int = 32,
                 num_levels: int = 3):
        super().__init__()
        self.num_levels = num_levels
        # input projections of the encoder levels, ordered coarsest first (as mmdet)
        self.input_convs = nn.ModuleList(_conv_gn(in_channels, channels, 1, num_groups, relu=False)
                                         for _ in range(num_levels))
        self.level_encoding = nn.Embedding(num_levels, channels)
        self.layers = nn.ModuleList(DeformableEncoderLayer(channels, num_heads, num_levels, num_points, ffn_channels)
                                    for _ in range(num_layers))
        self.lateral_conv = _conv_gn(in_channels, channels, 1, num_groups, relu=False)
        self.output_conv = _conv_gn(channels, channels, 3, num_groups, relu=True)
        self.mask_feature = nn.Conv2d(channels, out_channels, 1)
        self.channels = channels
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.mask_feature.weight.is_meta:
            return
        for layer in self.layers:  # mmdet: Xavier on every matrix of the encoder, then MSDA's own init
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            layer.self_attn.reset_parameters()
        for conv in self.input_convs:
            nn.init.xavier_uniform_(conv[0].weight)
        for conv in (self.lateral_conv[0], self.output_conv[0], self.mask_feature):  # caffe2 Xavier
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        nn.init.normal_(self.level_encoding.weight)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if len(features) != self.num_levels + 1:
            raise ValueError(f"the pixel decoder takes {self.num_levels + 1} feature maps, got {len(features)}")
        coarse = features[1:][::-1]  # stride 32, 16, 8
        b = coarse[0].shape[0]
        shapes = [tuple(f.shape[-2:]) for f in coarse]
        tokens, positions, refs = [], [], []
        for i, (fmap, conv) in enumerate(zip(coarse, self.input_convs)):
            x = conv(fmap)
            h, w = shapes[i]
            pos = sine_position_encoding((b, h, w), self.channels // 2, x.device, x.dtype)
            tokens.append(x.flatten(2).transpose(1, 2))
            positions.append(pos.flatten(2).transpose(1, 2) + self.level_encoding.weight[i].view(1, 1, -1))
            ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h
            xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            refs.append(torch.stack((gx.reshape(-1), gy.reshape(-1)), -1))
        x = torch.cat(tokens, 1)
        pos = torch.cat(positions, 1)
        # no padding, so every level's valid ratio is 1: the same point on every level
        reference_points = torch.cat(refs, 0)[None, :, None, :].expand(b, -1, self.num_levels, 2)
        for layer in self.layers:
            x = layer(x, pos, reference_points, shapes)
        outs = [t.transpose(1, 2).reshape(b, self.channels, h, w)
                for t, (h, w) in zip(x.split([h * w for h, w in shapes], 1), shapes)]
        fine = self.lateral_conv(features[0])
        fine = fine + F.interpolate(outs[-1], size=fine.shape[-2:], mode="bilinear", align_corners=False)
        fine = self.output_conv(fine)
        return self.mask_feature(fine), outs
