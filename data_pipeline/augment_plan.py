"""The random part of the training augmentation, drawn per sample in the loader worker.

A loader worker decodes a sample and draws its :class:`AugmentPlan` — the resize, the
candidate crop windows, the flip and the photometric parameters — from the sample's own
generator (seeded by its place in the stream, see ``data_pipeline.loader``), looking at no
pixel. Applying the plan (resizing, choosing among the crop windows by the label map,
flipping, colour jitter) is deterministic given the pixels, so it can run anywhere: on
the training device, batched, where it costs a fraction of what it costs a CPU worker
(``data_pipeline.device_batch``). The augmented sample stays a pure function of
(seed, epoch, rank, worker, position), which exact resume relies on.

Draws, in order: the resize scale; the crop windows (none when only one window fits,
one when the category-area constraint is off, else ten); the flip coin; the photometric
parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.augment_config import AugmentConfig

# detectron2's RandomCrop_CategoryAreaConstraint and mmseg's RandomCrop both try 10 crops.
CAT_CROP_TRIES = 10


@dataclass(frozen=True)
class PhotometricParams:
    """One sample's SSD colour jitter: each field None when its step is skipped."""

    brightness: float | None = None  # added on the 0-255 scale
    contrast: float | None = None  # multiplies the 0-255 values
    contrast_first: bool = True  # contrast before (True) or after saturation and hue
    saturation: float | None = None  # multiplies S
    hue: int | None = None  # added to H on OpenCV's 0-180 scale


@dataclass(frozen=True)
class AugmentPlan:
    """How one decoded sample becomes a ``crop_size`` square training sample."""

    crop_size: int
    height: int  # size after the random resize, before padding to the crop
    width: int
    # Candidate (top, left) windows in the padded resized map, tried in order: the first
    # that passes the category-area test is taken, else the last.
    offsets: tuple[tuple[int, int], ...]
    cat_max_ratio: float
    flip: bool
    photometric: PhotometricParams | None
    ignore_index: int = 255
    # ADE20K's convention, applied to the decoded labels before anything else.
    reduce_zero_label: bool = False


def sample_generator(*key: int) -> torch.Generator:
    """The augmentation generator of the sample at ``key`` = (seed, epoch, rank, worker, 1,
    position): seeded with ``np.random.default_rng(key).integers(2**62)``.

    Computed as the top 62 bits of the first PCG64 output under ``SeedSequence(key)``,
    which is exactly what that call returns (Lemire's bounded draw over a power-of-two
    range keeps the top bits and never rejects; ``tests/test_device_batch.py`` checks the
    equality) at half the cost, without building a ``Generator``: ~15 us per sample.
    """
    state = int(np.random.PCG64(np.random.SeedSequence(list(key))).random_raw())
    return torch.Generator().manual_seed(state >> 2)


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def coin(generator: torch.Generator, p: float) -> bool:
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


def draw_crop_offsets(
    height: int, width: int, crop_size: int, generator: torch.Generator, cat_max_ratio: float = 0.75
) -> tuple[tuple[int, int], ...]:
    """Candidate ``crop_size`` windows in a ``height`` x ``width`` map (at least the crop in
    both dims): detectron2's ``RandomCrop_CategoryAreaConstraint`` tries up to 10 random
    windows, one when ``cat_max_ratio >= 1``. All are drawn up front (two draws), so the
    draws after them do not depend on which window the labels accept."""
    if height == crop_size and width == crop_size:
        return ((0, 0),)  # one possible window: nothing to draw
    tries = 1 if cat_max_ratio >= 1.0 else CAT_CROP_TRIES
    tops = torch.randint(0, height - crop_size + 1, (tries,), generator=generator).tolist()
    lefts = torch.randint(0, width - crop_size + 1, (tries,), generator=generator).tolist()
    return tuple(zip(tops, lefts))


def draw_photometric(
    generator: torch.Generator,
    p: float = 0.5,
    brightness_delta: float = 32.0,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> PhotometricParams:
    """detectron2's ``ColorAugSSDTransform`` draws: brightness +U(-32, 32), contrast
    x U(0.5, 1.5) before or after (a fair coin) saturation x U(0.5, 1.5) and hue
    + randint(-18, 18) (OpenCV's 0-180 scale), each step with probability ``p``.

    All from one draw of nine uniforms (one generator call instead of up to eleven: the
    draws are a measurable share of a loader worker's time per sample); a step's
    values are drawn whether or not it is applied, so the count never varies."""
    u = torch.rand(9, generator=generator, dtype=torch.float64).tolist()

    def between(x: float, low: float, high: float) -> float:
        return low + (high - low) * x

    brightness = between(u[1], -brightness_delta, brightness_delta) if u[0] < p else None
    contrast_first = u[2] < 0.5
    contrast = between(u[4], *contrast_range) if u[3] < p else None
    saturation = between(u[6], *saturation_range) if u[5] < p else None
    hue = min(int(u[8] * (2 * hue_delta + 1)), 2 * hue_delta) - hue_delta if u[7] < p else None
    return PhotometricParams(brightness, contrast, contrast_first, saturation, hue)


def plan_sample(
    height: int,
    width: int,
    crop_size: int,
    aug: AugmentConfig,
    generator: torch.Generator,
    ignore_index: int = 255,
    reduce_zero_label: bool = False,
) -> AugmentPlan:
    """Draw the MaskFormer/Mask2Former ADE20K augmentation of one ``height`` x ``width``
    sample (see ``transforms.augment_sample`` for the recipe) under a valid ``aug`` (the
    loader validates it once, not per sample). Randomness only from ``generator``; no
    pixel is looked at."""
    if crop_size < 1:
        raise ValueError(f"crop_size must be >= 1, got {crop_size}")
    # Continuous short-edge scale (mmseg's ratio_range form; see AugmentConfig).
    short_edge = crop_size * uniform(generator, aug.min_scale, aug.max_scale)
    new_h, new_w = resize_shape(height, width, short_edge, aug.resolved_max_size(crop_size))
    offsets = draw_crop_offsets(
        max(new_h, crop_size), max(new_w, crop_size), crop_size, generator, aug.cat_max_ratio
    )
    flip = aug.hflip and coin(generator, 0.5)
    photometric = draw_photometric(generator) if aug.photometric else None
    return AugmentPlan(
        crop_size,
        new_h,
        new_w,
        offsets,
        aug.cat_max_ratio,
        flip,
        photometric,
        ignore_index,
        reduce_zero_label,
    )
