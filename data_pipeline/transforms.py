"""Training augmentation and MaskFormer target construction, on torch tensors.

Images are uint8 ``3 x H x W`` RGB (the model normalises), label maps int64 ``H x W`` with
``ignore_index`` (255) for unlabelled pixels, panoptic id maps int64 ``H x W`` with 0 = void.
Randomness comes only from the ``torch.Generator`` passed in, so a stream seeded per
(seed, epoch, rank, worker) is reproducible.

:func:`augment_sample` is the MaskFormer/Mask2Former ADE20K training recipe (resize short
side to crop * U(0.5, 2.0) capped at 4 * crop on the long side, category-area-constrained
random crop, horizontal flip, SSD photometric distortion). :func:`train_augment` is the
older crop + flip path, kept until the loader switches over.
"""

from __future__ import annotations

from typing import overload

import torch
import torch.nn.functional as F

from data_pipeline.augment_config import AugmentConfig

# detectron2's RandomCrop_CategoryAreaConstraint and mmseg's RandomCrop both try 10 crops.
CAT_CROP_TRIES = 10


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


def semantic_to_targets(semantic: torch.Tensor, ignore_index: int = 255) -> dict[str, torch.Tensor]:
    """MaskFormer's semantic targets: one binary mask per class present (ignore excluded).

    Returns ``{"labels": int64[n], "masks": bool[n, H, W]}`` with labels sorted ascending;
    ``n`` is 0 for an image that is all ignore.
    """
    if semantic.ndim != 2:
        raise ValueError(f"semantic must be H x W, got shape {tuple(semantic.shape)}")
    labels = torch.unique(semantic)  # sorted
    labels = labels[labels != ignore_index].to(torch.int64)
    masks = semantic.unsqueeze(0) == labels.view(-1, 1, 1)
    return {"labels": labels, "masks": masks}


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


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _coin(generator: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=generator, dtype=torch.float64)) < p


def resize_shape(height: int, width: int, short_edge: float, max_size: int) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge.get_output_shape``: short side to ``short_edge``, then
    scale down so the long side is at most ``max_size``; rounded half up, at least 1 px."""
    scale = short_edge / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def _nearest_index(size_in: int, size_out: int) -> torch.Tensor:
    # Pixel-centre nearest neighbour (PIL NEAREST, torch "nearest-exact"), the same
    # half-pixel convention as bilinear with align_corners=False, so labels stay aligned.
    idx = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * (size_in / size_out)).floor()
    return idx.clamp_(max=size_in - 1).to(torch.int64)


def resize_labels(labels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Nearest-neighbour resize of an integer ``H x W`` map by indexing: values are only
    ever copied (never interpolated), for any dtype and any id range."""
    if labels.shape[-2:] == (height, width):
        return labels
    rows = _nearest_index(labels.shape[-2], height)
    cols = _nearest_index(labels.shape[-1], width)
    # Two index_selects: several times faster than one broadcast advanced index.
    return labels.index_select(-2, rows).index_select(-1, cols)


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of a uint8 ``C x H x W`` image (antialiased when shrinking).

    Runs on the uint8 tensor directly: torch's uint8 bilinear kernels are ~6x faster on
    CPU than a float round trip, and round to nearest as that would (within 1 level).
    """
    if image.shape[-2:] == (height, width):
        return image
    shrinking = height < image.shape[-2] or width < image.shape[-1]
    return F.interpolate(
        image.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking
    )[0]


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


def crop_offsets(
    semantic: torch.Tensor,
    crop_size: int,
    generator: torch.Generator,
    cat_max_ratio: float = 0.75,
    ignore_index: int = 255,
) -> tuple[int, int]:
    """Top-left of a ``crop_size`` window in a map at least that large in both dims, by
    detectron2's ``RandomCrop_CategoryAreaConstraint``: up to 10 random windows until one
    passes :func:`category_area_ok`, else the last; ``cat_max_ratio >= 1`` = one try."""
    height, width = semantic.shape
    if height == crop_size and width == crop_size:
        return 0, 0  # one possible window: nothing to choose or retry
    tries = 1 if cat_max_ratio >= 1.0 else CAT_CROP_TRIES
    top = left = 0
    for _ in range(tries):
        top = int(torch.randint(0, height - crop_size + 1, (), generator=generator))
        left = int(torch.randint(0, width - crop_size + 1, (), generator=generator))
        if tries == 1:
            break
        window = semantic[top : top + crop_size, left : left + crop_size]
        if category_area_ok(window, cat_max_ratio, ignore_index):
            break
    return top, left


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """Float ``3 x H x W`` RGB in [0, 1] -> HSV, all three channels in [0, 1] (colorsys)."""
    r, g, b = rgb[0], rgb[1], rgb[2]
    # Elementwise max/min of the three planes: a reduction over dim 0 is ~10x slower.
    maxc = torch.maximum(torch.maximum(r, g), b)
    delta = maxc - torch.minimum(torch.minimum(r, g), b)
    safe = delta.clamp(min=1e-12)
    # Hue sector by the largest channel, R before G before B as colorsys (ties give the
    # same hue on either side).
    red_max, green_max = r == maxc, g == maxc
    h = torch.where(red_max, (g - b) / safe, torch.where(green_max, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = (h / 6.0).remainder_(1.0).masked_fill_(delta == 0, 0.0)
    s = (delta / maxc.clamp(min=1e-12)).masked_fill_(maxc == 0, 0.0)
    return torch.stack((h, s, maxc))


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`: channel n is V - V*S*clamp(min(k, 4 - k), 0, 1) with
    k = (6H + n) mod 6 for n = 5, 3, 1 (R, G, B) — no per-sector table to gather from."""
    h6 = hsv[0].remainder(1.0) * 6.0
    v = hsv[2]
    vs = v * hsv[1]
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n).remainder_(6.0)
        channels.append(v - vs * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(channels)


def photometric_distort(
    image: torch.Tensor,
    generator: torch.Generator,
    p: float = 0.5,
    brightness_delta: float = 32.0,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> torch.Tensor:
    """detectron2's ``ColorAugSSDTransform`` (= mmseg ``PhotoMetricDistortion``) in torch.

    Brightness (+U(-32, 32)), then, in random order, contrast (x U(0.5, 1.5)) before or
    after saturation (S x U(0.5, 1.5)) and hue (+ randint(-18, 18) on OpenCV's 0-180 scale)
    -- each applied with probability ``p``. Works in float on the 0-255 scale, clamping
    after each step as the reference does, and rounds once back to uint8 at the end (the
    reference truncates to uint8 after every step). Input RGB uint8 ``3 x H x W``.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"photometric_distort needs a 3 x H x W image, got shape {tuple(image.shape)}")
    x = image.float()
    if _coin(generator, p):
        x = (x + _uniform(generator, -brightness_delta, brightness_delta)).clamp_(0, 255)
    contrast_first = _coin(generator, 0.5)

    def contrast(x: torch.Tensor) -> torch.Tensor:
        if _coin(generator, p):
            x = (x * _uniform(generator, *contrast_range)).clamp_(0, 255)
        return x

    if contrast_first:
        x = contrast(x)
    sat = _uniform(generator, *saturation_range) if _coin(generator, p) else None
    hue = (
        int(torch.randint(-hue_delta, hue_delta + 1, (), generator=generator))
        if _coin(generator, p)
        else None
    )
    if sat is not None or hue is not None:
        hsv = rgb_to_hsv(x / 255.0)
        if sat is not None:
            hsv[1] = (hsv[1] * sat).clamp_(0, 1)
        if hue is not None:
            hsv[0] = (hsv[0] + hue / 180.0) % 1.0
        x = (hsv_to_rgb(hsv) * 255.0).clamp_(0, 255)
    if not contrast_first:
        x = contrast(x)
    return x.round_().to(torch.uint8)


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
    4. photometric distortion of the image only if ``aug.photometric``.

    ``panoptic`` (int64 ``H x W`` segment ids, same size as ``semantic``) follows the labels
    through 1-3; when given, it is returned as a third element. Outputs are contiguous and
    exactly ``crop_size x crop_size``. Randomness only from ``generator``.
    """
    aug.validate()
    if crop_size < 1:
        raise ValueError(f"crop_size must be >= 1, got {crop_size}")
    if semantic.ndim != 2 or image.shape[-2:] != semantic.shape:
        raise ValueError(f"image {tuple(image.shape)} and semantic {tuple(semantic.shape)} sizes differ")
    if panoptic is not None and panoptic.shape != semantic.shape:
        raise ValueError(
            f"panoptic {tuple(panoptic.shape)} and semantic {tuple(semantic.shape)} sizes differ"
        )

    # 1. random resize (continuous short-edge scale; see AugmentConfig).
    short_edge = crop_size * _uniform(generator, aug.min_scale, aug.max_scale)
    new_h, new_w = resize_shape(*semantic.shape, short_edge, aug.resolved_max_size(crop_size))
    image = resize_image(image, new_h, new_w)
    semantic = resize_labels(semantic, new_h, new_w)
    if panoptic is not None:
        panoptic = resize_labels(panoptic, new_h, new_w)

    # 2. pad, then category-area-constrained crop.
    image, semantic = pad_to(image, semantic, crop_size, crop_size, ignore_index)
    if panoptic is not None:
        pad_h, pad_w = semantic.shape[0] - panoptic.shape[0], semantic.shape[1] - panoptic.shape[1]
        panoptic = F.pad(panoptic, (0, pad_w, 0, pad_h), value=0)
    top, left = crop_offsets(semantic, crop_size, generator, aug.cat_max_ratio, ignore_index)
    # The crop's real pixels (the rest is padding, which must stay 0 whatever step 4 does).
    valid_h, valid_w = min(crop_size, new_h - top), min(crop_size, new_w - left)
    window = (slice(top, top + crop_size), slice(left, left + crop_size))
    image, semantic = image[(..., *window)], semantic[window]
    if panoptic is not None:
        panoptic = panoptic[window]

    # 3. horizontal flip.
    flipped = aug.hflip and _coin(generator, 0.5)
    if flipped:
        image, semantic = image.flip(-1), semantic.flip(-1)
        if panoptic is not None:
            panoptic = panoptic.flip(-1)

    # 4. photometric distortion, image only; padding is zeroed again (detectron2 and mmseg
    # pad after the colour jitter, so padded pixels are 0 there too).
    if aug.photometric:
        image = photometric_distort(image, generator)
        if valid_h < crop_size or valid_w < crop_size:
            image = image.clone()
            image[:, valid_h:] = 0
            if flipped:
                image[:, :, : crop_size - valid_w] = 0
            else:
                image[:, :, valid_w:] = 0

    out = (image.contiguous(), semantic.contiguous())
    if panoptic is not None:
        return (*out, panoptic.contiguous())
    return out
