"""Semantic-segmentation evaluation: one dataset-wide confusion matrix -> mIoU.

The confusion matrix is accumulated over every pixel of every image (not averaged per
image), so mIoU is the dataset-level number papers report. Under distributed evaluation
each rank accumulates its own share of the images and the matrices are summed once at
the end, so ranks with different image counts never wait on each other mid-loop.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from data_pipeline.loader import build_eval_loader
from data_pipeline.manifest import load_manifest
from launcher.config import RunConfig
from launcher.deepspeed_config import autocast_dtype
from model.config import InferenceConfig
from model.inference import Rule
from model.tta import collective_device, max_across_ranks, predict_semantic_scores


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
            matrix = self.matrix.to(collective_device())
            dist.all_reduce(matrix, op=dist.ReduceOp.SUM)
            self.matrix = matrix.cpu()

    def results(self) -> dict:
        m = self.matrix.double()
        true_positive = m.diag()
        per_target = m.sum(1)  # ground-truth pixels per class
        per_prediction = m.sum(0)
        union = per_target + per_prediction - true_positive
        # As detectron2's SemSegEvaluator (which MaskFormer reports with) and mmseg: a class
        # counts when it occurs in the ground truth or the prediction, so predicting a class
        # that is absent costs an IoU of 0; classes in neither are left out.
        present = union > 0
        iou = torch.where(present, true_positive / union.clamp(min=1), torch.zeros_like(union))
        has_target = per_target > 0
        accuracy = torch.where(has_target, true_positive / per_target.clamp(min=1), torch.zeros_like(union))
        total = m.sum()
        return {
            "miou": float(iou[present].mean()) if present.any() else 0.0,
            "pixel_accuracy": float(true_positive.sum() / total) if total > 0 else 0.0,
            "mean_accuracy": float(accuracy[has_target].mean()) if has_target.any() else 0.0,
            "per_class_iou": [float(v) if p else None for v, p in zip(iou, present)],
            "pixels": int(total),
        }


def in_lockstep(batches: Iterable[dict]) -> Iterator[tuple[dict, bool]]:
    """Yield ``(batch, is_real)`` so every rank runs the same number of forward passes.

    Under ZeRO-3 each forward all-gathers the parameters, so a rank that runs out of
    validation images early must keep joining the gathers or the others wait forever.
    It repeats its last batch (``is_real=False``, not counted) until every rank is done.
    """
    iterator = iter(batches)
    last = None
    while True:
        batch = next(iterator, None)
        if not max_across_ranks(0 if batch is None else 1):  # does any rank have a batch left?
            return
        if batch is not None:
            last = batch
            yield batch, True
        elif last is not None:
            yield last, False
        else:  # this rank had no images at all: a blank one of the other ranks' size is unknown
            raise RuntimeError("a rank got no validation images; use at least as many images as workers")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], num_classes: int, ignore_index: int = 255,
             autocast_dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             lockstep: bool = False, inference: InferenceConfig | None = None,
             rule: Rule = "maskformer") -> ConfusionMatrix:
    """Run ``model`` over ``batches`` and return the (this rank's) confusion matrix.

    Predictions follow ``inference`` (``model.inference``: test size, sliding window,
    scales, flip; default: whole image, one scale) and the semantic ``rule``
    (``model.name``). A batch padded to its largest image (``batch["image_sizes"]``, as the
    eval loader gives) is predicted image by image at each image's own size, so a
    prediction never depends on its batch mates; padded pixels are labelled ignore.
    ``lockstep`` (needed under ZeRO-3) keeps every rank's forward count equal, across
    batches and across the windows/scales inside a batch.
    """
    inference = inference if inference is not None else InferenceConfig()
    matrix = ConfusionMatrix(num_classes, ignore_index)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    stream = in_lockstep(batches) if lockstep else ((batch, True) for batch in batches)
    try:
        for batch, is_real in stream:
            images = batch["images"].to(device)
            with autocast:
                scores = predict_semantic_scores(model, images, inference, rule,
                                                 image_sizes=batch.get("image_sizes"), sync_passes=lockstep)
            if scores.shape[1] != num_classes:
                raise ValueError(f"the model predicts {scores.shape[1]} classes but model.num_classes is {num_classes}")
            if is_real:
                matrix.update(scores.argmax(1).cpu(), batch["semantic"])
    finally:
        model.train(was_training)
    return matrix


def with_progress(batches: Iterable[dict], total: int, desc: str) -> Iterator[dict]:
    """``batches`` with a progress bar of images on a terminal (stderr), for the
    single-process commands: an ADE20K validation takes many minutes on a CPU."""
    with tqdm(total=total, desc=desc, unit="image", disable=not sys.stderr.isatty(), file=sys.stderr) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch["images"]))


def validation_batches(cfg: RunConfig, desc: str, limit: int | None = None) -> Iterator[dict]:
    """The whole validation set in one process, with progress; ``limit``: the number of
    images the caller will take (the bar's total), it stops reading on its own."""
    total = load_manifest(cfg.data.val_manifest).num_samples
    return with_progress(build_eval_loader(cfg.data, 0, 1), total if limit is None else min(total, limit), desc)


def evaluate_on_validation(cfg: RunConfig, model: nn.Module) -> dict:
    """Single-process evaluation of ``model`` on ``data.val_manifest`` (eval, demo)."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    matrix = evaluate(model, validation_batches(cfg, "eval"), cfg.model.num_classes, cfg.data.ignore_index,
                      autocast_dtype=autocast_dtype(cfg.train), inference=cfg.model.inference,
                      rule=cfg.model.name)
    return matrix.results()
