"""Training batches become model input on the training device: :func:`prepare_batch`.

A training batch from ``build_train_loader`` holds decoded samples (uint8 ``H x W x 3``
images and label maps at their own sizes) and each sample's :class:`AugmentPlan`, drawn
in the loader worker. Here, on the device the model runs on, each sample is resized,
cropped and flipped by its plan, the batch gets its photometric distortion in one
elementwise pass, and MaskFormer's targets (one binary mask per class present) are built
for the whole batch at once.

Why here and not in the loader worker: a worker's time per sample is then little more
than decoding (the decode-bound limit), and per-class masks — about 20 MB of bool per
512² sample at ADE20K's class counts — are never built on a CPU, pickled between
processes and copied to the device; on a GPU all of this costs well under a millisecond
per batch. The result is the same function of (seed, epoch, rank, worker, position) as
before, so exact resume holds.
"""

from __future__ import annotations

from typing import Any

import torch

from data_pipeline.augment_plan import AugmentPlan
from data_pipeline.photometric import apply_photometric
from data_pipeline.transforms import apply_geometry, common_label_dtype, padding_mask, reduce_zero_label


def semantic_targets(semantic: torch.Tensor, ignore_index: int = 255) -> list[dict[str, torch.Tensor]]:
    """MaskFormer's semantic targets of a ``B x H x W`` label batch, built in one pass:
    per image ``{"labels": int64[n] ascending, "masks": bool[n, H, W]}``, one mask per
    class present (ignore excluded) — what ``transforms.semantic_to_targets`` gives per image."""
    if semantic.ndim != 3:
        raise ValueError(f"semantic must be B x H x W, got shape {tuple(semantic.shape)}")
    batch = semantic.shape[0]
    flat = semantic.reshape(batch, -1).long()
    width = max(int(flat.max()) + 1 if flat.numel() else 1, ignore_index + 1)
    # Which (image, class) pairs occur: one bincount over class ids offset per image.
    offsets = torch.arange(batch, device=semantic.device).view(-1, 1) * width
    present = torch.bincount((flat + offsets).view(-1), minlength=batch * width).view(batch, width) > 0
    present[:, ignore_index] = False
    image_of, labels = present.nonzero(as_tuple=True)  # row-major: per image, classes ascending
    masks = semantic[image_of] == labels.to(semantic.dtype).view(-1, 1, 1)
    counts = present.sum(1).tolist()
    return [{"labels": ids, "masks": m} for ids, m in zip(labels.split(counts), masks.split(counts))]


def panoptic_targets(panoptic: torch.Tensor, segments: list[list[dict]]) -> list[dict[str, torch.Tensor]]:
    """Panoptic targets of a ``B x H x W`` id batch (0 = void) and each image's segments
    (``id``, ``category_id`` = training class, ``iscrowd``): per image ``{"labels": int64[n],
    "masks": bool[n, H, W]}``, one mask per non-crowd segment with pixels left in the crop,
    in segment order — what ``transforms.panoptic_to_targets`` gives per image. Crowd and
    void pixels belong to no mask."""
    if panoptic.ndim != 3 or panoptic.shape[0] != len(segments):
        raise ValueError(f"panoptic must be B x H x W with B = {len(segments)}, got shape {tuple(panoptic.shape)}")
    targets = []
    for ids, segs in zip(panoptic, segments):
        kept = [s for s in segs if not s.get("iscrowd", 0) and int(s["id"]) != 0]
        seg_ids = torch.tensor([int(s["id"]) for s in kept], dtype=ids.dtype, device=ids.device)
        labels = torch.tensor([int(s["category_id"]) for s in kept], dtype=torch.int64, device=ids.device)
        masks = ids[None] == seg_ids.view(-1, 1, 1)
        present = masks.flatten(1).any(1)  # a segment cropped away gets no target
        targets.append({"labels": labels[present], "masks": masks[present]})
    return targets


def _crops(images: list[torch.Tensor], semantic: list[torch.Tensor], plans: list[AugmentPlan], device: torch.device,
           panoptic: list[torch.Tensor] | None) -> list:  # fmt: skip
    crops = []
    for i, (image, labels, plan) in enumerate(zip(images, semantic, plans)):
        image = image.to(device, non_blocking=True).permute(2, 0, 1)  # H x W x 3 -> 3 x H x W view
        labels = labels.to(device, non_blocking=True)
        if plan.reduce_zero_label:
            labels = reduce_zero_label(labels, plan.ignore_index)
        ids = panoptic[i].to(device, non_blocking=True) if panoptic is not None else None
        crops.append(apply_geometry(image, labels, plan, ids))
    return crops


def augment_batch(
    images: list[torch.Tensor],
    semantic: list[torch.Tensor],
    plans: list[AugmentPlan],
    device: torch.device,
    panoptic: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Apply each sample's plan on ``device``: uint8 ``B x 3 x crop x crop`` images and
    ``B x crop x crop`` labels (padding: image 0, labels ignore); with ``panoptic`` (id
    maps, 0 = void) also their ``B x crop x crop`` crops, by the same geometry (nearest)."""
    crops = _crops(images, semantic, plans, device, panoptic)
    dtype = common_label_dtype([c.semantic for c in crops])
    out_images = torch.stack([c.image for c in crops])
    out_labels = torch.stack([c.semantic.to(dtype) for c in crops])
    params = [plan.photometric for plan in plans]
    if any(p is not None for p in params):
        out_images = apply_photometric(out_images, params)
        # detectron2 and mmseg pad after the colour jitter, so padded pixels stay 0.
        mask = padding_mask(
            [c.valid_h for c in crops],
            [c.valid_w for c in crops],
            [p.flip for p in plans],
            plans[0].crop_size,
            device,
        )
        out_images = out_images * mask
    if panoptic is not None:
        return out_images, out_labels, torch.stack([c.panoptic for c in crops])
    return out_images, out_labels


def prepare_batch(batch: dict[str, Any], device: torch.device | str) -> tuple[torch.Tensor, list[dict]]:
    """A training batch -> (uint8 ``B x 3 x crop x crop`` images, the criterion's targets),
    all on ``device``. Targets: one ``{"labels": int64[n], "masks": bool[n, crop, crop]}``
    per image (padding and ignored pixels belong to no mask): one per class present, or
    with ``data.task=panoptic`` (the batch has ``panoptic`` and ``segments``) one per
    non-crowd segment (:func:`panoptic_targets`)."""
    plans = batch["plans"]
    if "panoptic" in batch:
        images, _, ids = augment_batch(batch["images"], batch["semantic"], plans, torch.device(device),
                                       batch["panoptic"])
        return images, panoptic_targets(ids, batch["segments"])
    images, semantic = augment_batch(batch["images"], batch["semantic"], plans, torch.device(device))
    return images, semantic_targets(semantic, plans[0].ignore_index)
