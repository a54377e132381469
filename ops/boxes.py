"""Boxes for Panoptic SegFormer's auxiliary detection head: boxes from masks and GIoU.

Boxes are normalised to [0, 1] of the image, either ``cxcywh`` (centre, size: what the
location decoder predicts, as in Deformable DETR) or ``xyxy`` (corners). A box derived
from a mask covers whole pixels: a mask whose pixels span columns 2..5 gives x1 = 2/W,
x2 = 6/W. Pure functions; this module imports nothing of ours.
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), -1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), -1)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """N×H×W masks (bool or 0/1) -> N×4 float32 ``cxcywh`` boxes normalised by (W, H).

    The box is the tightest one around the mask's pixels (pixel edges, not centres); an
    empty mask gives the all-zero box.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks_to_boxes expects N×H×W masks, got shape {tuple(masks.shape)}")
    n, height, width = masks.shape
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.float32, device=masks.device)
    masks = masks.bool()
    cols = masks.any(1)  # N×W
    rows = masks.any(2)  # N×H
    xs = torch.arange(width, device=masks.device)
    ys = torch.arange(height, device=masks.device)
    x1 = torch.where(cols, xs, width).amin(1)
    x2 = torch.where(cols, xs + 1, 0).amax(1)
    y1 = torch.where(rows, ys, height).amin(1)
    y2 = torch.where(rows, ys + 1, 0).amax(1)
    xyxy = torch.stack((x1, y1, x2, y2), -1).float()
    xyxy = xyxy / torch.tensor([width, height, width, height], dtype=torch.float32, device=masks.device)
    empty = ~cols.any(1)
    xyxy[empty] = 0.0
    return box_xyxy_to_cxcywh(xyxy)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of ``xyxy`` boxes, broadcast over leading dims (``a[:, None], b[None]`` for
    the pairwise N×M matrix, equal shapes for matched pairs). In [-1, 1]; fp32."""
    boxes1, boxes2 = boxes1.float(), boxes2.float()
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = area1 + area2 - inter
    iou = inter / union.clamp(min=1e-7)
    hull = torch.maximum(boxes1[..., 2:], boxes2[..., 2:]) - torch.minimum(boxes1[..., :2], boxes2[..., :2])
    hull_area = hull.clamp(min=0).prod(-1)
    return iou - (hull_area - union) / hull_area.clamp(min=1e-7)
