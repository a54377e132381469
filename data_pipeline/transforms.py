"""Training augmentation and MaskFormer target construction, on torch tensors.

Images are uint8 ``3 x H x W`` RGB (the model normalises), label maps integer ``H x W``
(uint8 from the loader, any integer dtype here) with ``ignore_index`` (255) for
unlabelled pixels, panoptic id maps int64 ``H x W`` with 0 = void.

The MaskFormer/Mask2Former ADE20K training recipe is split in two: its random draws
(``data_pipeline.augment_plan.plan_sample``, in the loader worker) and their application
(:func:`apply_geometry` here, then ``data_pipeline.photometric``). Applying runs on any
device; training applies whole batches on the training device
(``data_pipeline.device_batch``). :func:`augment_sample` is the two in one call, for a
single sample. :func:`random_crop_pad` / :func:`random_hflip` are the older crop + flip path.
"""

from __future__ import annotations

from typing import NamedTuple, overload

import torch
import torch.nn.functional as F

from data_pipeline.augment_config import AugmentConfig
from data_pipeline.augment_plan import AugmentPlan, plan_sample
from data_pipeline.photometric import apply_photometric


def random_hflip(
    image: torch.Tensor, semantic: torch.Tensor, generator: torch.Generator, p: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip image and labels left-right together with probability ``p``."""
    if torch.rand((), generator=generator).item() < p:
        return image.flip(-1), semantic.flip(-1)
    return image, semantic


def pad_to(
    image: torch.Tensor, semantic: torch.Tensor, height: int, width: int, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right to at least ``height`` x ``width``: image with 0, labels with ignore.

    Padding with the ignore label means padded pixels cost nothing in the loss and count
    nowhere in the metrics.
    """
    pad_h, pad_w = max(0, height - image.shape[-2]), max(0, width - image.shape[-1])
    if pad_h == 0 and pad_w == 0:
        return image, semantic
    image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
    semantic = F.pad(semantic, (0, pad_w, 0, pad_h), value=ignore_index)
    return image, semantic


def random_crop_pad(
    image: torch.Tensor,
    semantic: torch.Tensor,
    crop_size: int,
    generator: torch.Generator,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``crop_size`` x ``crop_size`` window: pad a short side, then crop at a random offset."""
    if crop_size < 1:
        raise ValueError(f"crop_size must be >= 1, got {crop_size}")
    image, semantic = pad_to(image, semantic, crop_size, crop_size, ignore_index)
    height, width = semantic.shape
    top = int(torch.randint(0, height - crop_size + 1, (), generator=generator))
    left = int(torch.randint(0, width - crop_size + 1, (), generator=generator))
    return (
        image[..., top : top + crop_size, left : left + crop_size],
        semantic[top : top + crop_size, left : left + crop_size],
    )


def reduce_zero_label(labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """ADE20K convention: 0 ("other") -> ``ignore_index``, every other label - 1.

    Pixels already at ``ignore_index`` stay ignored (mmseg: 0 -> 255, -1, 254 -> 255).
    """
    ignored = (labels == 0) | (labels == ignore_index)
    return (labels - 1).masked_fill_(ignored, ignore_index)


def common_label_dtype(maps: list[torch.Tensor]) -> torch.dtype:
    """The dtype label maps of mixed widths stack in (uint8 unless some map needs more)."""
    dtype = maps[0].dtype
    for labels in maps[1:]:
        dtype = torch.promote_types(dtype, labels.dtype)
    return dtype


def semantic_to_targets(semantic: torch.Tensor, ignore_index: int = 255) -> dict[str, torch.Tensor]:
    """MaskFormer's semantic targets of one label map: one binary mask per class present
    (ignore excluded). Training builds them batched on its device instead
    (``data_pipeline.device_batch.semantic_targets``, the same result).

    Returns ``{"labels": int64[n], "masks": bool[n, H, W]}`` with labels sorted ascending;
    ``n`` is 0 for an image that is all ignore.
    """
    if semantic.ndim != 2:
        raise ValueError(f"semantic must be H x W, got shape {tuple(semantic.shape)}")
    labels = torch.unique(semantic)  # sorted
    labels = labels[labels != ignore_index]
    masks = semantic.unsqueeze(0) == labels.view(-1, 1, 1)
    return {"labels": labels.to(torch.int64), "masks": masks}


def panoptic_to_targets(
    panoptic_ids: torch.Tensor, segments: list[dict], ignore_index: int = 255
) -> dict[str, torch.Tensor]:
    """MaskFormer's panoptic targets: one binary mask per non-crowd segment present.

    ``panoptic_ids`` is an int64 ``H x W`` map of segment ids (0 = void); ``segments`` the
    COCO-panoptic ``segments_info`` entries (``id``, ``category_id``, ``iscrowd``). Crowd
    segments, void (id 0, or ``category_id == ignore_index``) and segments with no pixel
    left (e.g. cropped away) are skipped. Returns ``{"labels": int64[n], "masks":
    bool[n, H, W]}`` in ``segments`` order, labels being the category ids.
    """
    if panoptic_ids.ndim != 2:
        raise ValueError(f"panoptic_ids must be H x W, got shape {tuple(panoptic_ids.shape)}")
    labels: list[int] = []
    masks: list[torch.Tensor] = []
    for seg in segments:
        seg_id, category = int(seg["id"]), int(seg["category_id"])
        if seg.get("iscrowd", 0) or seg_id == 0 or category == ignore_index:
            continue
        mask = panoptic_ids == seg_id
        if bool(mask.any()):
            labels.append(category)
            masks.append(mask)
    height, width = panoptic_ids.shape
    if not masks:
        return {
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, height, width, dtype=torch.bool),
        }
    return {"labels": torch.tensor(labels, dtype=torch.int64), "masks": torch.stack(masks)}


# ---------------------------------------------------------------- the MaskFormer recipe


def _nearest_index(size_in: int, size_out: int, device: torch.device | None = None) -> torch.Tensor:
    # Pixel-centre nearest neighbour (PIL NEAREST, torch "nearest-exact"), the same
    # half-pixel convention as bilinear with align_corners=False, so labels stay aligned.
    idx = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * (size_in / size_out)).floor()
    return idx.clamp_(max=size_in - 1).to(device=device, dtype=torch.int64)


def resize_labels(labels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Nearest-neighbour resize of an integer ``H x W`` map by indexing: values are only
    ever copied (never interpolated), for any dtype and any id range."""
    if labels.shape[-2:] == (height, width):
        return labels
    rows = _nearest_index(labels.shape[-2], height, labels.device)
    cols = _nearest_index(labels.shape[-1], width, labels.device)
    # Two index_selects: several times faster than one broadcast advanced index.
    return labels.index_select(-2, rows).index_select(-1, cols)


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of a uint8 ``C x H x W`` image (antialiased when shrinking).

    On CPU it runs on the uint8 tensor directly: torch's uint8 bilinear kernels are ~6x
    faster than a float round trip, and round to nearest as that would (within 1 level).
    Other devices have no uint8 kernels: there the float round trip is the way.
    """
    if image.shape[-2:] == (height, width):
        return image
    shrinking = height < image.shape[-2] or width < image.shape[-1]
    # torch's uint8 antialiased kernel fails an internal assert for a 1 x 1 output of a
    # larger input (torch 2.13): that one shape takes the float round trip.
    tiny = shrinking and (height, width) == (1, 1) and image.dtype == torch.uint8
    if (image.device.type == "cpu" and not tiny) or image.dtype != torch.uint8:
        return F.interpolate(
            image.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking
        )[0]
    return resize_image_float(image, height, width)


def resize_image_float(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """:func:`resize_image` through float32, rounded back to uint8 (within 1 level of the
    CPU's uint8 kernel)."""
    shrinking = height < image.shape[-2] or width < image.shape[-1]
    out = F.interpolate(image.unsqueeze(0).float(), size=(height, width), mode="bilinear", align_corners=False,
                        antialias=shrinking)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def category_area_ok(crop: torch.Tensor, cat_max_ratio: float, ignore_index: int = 255) -> bool:
    """detectron2/mmseg's acceptance test: more than one category among the labelled
    (non-ignore) pixels, and the largest covers less than ``cat_max_ratio`` of them."""
    # bincount over the label values: several times faster than torch.unique here, and
    # this runs up to 10 times per training sample.
    counts = torch.bincount(crop.reshape(-1))
    if ignore_index < counts.numel():
        counts[ignore_index] = 0
    counts = counts[counts > 0]
    return counts.numel() > 1 and int(counts.max()) < cat_max_ratio * int(counts.sum())


def choose_crop(
    semantic: torch.Tensor,
    offsets: tuple[tuple[int, int], ...],
    crop_size: int,
    cat_max_ratio: float = 0.75,
    ignore_index: int = 255,
) -> tuple[int, int]:
    """detectron2's ``RandomCrop_CategoryAreaConstraint`` over drawn windows
    (``augment_plan.draw_crop_offsets``): the first window of ``semantic`` that passes
    :func:`category_area_ok`, else the last."""
    if len(offsets) > 1:
        for top, left in offsets:
            window = semantic[top : top + crop_size, left : left + crop_size]
            if category_area_ok(window, cat_max_ratio, ignore_index):
                return top, left
    return offsets[-1]


class Crop(NamedTuple):
    """One sample after :func:`apply_geometry`."""

    image: torch.Tensor  # uint8 3 x crop x crop
    semantic: torch.Tensor  # crop x crop, the input's dtype
    panoptic: torch.Tensor | None
    valid_h: int  # rows of real pixels (from the top); the rest is padding
    valid_w: int  # columns of real pixels (from the left, from the right if flipped)


def apply_geometry(
    image: torch.Tensor, semantic: torch.Tensor, plan: AugmentPlan, panoptic: torch.Tensor | None = None
) -> Crop:
    """Resize (image bilinear, labels nearest) to the plan's size, pad bottom/right to the
    crop (image 0, labels ignore, panoptic 0 = void), take the first acceptable of the
    plan's windows, flip if planned. Outputs are contiguous, on the input's device."""
    crop = plan.crop_size
    image = resize_image(image, plan.height, plan.width)
    semantic = resize_labels(semantic, plan.height, plan.width)
    image, semantic = pad_to(image, semantic, crop, crop, plan.ignore_index)
    if panoptic is not None:
        panoptic = resize_labels(panoptic, plan.height, plan.width)
        pad_h, pad_w = semantic.shape[0] - panoptic.shape[0], semantic.shape[1] - panoptic.shape[1]
        panoptic = F.pad(panoptic, (0, pad_w, 0, pad_h), value=0)
    top, left = choose_crop(semantic, plan.offsets, crop, plan.cat_max_ratio, plan.ignore_index)
    window = (slice(top, top + crop), slice(left, left + crop))
    image, semantic = image[(..., *window)], semantic[window]
    panoptic = panoptic[window] if panoptic is not None else None
    if plan.flip:
        image, semantic = image.flip(-1), semantic.flip(-1)
        panoptic = panoptic.flip(-1) if panoptic is not None else None
    return Crop(image.contiguous(), semantic.contiguous(), panoptic.contiguous() if panoptic is not None else None,
                min(crop, plan.height - top), min(crop, plan.width - left))


def padding_mask(
    valid_h: list[int], valid_w: list[int], flips: list[bool], crop_size: int, device: torch.device
) -> torch.Tensor:
    """B x 1 x crop x crop, True on each crop's real pixels (``Crop.valid_h/valid_w``,
    mirrored when flipped) and False on its padding."""
    rows = torch.arange(crop_size, device=device).view(1, 1, -1, 1)
    cols = torch.arange(crop_size, device=device).view(1, 1, 1, -1)
    flipped = torch.tensor(flips, device=device).view(-1, 1, 1, 1)
    cols = torch.where(flipped, crop_size - 1 - cols, cols)  # a flip moves the padding to the left
    return (rows < torch.tensor(valid_h, device=device).view(-1, 1, 1, 1)) & (
        cols < torch.tensor(valid_w, device=device).view(-1, 1, 1, 1)
    )


@overload
def augment_sample(
    image: torch.Tensor,
    semantic: torch.Tensor,
    crop_size: int,
    aug: AugmentConfig,
    generator: torch.Generator,
    ignore_index: int = 255,
    panoptic: None = None,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def augment_sample(
    image: torch.Tensor,
    semantic: torch.Tensor,
    crop_size: int,
    aug: AugmentConfig,
    generator: torch.Generator,
    ignore_index: int = 255,
    *,
    panoptic: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def augment_sample(
    image: torch.Tensor,
    semantic: torch.Tensor,
    crop_size: int,
    aug: AugmentConfig,
    generator: torch.Generator,
    ignore_index: int = 255,
    panoptic: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """The MaskFormer/Mask2Former ADE20K training augmentation of one sample.

    1. resize so the short side is ``crop_size * U(min_scale, max_scale)`` (long side capped
       at ``aug.resolved_max_size(crop_size)``): image bilinear, labels nearest;
    2. pad bottom/right to ``crop_size`` (image 0, labels ``ignore_index``, panoptic 0 =
       void), then a ``crop_size`` square crop under the category-area constraint;
    3. horizontal flip with p=0.5 if ``aug.hflip``;
    4. photometric distortion of the image only if ``aug.photometric``; padding stays 0.

    ``panoptic`` (int64 ``H x W`` segment ids, same size as ``semantic``) follows the labels
    through 1-3; when given, it is returned as a third element. Outputs are contiguous and
    exactly ``crop_size x crop_size``. Randomness only from ``generator``.
    """
    if semantic.ndim != 2 or image.shape[-2:] != semantic.shape:
        raise ValueError(f"image {tuple(image.shape)} and semantic {tuple(semantic.shape)} sizes differ")
    if panoptic is not None and panoptic.shape != semantic.shape:
        raise ValueError(
            f"panoptic {tuple(panoptic.shape)} and semantic {tuple(semantic.shape)} sizes differ"
        )
    aug.validate()
    plan = plan_sample(*semantic.shape, crop_size, aug, generator, ignore_index)
    out = apply_geometry(image, semantic, plan, panoptic)
    image = out.image
    if plan.photometric is not None:
        # detectron2 and mmseg pad after the colour jitter, so padded pixels are 0 there.
        image = apply_photometric(image.unsqueeze(0), [plan.photometric])
        image = (image * padding_mask([out.valid_h], [out.valid_w], [plan.flip], crop_size, image.device))[0]
    if panoptic is not None:
        return image, out.semantic, out.panoptic
    return image, out.semantic
