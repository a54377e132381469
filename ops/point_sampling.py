"""Point sampling for mask losses (PointRend / Mask2Former): compare masks at a few points.

Mask2Former computes its mask losses not on full-resolution masks but at ``num_points``
points per mask (12,544 = 112²), most of them where the prediction is least certain
("importance sampling"). Memory then no longer grows with the image size, and the loss
concentrates on the boundaries where the masks are still wrong.

- ``point_sample``: bilinear values of N×C×H×W maps at N×P normalised points in [0, 1]².
- ``calculate_uncertainty``: ``-|logit|`` — highest (0) on the decision boundary.
- ``get_uncertain_point_coords_with_randomness``: draw ``oversample_ratio × num_points``
  uniform candidates, keep the ``importance_sample_ratio`` share with the highest
  uncertainty, fill the rest with fresh uniform points (so no region is starved).

Coordinates are (x, y) in [0, 1] with (0, 0) the top-left *corner* of the map (not a
pixel centre), as ``grid_sample(align_corners=False)`` reads them. Pure functions; this
module imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(input: Tensor, point_coords: Tensor, align_corners: bool = False) -> Tensor:
    """Bilinear samples of ``input`` (N×C×H×W) at ``point_coords`` (N×P×2, or N×Hg×Wg×2) in [0, 1]².

    Returns N×C×P (or N×C×Hg×Wg). A thin wrapper over ``grid_sample``, which wants
    coordinates in [-1, 1]. Outside the map the value is 0 (zero padding).
    """
    if input.dim() != 4:
        raise ValueError(f"point_sample: input must be N×C×H×W, got shape {tuple(input.shape)}")
    flat = point_coords.dim() == 3
    grid = point_coords.unsqueeze(2) if flat else point_coords
    # grid_sample needs one dtype; masks may be bool/bf16 targets with fp32 points.
    output = F.grid_sample(input.to(grid.dtype), 2.0 * grid - 1.0, mode="bilinear", align_corners=align_corners)
    return output.squeeze(3) if flat else output


def calculate_uncertainty(logits: Tensor) -> Tensor:
    """``-|logits|`` of N×1×… class-agnostic mask logits: 0 on the boundary, negative elsewhere."""
    if logits.shape[1] != 1:
        raise ValueError(f"calculate_uncertainty: expects one channel (N×1×…), got shape {tuple(logits.shape)}")
    return -torch.abs(logits.clone())


def get_uncertain_point_coords_with_randomness(
    coarse_logits: Tensor,
    uncertainty_func: Callable[[Tensor], Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> Tensor:
    """N×``num_points``×2 point coordinates in [0, 1]², biased towards uncertain regions.

    ``coarse_logits``: N×C×H×W (C = 1 for class-agnostic masks); ``uncertainty_func``
    maps sampled N×C×P logits to N×1×P uncertainties (higher = less certain). Of the
    ``num_points``, ``int(importance_sample_ratio * num_points)`` are the most uncertain of
    ``int(oversample_ratio * num_points)`` uniform candidates; the rest are uniform.
    """
    if num_points < 1:
        raise ValueError(f"model.loss.num_points must be >= 1 for point sampling, got {num_points}")
    if oversample_ratio < 1:
        raise ValueError(f"model.loss.oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"model.loss.importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    num_boxes = coarse_logits.shape[0]
    device = coarse_logits.device
    num_sampled = int(num_points * oversample_ratio)
    point_coords = torch.rand(num_boxes, num_sampled, 2, device=device)
    point_logits = point_sample(coarse_logits.float(), point_coords, align_corners=False)
    # Uncertainty of the *sampled* values, not of the coarse map: with bilinear
    # interpolation the two differ, and only the former ranks the candidates.
    point_uncertainties = uncertainty_func(point_logits)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(point_uncertainties[:, 0, :], k=num_uncertain, dim=1)[1]
    shift = num_sampled * torch.arange(num_boxes, dtype=torch.long, device=device)
    idx = idx + shift[:, None]
    point_coords = point_coords.view(-1, 2)[idx.view(-1), :].view(num_boxes, num_uncertain, 2)
    if num_random > 0:
        random = torch.rand(num_boxes, num_random, 2, device=device)
        point_coords = torch.cat([point_coords, random], dim=1)
    return point_coords
