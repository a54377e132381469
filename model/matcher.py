"""Hungarian matching of predictions to ground-truth masks (MaskFormer's ``HungarianMatcher``).

Per image, the cost of assigning query i to target j is

    cost_class * (-p_i(c_j)) + cost_focal * focal(m_i, t_j) + cost_dice * dice(m_i, t_j)

and ``scipy.optimize.linear_sum_assignment`` picks the one-to-one assignment of least
total cost (every target gets a query when Q >= number of targets).

As in MaskFormer's memory-efficient matcher, the targets are downsampled (nearest) to the
prediction resolution (H/4) rather than the predictions upsampled: the cost is only a
ranking, and this keeps it O(Q·HW/16). With ``num_points > 0`` (Mask2Former) both are
instead compared at the same ``num_points`` uniformly random points per image, O(Q·P).
The losses on the matched pairs are computed by the criterion.

``FixedMatcher`` is PFT's fixed class-to-query assignment (query i <-> the mask of class
i). Both return the same ``Indices`` so one criterion serves every decoder (whose class
loss — softmax for MaskFormer, sigmoid for PFT — is the criterion's business).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ops.losses import batch_mask_costs
from ops.point_sampling import point_sample

Indices = list[tuple[Tensor, Tensor]]


class HungarianMatcher(nn.Module):
    """``forward(outputs, targets) -> [(pred_idx int64[n], tgt_idx int64[n]) per image]``.

    ``outputs``: ``{"pred_logits": B×Q×(K+1), "pred_masks": B×Q×h×w}`` (any float dtype);
    ``targets``: list of ``{"labels": int64[n], "masks": bool[n, H, W]}``. Index tensors
    are on the CPU; ``pred_idx`` is sorted.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_focal: float = 20.0,
        cost_dice: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        num_points: int = 0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_focal == 0 and cost_dice == 0:
            raise ValueError("model.matcher: all costs are 0, nothing to match on")
        if num_points < 0:
            raise ValueError(f"model.matcher.num_points must be >= 0 (0 = whole masks), got {num_points}")
        self.num_points = num_points
        self.cost_class = cost_class
        self.cost_focal = cost_focal
        self.cost_dice = cost_dice
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, masks: Tensor, labels: Tensor, target_masks: Tensor) -> Tensor:
        """Q×n float32 cost for one image (``logits`` Q×(K+1), ``masks`` Q×h×w logits)."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            prob = logits.float().softmax(-1)
            # -p_i(c_j): the constant 1 of the NLL's linear stand-in is dropped (DETR).
            cost = -self.cost_class * prob[:, labels]
            out_masks = masks.float()
            tgt = target_masks.to(device=out_masks.device, dtype=torch.float32)[:, None]
            if self.num_points:
                # One set of points for all queries and targets of the image, so every
                # pair is compared at the same places (Mask2Former).
                points = torch.rand(1, self.num_points, 2, device=out_masks.device)
                tgt = point_sample(tgt, points.expand(tgt.shape[0], -1, -1))[:, 0]
                out_masks = point_sample(out_masks[:, None], points.expand(out_masks.shape[0], -1, -1))[:, 0]
            else:
                tgt = F.interpolate(tgt, size=out_masks.shape[-2:], mode="nearest")[:, 0]
            focal, dice = batch_mask_costs(
                out_masks, tgt, self.focal_alpha, self.focal_gamma, focal=bool(self.cost_focal), dice=bool(self.cost_dice)
            )
            if focal is not None:
                cost = cost + self.cost_focal * focal
            if dice is not None:
                cost = cost + self.cost_dice * dice
            return cost

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> Indices:
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"HungarianMatcher: {logits.shape[0]} images but {len(targets)} targets")
        indices: Indices = []
        for b, target in enumerate(targets):
            labels = target["labels"].to(logits.device)
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits[b], masks[b], labels, target["masks"]).cpu()
            if not torch.isfinite(cost).all():
                # scipy would fail with "matrix contains invalid numeric entries".
                raise FloatingPointError("HungarianMatcher: non-finite matching cost (the model outputs diverged)")
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


class FixedMatcher(nn.Module):
    """PFT's fixed assignment: query i predicts class i, so it is matched to the target
    mask labelled i when the image has one and left unmatched (class target 0) otherwise.
    Reads only ``pred_logits.shape[:2]`` (B×K, one query per class).

    Same interface and output as ``HungarianMatcher`` (``pred_idx`` = the labels, sorted),
    so ``SetCriterion`` needs no special case. Semantic targets hold at most one mask per
    class; a repeated label has no query to go to and is rejected.
    """

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> Indices:
        logits = outputs["pred_logits"]
        num_queries = logits.shape[1]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"FixedMatcher: {logits.shape[0]} images but {len(targets)} targets")
        indices: Indices = []
        for target in targets:
            labels = target["labels"].detach().to("cpu", torch.int64)
            if labels.numel() and (labels.min() < 0 or labels.max() >= num_queries):
                raise ValueError(
                    f"FixedMatcher: label {int(labels.max())} has no query (one query per class, {num_queries} queries)"
                )
            if labels.unique().numel() != labels.numel():
                raise ValueError("FixedMatcher: a class has several target masks in one image; PFT needs one per class")
            rows, cols = labels.sort()
            indices.append((rows, cols))
        return indices
