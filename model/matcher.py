"""Hungarian matching of predictions to ground-truth masks (MaskFormer's ``HungarianMatcher``).

Per image, the cost of assigning query i to target j is

    cost_class * (-p_i(c_j)) + cost_focal * focal(m_i, t_j) + cost_dice * dice(m_i, t_j)

and ``scipy.optimize.linear_sum_assignment`` picks the one-to-one assignment of least
total cost (every target gets a query when Q >= number of targets).

As in MaskFormer's memory-efficient matcher, the targets are downsampled (nearest) to the
prediction resolution (H/4) rather than the predictions upsampled: the cost is only a
ranking, and this keeps it O(Q·HW/16). The losses on the matched pairs are then computed at
full resolution by the criterion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ops.losses import batch_dice_loss, batch_sigmoid_focal_loss

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
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_focal == 0 and cost_dice == 0:
            raise ValueError("model.matcher: all costs are 0, nothing to match on")
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
            tgt = F.interpolate(tgt, size=out_masks.shape[-2:], mode="nearest")[:, 0]
            if self.cost_focal:
                cost = cost + self.cost_focal * batch_sigmoid_focal_loss(
                    out_masks, tgt, alpha=self.focal_alpha, gamma=self.focal_gamma
                )
            if self.cost_dice:
                cost = cost + self.cost_dice * batch_dice_loss(out_masks, tgt)
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
