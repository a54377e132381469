"""The loss's share of ``launcher describe``'s memory estimate: the real criterion run on
stand-in predictions at two small sizes, its saved tensors added up and extrapolated
linearly in pixels (the full-resolution mask losses grow with H×W), for an assumed number
of ground-truth masks per image.
"""

from __future__ import annotations

import torch

from launcher.saved_tensors import SavedTensors
from model.build import build_criterion
from model.config import ModelConfig

# Ground-truth masks (classes present) per training crop assumed for the loss estimate;
# ADE20K images hold about 8-9 classes on average, crops fewer.
MASKS_PER_IMAGE = 10
# Side lengths (of the predicted masks) of the two small loss measurements.
_LOSS_SIDES = (8, 16)


def _stand_ins(value, key: str, side: int, generator: torch.Generator, leaves: list):
    """Real random tensors in the structure of the (fake) model ``value``: ``pred_masks``
    at ``side``², everything else at its own shape (class logits, boxes, ...)."""
    if isinstance(value, dict):
        return {k: _stand_ins(v, k, side, generator, leaves) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        # The per-scale mask features (MaskFormer's one, PFT's four): the finest side², the
        # coarser ones in proportion.
        sides = [max(1, side * v.shape[-1] // value[0].shape[-1]) if key == "mask_features" else side for v in value]
        return [_stand_ins(v, key, s, generator, leaves) for v, s in zip(value, sides)]
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    # Mask logits (Panoptic SegFormer's per-layer ones are "masks") and the mask features
    # they are a product of become side×side.
    resized = key in ("pred_masks", "masks", "mask_features")
    shape = (*value.shape[:2], side, side) if resized else tuple(value.shape)
    leaf = torch.randn(shape, generator=generator).to(value.dtype).requires_grad_()
    leaves.append(leaf)
    return leaf


def _loss_bytes_at(cfg: ModelConfig, outputs: dict, side: int, ratio: int, generator: torch.Generator,
                   masks_per_image: int) -> int:
    """Saved bytes of the criterion on stand-ins of ``outputs`` with ``side``² masks."""
    leaves: list[torch.Tensor] = []
    structured = _stand_ins(outputs, "", side, generator, leaves)
    # PFT in training forms no pred_masks; its B×K class logits give the same two numbers.
    batch, num_queries = structured["pred_masks" if "pred_masks" in structured else "pred_logits"].shape[:2]
    targets = _stand_in_targets(cfg, batch, min(masks_per_image, num_queries), side * ratio, generator)
    # The mask features are the model's, saved by its mask products: counted with the decoders.
    saved = SavedTensors(exclude=structured.get("mask_features", []))
    for leaf in leaves:  # the outputs stay alive until the backward pass
        saved.add(leaf)
    with saved.hooks():
        build_criterion(cfg)(structured, targets)
    return saved.total


def _stand_in_targets(cfg: ModelConfig, batch: int, masks: int, height: int,
                      generator: torch.Generator) -> list[dict]:
    num_masks = min(masks, cfg.num_classes)
    targets = []
    for _ in range(batch):
        # Disjoint masks, as in semantic segmentation: every pixel belongs to one of them.
        owner = torch.randint(num_masks, (height, height), generator=generator)
        labels = torch.randperm(cfg.num_classes, generator=generator)[:num_masks]
        targets.append({"labels": labels, "masks": owner[None] == torch.arange(num_masks)[:, None, None]})
    return targets


def _dense_loss_bytes(cfg: ModelConfig, outputs: dict, crop_size: int, masks_per_image: int) -> int:
    """Per-pixel models (UN-EPT: logit maps at the image size and at stride 8): criterion
    bytes measured on stand-ins for 64² and 128² images, extrapolated linearly in pixels."""
    generator = torch.Generator().manual_seed(0)
    sizes = []
    for side in (64, 128):
        stand_ins = {}
        for key, out in outputs.items():
            stride = max(1, round(crop_size / out.shape[-1]))
            shape = (*out.shape[:2], side // stride, side // stride)
            stand_ins[key] = torch.randn(shape, generator=generator).to(out.dtype).requires_grad_()
        saved = SavedTensors()
        for out in stand_ins.values():  # the outputs stay alive until the backward pass
            saved.add(out)
        targets = _stand_in_targets(cfg, out.shape[0], masks_per_image, side, generator)
        with saved.hooks():
            build_criterion(cfg)(stand_ins, targets)
        sizes.append(saved.total)
    per_pixel = (sizes[1] - sizes[0]) / (128**2 - 64**2)
    return int(sizes[0] - per_pixel * 64**2 + per_pixel * crop_size**2)


def measure_loss_activations(cfg: ModelConfig, outputs: dict, crop_size: int,
                             masks_per_image: int = MASKS_PER_IMAGE) -> int:
    """Criterion bytes at the crop size, extrapolated from two small sizes (linear in
    pixels), with ``masks_per_image`` ground-truth masks per image."""
    if "pred_masks" in outputs:
        mask_side = outputs["pred_masks"].shape[-1]
    elif "mask_features" in outputs:  # PFT in training: its masks as their factors, finest first
        mask_side = outputs["mask_features"][0].shape[-1]
    else:
        return _dense_loss_bytes(cfg, outputs, crop_size, masks_per_image)
    ratio = max(1, round(crop_size / mask_side))  # the masks' stride (4 for MaskFormer/PFT)
    generator = torch.Generator().manual_seed(0)
    small, large = _LOSS_SIDES
    sizes = [_loss_bytes_at(cfg, outputs, side, ratio, generator, masks_per_image) for side in _LOSS_SIDES]
    per_pixel = (sizes[1] - sizes[0]) / ((large * ratio) ** 2 - (small * ratio) ** 2)
    fixed = sizes[0] - per_pixel * (small * ratio) ** 2
    return int(fixed + per_pixel * crop_size**2)
