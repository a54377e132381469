"""UN-EPT's losses (seed 001, weights from the official ``UN_EPT.losses``), in fp32 under
any autocast:

    0.8 · CE(coarse logits) + 1 · CE(refined logits) + 5 · edge CE + 0.6 · direction CE

- semantic CEs: per-pixel K-way cross-entropy at the image size, ignore 255, mean over the
  non-ignored pixels of the batch;
- edge: 2-way cross-entropy on the edge head's (upsampled) logits against the boundary
  targets, with the official class balancing: class weight 1 − (its share of the batch's
  valid pixels), so the rare edge pixels weigh about 0.9 and the rest about 0.1;
- direction: 8-way cross-entropy on the ground-truth edge pixels, balanced the same way
  over the 8 bins. (The official code takes the pixels its edge head *predicts* as edges;
  on those off the true band it has SegFix's angle map, which these targets do not define.)

Targets: the train loop's per-image ``{"labels", "masks"}`` (MaskFormer's format, built
by ``data_pipeline.device_batch``); the label map is rebuilt from the disjoint masks on
the device (pixels in no mask: ignore), so the loader and the other models are untouched.
Boundary targets come from ``data_pipeline.boundary_targets`` on the same device. All
normalisers are tensors (no host synchronisation), and an empty set (no valid pixel, no
edge) gives a zero loss, not NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.boundary_targets import NUM_DIRECTIONS, boundary_targets
from model.unept_heads import UNEPT_STRIDE, upsample_to_image


def targets_to_semantic(
    targets: list[dict], size: tuple[int, int], ignore_index: int = 255, device: torch.device | None = None
) -> Tensor:
    """Per-image ``{"labels": int64[n], "masks": bool[n, H, W]}`` (disjoint masks) -> B×H×W
    int64 label map; pixels in no mask get ``ignore_index``."""
    maps = []
    for target in targets:
        masks, labels = target["masks"], target["labels"]
        if masks.shape[-2:] != tuple(size):
            raise ValueError(f"target masks are {tuple(masks.shape[-2:])}, the predictions {tuple(size)}")
        semantic = torch.full(tuple(size), ignore_index, dtype=torch.long, device=device or masks.device)
        if masks.shape[0]:
            owner = masks.to(torch.uint8).argmax(0)  # the one mask a pixel is in
            semantic = torch.where(masks.any(0), labels.long()[owner], semantic)
        maps.append(semantic)
    return torch.stack(maps)


def weighted_cross_entropy(
    logits: Tensor, target: Tensor, ignore_index: int, balanced: bool = False
) -> Tensor:
    """Mean cross-entropy over the non-ignored pixels (fp32). ``balanced``: each pixel
    weighted by 1 − its class's share of the valid pixels (normalised by the weights' sum,
    as ``F.cross_entropy(weight=...)``). 0 when no pixel is valid."""
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    losses = F.cross_entropy(logits.float(), safe, reduction="none")
    weights = valid.float()
    if balanced:
        counts = torch.bincount(safe.flatten(), weights=weights.flatten(), minlength=logits.shape[1])
        share = counts / counts.sum().clamp_min(1.0)
        # A class alone in the batch keeps weight 1 (1 − share would zero the whole loss).
        class_weights = torch.where(share < 1.0, 1.0 - share, 1.0)
        weights = class_weights[safe] * weights
    return (losses * weights).sum() / weights.sum().clamp_min(1e-6)


class UNEPTCriterion(nn.Module):
    """``forward(outputs, targets) -> {"loss_ce", "loss_refined", "loss_edge", "loss_dir"}``
    (already weighted; the train loop sums them). ``outputs`` as ``UNEPT`` returns them."""

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        edge_radius: int = 5,
        coarse_weight: float = 0.8,
        refined_weight: float = 1.0,
        edge_weight: float = 5.0,
        direction_weight: float = 0.6,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.edge_radius = edge_radius
        self.coarse_weight = coarse_weight
        self.refined_weight = refined_weight
        self.edge_weight = edge_weight
        self.direction_weight = direction_weight

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        refined, coarse = outputs["sem_logits"], outputs["coarse_logits"]
        size = (refined.shape[-2], refined.shape[-1])
        with torch.autocast(device_type=refined.device.type, enabled=False):
            semantic = targets_to_semantic(targets, size, self.ignore_index, refined.device)
            edge, direction = boundary_targets(semantic, self.edge_radius, self.ignore_index)
            edge_logits = upsample_to_image(outputs["edge_logits"].float(), size, UNEPT_STRIDE)
            dir_logits = upsample_to_image(outputs["dir_logits"].float(), size, UNEPT_STRIDE)
            if dir_logits.shape[1] != NUM_DIRECTIONS:
                raise ValueError(f"dir_logits need {NUM_DIRECTIONS} channels, got {dir_logits.shape[1]}")
            ignore = self.ignore_index
            return {
                "loss_ce": self.coarse_weight * weighted_cross_entropy(coarse, semantic, ignore),
                "loss_refined": self.refined_weight * weighted_cross_entropy(refined, semantic, ignore),
                "loss_edge": self.edge_weight
                * weighted_cross_entropy(edge_logits, edge, ignore, balanced=True),
                "loss_dir": self.direction_weight
                * weighted_cross_entropy(dir_logits, direction, ignore, balanced=True),
            }
