"""Mask2Former (Cheng et al., 2022) as Rein configures it, in plain PyTorch (no compiled extensions).

Structure (mmdet/mmseg ``Mask2FormerHead`` with Rein's ``rein_dinov2_mask2former.py`` settings):

* pixel decoder: :class:`~fishertune.heads.msdeform.MSDeformAttnPixelDecoder` (6 deformable encoder
  layers over strides 8/16/32, 8 heads, 4 points, FFN 1024, GroupNorm 32, stride-4 lateral + output
  conv, 1x1 mask-feature conv);
* transformer decoder: 9 post-norm layers of masked cross-attention (to one level per layer, round
  robin from stride 32 to stride 8), self-attention and FFN 2048, 8 heads, 100 queries; sine position
  encodings and a learned level embedding on the keys; a final LayerNorm before the class (K+1 way,
  the last being "no object") and mask-embedding (3-layer MLP) predictions;
* masked attention: a query attends only where its previous mask prediction, resized to the level,
  has sigmoid >= 0.5 (a query whose mask is empty everywhere attends everywhere);
* training: per image, one binary mask per class present in the label (255 excluded; ignored pixels
  are background of every mask, as in mmseg), Hungarian matching (class 2, BCE 5, dice 5 on 12,544
  random points) and losses (class CE 2 with no-object weight 0.1, BCE 5, dice 5 on 12,544
  importance-sampled points) on the prediction before the first layer and after every layer;
* inference: ``predict`` gives ``einsum(softmax(class)[..., :-1], sigmoid(mask))`` at stride 4.

Query hook. Methods such as Rein replace the learned queries. Set ``head.query_provider`` to a
callable ``provider(batch_size) -> (query_feat, query_embed)`` returning two ``B x Q x channels``
tensors: ``query_feat`` is the decoder's initial content and ``query_embed`` the positional part added
to the queries in every attention. If the provider is an ``nn.Module`` it becomes a submodule of the
head (its parameters train and are saved with it). With ``None`` (the default) the head's own
``query_feat``/``query_embed`` embeddings are used; they stay in the head when a provider is set,
so a method that replaces them should remove them (Rein deletes them; see
``fishertune.heads.query_link``).

Two registered names: ``mask2former`` (Rein's full settings as defaults) and ``mask2former-tiny``
(the same head with small defaults, for the miniature); every setting is a constructor option.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fishertune.data.labels import IGNORE_INDEX
from fishertune.heads.base import HEADS, DecodeHead, mean_over_processes
from fishertune.heads.matcher import (HungarianMatcher, dice_loss, point_sample, sigmoid_bce_loss,
                                      uncertain_point_coords)
from fishertune.heads.msdeform import MSDeformAttnPixelDecoder, sine_position_encoding
from fishertune.precision import to_compute

QueryProvider = Callable[[int], "tuple[torch.Tensor, torch.Tensor]"]


class MaskedDecoderLayer(nn.Module):
    """mmdet ``Mask2FormerTransformerDecoderLayer``: cross-attn, norm, self-attn, norm, FFN, norm."""

    def __init__(self, channels: int, num_heads: int, ffn_channels: int):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(channels)
        self.self_attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, ffn_channels), nn.ReLU(inplace=True),
                                 nn.Linear(ffn_channels, channels))
        self.norm3 = nn.LayerNorm(channels)

    def forward(self, query, query_pos, key, key_pos, attn_mask):
        q = query + query_pos
        query = self.norm1(query + self.cross_attn(q, key + key_pos, key, attn_mask=attn_mask, need_weights=False)[0])
        q = query + query_pos
        query = self.norm2(query + self.self_attn(q, q, query, need_weights=False)[0])
        return self.norm3(query + self.ffn(query))


@torch.compiler.disable  # reads values on the host: torch.compile runs it as it is, between two graphs
def semantic_targets(labels: torch.Tensor, num_classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image of ``labels`` (B x H x W train ids, 255 ignored): (classes present G, masks G x H x W bool).

    Which classes each image holds is marked on the device (one boolean per image and class) and copied to
    the host once for the whole batch: the step's only wait for the device outside the matching (which
    runs on the host anyway). The classes go back to the device without waiting; each image's classes are
    ascending, and a value other than 0..K-1 and 255 is an error."""
    b = labels.shape[0]
    flat = labels.reshape(b, -1).long()
    valid = (flat >= 0) & (flat < num_classes)
    bins = torch.where(valid, flat, torch.where(flat == IGNORE_INDEX, num_classes, num_classes + 1))
    present = torch.zeros(b, num_classes + 2, dtype=torch.bool, device=labels.device).scatter_(1, bins, True).cpu()
    if present[:, num_classes + 1].any():
        raise ValueError(f"label values must be in 0..{num_classes - 1} or {IGNORE_INDEX}")
    out = []
    for label, row in zip(labels.long(), present):
        classes = torch.nonzero(row[:num_classes]).view(-1).to(labels.device, non_blocking=True)
        out.append((classes, label[None] == classes[:, None, None]))
    return out


@HEADS.register("mask2former")
class Mask2FormerHead(DecodeHead):
    """Mask2Former decode head over four backbone levels (strides 4/8/16/32, ``in_channels`` each).

    Args:
        in_channels: channels of every backbone level (the backbone's embed_dim).
        num_classes: number of classes K (19); the classifier has K+1 outputs, the last "no object".
        channels: width of the pixel decoder and transformer decoder (Rein: 256).
        out_channels: channels of the mask features and mask embeddings (Rein: 256).
        num_queries: number of learned queries (Rein: 100).
        num_heads: attention heads in the deformable encoder and the transformer decoder (Rein: 8).
        num_groups: GroupNorm groups in the pixel decoder's convolutions (Rein: 32).
        encoder_layers: deformable-attention encoder layers of the pixel decoder (Rein: 6).
        encoder_points: sampling points per head and level in deformable attention (Rein: 4).
        encoder_ffn_channels: hidden width of the encoder FFN (Rein: 1024).
        decoder_layers: masked-attention transformer decoder layers (Rein: 9).
        decoder_ffn_channels: hidden width of the decoder FFN (Rein: 2048).
        num_points: points sampled per mask for the matching costs and the mask losses (Rein: 12,544).
        oversample_ratio: loss point sampling draws this many times ``num_points`` candidates (Rein: 3.0).
        importance_sample_ratio: share of loss points taken from the most uncertain candidates (Rein: 0.75).
        class_weight: weight of the class cross-entropy loss and of the class matching cost (Rein: 2.0).
        mask_weight: weight of the mask BCE loss and matching cost (Rein: 5.0).
        dice_weight: weight of the dice loss and matching cost (Rein: 5.0).
        no_object_weight: cross-entropy class weight of the "no object" class (Rein: 0.1).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, out_channels: int = 256,
                 num_queries: int = 100, num_heads: int = 8, num_groups: int = 32, encoder_layers: int = 6,
                 encoder_points: int = 4, encoder_ffn_channels: int = 1024, decoder_layers: int = 9,
                 decoder_ffn_channels: int = 2048, num_points: int = 12544, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75, class_weight: float = 2.0, mask_weight: float = 5.0,
                 dice_weight: float = 5.0, no_object_weight: float = 0.1):
        super().__init__()
        for name, value in (("channels", channels), ("num_queries", num_queries), ("num_heads", num_heads),
                            ("decoder_layers", decoder_layers), ("num_points", num_points)):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if channels % num_heads or channels % num_groups or channels % 2:
            raise ValueError(f"channels {channels} must be even and divisible by num_heads {num_heads} "
                             f"and num_groups {num_groups}")
        self.num_classes, self.channels, self.num_heads = num_classes, channels, num_heads
        self.num_queries = num_queries
        self.num_levels = 3
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            in_channels, channels, out_channels, num_layers=encoder_layers, num_heads=num_heads,
            num_points=encoder_points, ffn_channels=encoder_ffn_channels, num_groups=num_groups,
            num_levels=self.num_levels)
        self.level_embed = nn.Embedding(self.num_levels, channels)
        self.layers = nn.ModuleList(MaskedDecoderLayer(channels, num_heads, decoder_ffn_channels)
                                    for _ in range(decoder_layers))
        self.post_norm = nn.LayerNorm(channels)
        self.query_feat = nn.Embedding(num_queries, channels)
        self.query_embed = nn.Embedding(num_queries, channels)
        self.cls_embed = nn.Linear(channels, num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True),
                                        nn.Linear(channels, channels), nn.ReLU(inplace=True),
                                        nn.Linear(channels, out_channels))
        self.register_buffer("ce_weight", torch.tensor([1.0] * num_classes + [no_object_weight]), persistent=False)
        self.matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)
        #: ``None`` or ``callable(batch_size) -> (query_feat, query_embed)``, each B x Q x channels (module docstring)
        self.query_provider: QueryProvider | None = None
        if not self.post_norm.weight.is_meta:
            for layer in self.layers:  # mmdet: Xavier on every matrix of the transformer decoder
                for p in layer.parameters():
                    if p.dim() > 1:
                        nn.init.xavier_uniform_(p)

    def __setattr__(self, name, value):
        # ``query_provider`` may be swapped freely between a module (registered as a submodule) and a
        # plain callable or None, which nn.Module alone refuses once a module was registered there.
        if name == "query_provider" and "_modules" in self.__dict__:
            self._modules.pop(name, None)
            self.__dict__.pop(name, None)
            if not isinstance(value, nn.Module):
                object.__setattr__(self, name, value)
                return
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ forward
    def queries(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(query_feat, query_embed), each ``batch_size x Q x channels``: the provider's or the head's own."""
        if self.query_provider is None:
            return (self.query_feat.weight.unsqueeze(0).expand(batch_size, -1, -1),
                    self.query_embed.weight.unsqueeze(0).expand(batch_size, -1, -1))
        feat, embed = self.query_provider(batch_size)
        for what, t in (("query_feat", feat), ("query_embed", embed)):
            if t.dim() != 3 or t.shape[0] != batch_size or t.shape[2] != self.channels:
                raise ValueError(f"query_provider's {what} has shape {tuple(t.shape)}; "
                                 f"expected ({batch_size}, Q, {self.channels})")
        if feat.shape != embed.shape:
            raise ValueError(f"query_provider gave query_feat {tuple(feat.shape)} and query_embed {tuple(embed.shape)}")
        return feat, embed

    def _predict_layer(self, query: torch.Tensor, mask_features: torch.Tensor, attn_size):
        x = self.post_norm(query)
        cls_logits = self.cls_embed(x)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)
        attn = F.interpolate(mask_logits, size=attn_size, mode="bilinear", align_corners=False)
        attn = attn.flatten(2).unsqueeze(1).expand(-1, self.num_heads, -1, -1).flatten(0, 1)
        attn_mask = (attn.sigmoid() < 0.5).detach()  # True = may not attend
        return cls_logits, mask_logits, attn_mask

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Class logits (B x Q x K+1) and mask logits (B x Q x H/4 x W/4) before the first decoder
        layer and after each one (``decoder_layers + 1`` of each)."""
        mask_features, multi_scale = self.pixel_decoder(features)
        b = mask_features.shape[0]
        keys, key_pos = [], []
        for i, fmap in enumerate(multi_scale):
            keys.append(fmap.flatten(2).transpose(1, 2) + self.level_embed.weight[i].view(1, 1, -1))
            pos = sine_position_encoding((b, *fmap.shape[-2:]), self.channels // 2, fmap.device, fmap.dtype)
            key_pos.append(pos.flatten(2).transpose(1, 2))
        query, query_pos = self.queries(b)
        cls_logits, mask_logits, attn_mask = self._predict_layer(query, mask_features, multi_scale[0].shape[-2:])
        all_cls, all_masks = [cls_logits], [mask_logits]
        for i, layer in enumerate(self.layers):
            level = i % self.num_levels
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)  # an empty mask attends everywhere
            query = layer(query, query_pos, keys[level], key_pos[level], attn_mask)
            cls_logits, mask_logits, attn_mask = self._predict_layer(
                query, mask_features, multi_scale[(i + 1) % self.num_levels].shape[-2:])
            all_cls.append(cls_logits)
            all_masks.append(mask_logits)
        return all_cls, all_masks

    def predict(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Per-pixel class scores B x K x h x w from the last decoder layer, at the mask features' resolution
        (the finest backbone level: stride 4 with Rein's backbones)."""
        all_cls, all_masks = self(features)
        probs = all_cls[-1].softmax(-1)[..., :-1]
        return torch.einsum("bqc,bqhw->bchw", probs, all_masks[-1].sigmoid())

    # ------------------------------------------------------------------ training
    def losses(self, features: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss_cls``, ``loss_mask``, ``loss_dice`` of the last layer and ``d{i}.loss_*`` of the
        earlier predictions (``d0`` = before the first layer), each already weighted."""
        return self.prediction_losses(*self(features), labels)

    def prediction_losses(self, all_cls: list[torch.Tensor], all_masks: list[torch.Tensor],
                          labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`losses` of the predictions ``self(features)`` made (targets, matching, point-sampled losses)."""
        targets = semantic_targets(labels, self.num_classes)
        num_masks = mean_over_processes(sum([c.numel() for c, _ in targets]), labels.device)  # a list: dynamo traces no generators
        out = {}
        last = len(all_cls) - 1
        for i, (cls_logits, mask_logits) in enumerate(zip(all_cls, all_masks)):
            prefix = "" if i == last else f"d{i}."
            for key, value in self._layer_losses(cls_logits, mask_logits, targets, num_masks).items():
                out[prefix + key] = value
        return out

    def _layer_losses(self, cls_logits, mask_logits, targets, num_masks: int) -> dict[str, torch.Tensor]:
        b, q, _ = cls_logits.shape
        class_target = torch.full((b, q), self.num_classes, dtype=torch.long, device=cls_logits.device)
        preds, gts = [], []
        for i, (classes, masks) in enumerate(targets):
            qi, gi = self.matcher(cls_logits[i].detach(), mask_logits[i].detach(), classes, masks)
            class_target[i, qi] = classes[gi]
            preds.append(mask_logits[i, qi])
            gts.append(masks[gi])
        loss_cls = F.cross_entropy(to_compute(cls_logits.flatten(0, 1)), class_target.flatten(),
                                   weight=to_compute(self.ce_weight))
        preds = torch.cat(preds)
        if preds.shape[0] == 0:  # no labelled pixel in the batch: keep the graph, add nothing
            zero = mask_logits.sum() * 0
            return {"loss_cls": self.class_weight * loss_cls, "loss_mask": zero, "loss_dice": zero}
        gts = torch.cat(gts).unsqueeze(1).to(preds.dtype)
        coords = uncertain_point_coords(preds.unsqueeze(1).detach(), self.num_points, self.oversample_ratio,
                                        self.importance_sample_ratio)
        point_preds = point_sample(preds.unsqueeze(1), coords).squeeze(1)
        with torch.no_grad():
            point_gts = point_sample(gts, coords).squeeze(1)
        return {
            "loss_cls": self.class_weight * loss_cls,
            "loss_mask": self.mask_weight * sigmoid_bce_loss(point_preds, point_gts, num_masks * self.num_points),
            "loss_dice": self.dice_weight * dice_loss(point_preds, point_gts, num_masks),
        }


@HEADS.register("mask2former-tiny")
class Mask2FormerTinyHead(Mask2FormerHead):
    """The same head with small defaults for the miniature (64 channels, 4 heads, 2 encoder layers, 3
    decoder layers, 20 queries, FFN 128, 1,024 points); options and their meaning as ``mask2former``.
    Twenty queries, not ten: a miniature crop often holds 15+ of the 19 classes, and a semantic
    Mask2Former needs one query per class present."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 64, out_channels: int = 64,
                 num_queries: int = 20, num_heads: int = 4, num_groups: int = 32, encoder_layers: int = 2,
                 encoder_points: int = 4, encoder_ffn_channels: int = 128, decoder_layers: int = 3,
                 decoder_ffn_channels: int = 128, num_points: int = 1024, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75, class_weight: float = 2.0, mask_weight: float = 5.0,
                 dice_weight: float = 5.0, no_object_weight: float = 0.1):
        super().__init__(in_channels, num_classes, channels=channels, out_channels=out_channels,
                         num_queries=num_queries, num_heads=num_heads, num_groups=num_groups,
                         encoder_layers=encoder_layers, encoder_points=encoder_points,
                         encoder_ffn_channels=encoder_ffn_channels, decoder_layers=decoder_layers,
                         decoder_ffn_channels=decoder_ffn_channels, num_points=num_points,
                         oversample_ratio=oversample_ratio, importance_sample_ratio=importance_sample_ratio,
                         class_weight=class_weight, mask_weight=mask_weight, dice_weight=dice_weight,
                         no_object_weight=no_object_weight)
