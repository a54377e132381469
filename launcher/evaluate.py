"""Semantic-segmentation evaluation: one dataset-wide confusion matrix -> mIoU.

The confusion matrix is accumulated over every pixel of every image (not averaged per
image), so mIoU is the dataset-level number papers report. Under distributed evaluation
each rank accumulates its own share of the images and the matrices are summed once at
the end, so ranks with different image counts never wait on each other mid-loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from model.inference import semantic_segmentation


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # int64: a 640^2 dataset of 2k images already overflows int32 cells.
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``prediction`` and ``target`` are integer label maps of one shape."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}")
        target = target.reshape(-1).to(torch.int64)
        prediction = prediction.reshape(-1).to(torch.int64)
        valid = target != self.ignore_index
        target, prediction = target[valid], prediction[valid]
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(
                f"target label {int(target.max())} outside [0, {self.num_classes}) and not the ignore index "
                f"{self.ignore_index}"
            )
        index = target * self.num_classes + prediction
        self.matrix += torch.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, -1)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def results(self) -> dict:
        m = self.matrix.double()
        true_positive = m.diag()
        per_target = m.sum(1)  # ground-truth pixels per class
        per_prediction = m.sum(0)
        union = per_target + per_prediction - true_positive
        present = per_target > 0  # classes absent from the ground truth don't count (as in mmseg)
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.zeros_like(union))
        accuracy = torch.where(per_target > 0, true_positive / per_target.clamp(min=1), torch.zeros_like(union))
        total = m.sum()
        return {
            "miou": float(iou[present].mean()) if present.any() else 0.0,
            "pixel_accuracy": float(true_positive.sum() / total) if total > 0 else 0.0,
            "mean_accuracy": float(accuracy[present].mean()) if present.any() else 0.0,
            "per_class_iou": [float(v) if p else None for v, p in zip(iou, present)],
            "pixels": int(total),
        }


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], num_classes: int, ignore_index: int = 255,
             autocast_dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> ConfusionMatrix:
    """Run ``model`` over ``batches`` and return the (this rank's) confusion matrix."""
    matrix = ConfusionMatrix(num_classes, ignore_index)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        for batch in batches:
            images = batch["images"].to(device)
            with autocast:
                outputs = model(images)
            prediction = semantic_segmentation(outputs, images.shape[-2:])
            matrix.update(prediction.cpu(), batch["semantic"])
    finally:
        model.train(was_training)
    return matrix
