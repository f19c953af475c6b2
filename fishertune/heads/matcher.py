"""Point sampling, mask losses and the Hungarian matcher of Mask2Former (mmdet's settings as Rein uses them).

Masks are compared on sampled points rather than on whole maps (Mask2Former, Cheng et al. 2022):
the matcher uses points drawn uniformly at random, shared by every (query, ground truth) pair; the
losses use points chosen by importance sampling around the uncertain (logit near 0) region of each
matched prediction. Coordinates are (x, y) in [0, 1] of the map, read with bilinear ``grid_sample``
(``align_corners=False``), so predictions at stride 4 and labels at full size are sampled at the same
image positions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from fishertune.precision import to_compute


def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``maps`` N x C x H x W, ``coords`` N x P x 2 in [0, 1] -> N x C x P (bilinear, zeros outside)."""
    return F.grid_sample(maps, 2 * coords.unsqueeze(2) - 1, mode="bilinear", align_corners=False).squeeze(3)


@torch.no_grad()
def uncertain_point_coords(mask_logits: torch.Tensor, num_points: int, oversample_ratio: float = 3.0,
                           importance_sample_ratio: float = 0.75) -> torch.Tensor:
    """Importance sampling of ``num_points`` points per mask of ``mask_logits`` (N x 1 x H x W).

    Draw ``oversample_ratio * num_points`` uniform points, keep the ``importance_sample_ratio`` share
    with the highest uncertainty ``-|logit|`` and fill the rest with fresh uniform points
    (detectron2's ``get_uncertain_point_coords_with_randomness``). Returns N x num_points x 2.
    """
    n = mask_logits.shape[0]
    sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, sampled, 2, device=mask_logits.device, dtype=mask_logits.dtype)
    uncertainty = -point_sample(mask_logits, coords).abs().squeeze(1)  # N x sampled
    n_important = int(importance_sample_ratio * num_points)
    n_random = num_points - n_important
    idx = uncertainty.topk(n_important, dim=1).indices
    important = torch.gather(coords, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if n_random:
        rand = torch.rand(n, n_random, 2, device=mask_logits.device, dtype=mask_logits.dtype)
        important = torch.cat([important, rand], 1)
    return important


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, avg_factor: float, eps: float = 1.0) -> torch.Tensor:
    """mmdet ``DiceLoss(use_sigmoid, naive_dice=True, eps=1)``: sum over masks of
    ``1 - (2*sum(p*t) + eps) / (sum p + sum t + eps)`` divided by ``avg_factor``. Inputs N x P."""
    p = logits.sigmoid()
    dice = 1 - (2 * (p * targets).sum(-1) + eps) / (p.sum(-1) + targets.sum(-1) + eps)
    return dice.sum() / avg_factor


def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor, avg_factor: float) -> torch.Tensor:
    """Binary cross-entropy with logits summed over all entries, divided by ``avg_factor``."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / avg_factor


def dice_cost(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Pairwise dice cost (mmdet ``DiceCost(pred_act=True, naive_dice=True, eps=1)``): Q x P, G x P -> Q x G."""
    p = logits.sigmoid()
    numerator = 2 * p @ targets.T
    denominator = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + eps) / (denominator + eps)


def bce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise mean binary cross-entropy over points (mmdet ``CrossEntropyLossCost(use_sigmoid=True)``)."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[-1]


class HungarianMatcher:
    """One-to-one assignment of queries to ground-truth masks of one image by minimum total cost.

    cost(q, g) = ``class_weight * -softmax(class logits_q)[label_g]`` + ``mask_weight * BCE`` +
    ``dice_weight * dice``, the mask terms on ``num_points`` uniformly random points shared by all
    pairs (Rein: 2.0, 5.0, 5.0, 12,544 points). Solved with ``scipy.optimize.linear_sum_assignment``.
    """

    def __init__(self, class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
                 num_points: int = 12544):
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(self, cls_logits: torch.Tensor, mask_logits: torch.Tensor, gt_labels: torch.Tensor,
                    gt_masks: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """Q x G costs for ``cls_logits`` Q x (K+1), ``mask_logits`` Q x h x w, ``gt_labels`` G,
        ``gt_masks`` G x H x W (0/1); ``coords`` 1 x P x 2 (drawn uniformly if not given)."""
        if coords is None:
            coords = torch.rand(1, self.num_points, 2, device=mask_logits.device)
        q, g = mask_logits.shape[0], gt_masks.shape[0]
        pred = point_sample(to_compute(mask_logits.unsqueeze(1)), coords.expand(q, -1, -1)).squeeze(1)
        tgt = point_sample(to_compute(gt_masks.unsqueeze(1)), coords.expand(g, -1, -1)).squeeze(1)
        cls_cost = -to_compute(cls_logits).softmax(-1)[:, gt_labels]
        return (self.class_weight * cls_cost + self.mask_weight * bce_cost(pred, tgt)
                + self.dice_weight * dice_cost(pred, tgt))

    @torch.compiler.disable  # scipy on the host: torch.compile runs it as it is, between two graphs
    @torch.no_grad()
    def __call__(self, cls_logits, mask_logits, gt_labels, gt_masks) -> tuple[torch.Tensor, torch.Tensor]:
        """(query indices, ground-truth indices) of the optimal assignment, both of length min(Q, G)."""
        device = mask_logits.device
        if gt_labels.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return empty, empty
        cost = self.cost_matrix(cls_logits, mask_logits, gt_labels, gt_masks).cpu().numpy()
        rows, cols = linear_sum_assignment(np.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8))
        return (torch.as_tensor(rows, dtype=torch.long, device=device),
                torch.as_tensor(cols, dtype=torch.long, device=device))
