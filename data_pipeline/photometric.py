"""SSD photometric distortion (detectron2 ``ColorAugSSDTransform`` = mmseg
``PhotoMetricDistortion``), batched: one elementwise pass over a B x 3 x H x W batch
with per-sample parameters, on whatever device the batch is on.

Works in float on the 0-255 scale, clamping after each step as the reference does, and
rounds once back to uint8 at the end (the reference truncates to uint8 after every step).
A step a sample skips is applied with its neutral value (+0, x1), which leaves float
values bit-identical, so a batch gives each sample exactly what it would get alone; the
HSV round trip, which is not bit-exact, runs only on the samples that need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from data_pipeline.augment_plan import PhotometricParams, draw_photometric


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """Float ``... x 3 x H x W`` RGB in [0, 1] -> HSV, all three channels in [0, 1] (colorsys)."""
    r, g, b = rgb.unbind(-3)
    # Elementwise max/min of the three planes: a reduction over the channel dim is ~10x slower.
    maxc = torch.maximum(torch.maximum(r, g), b)
    delta = maxc - torch.minimum(torch.minimum(r, g), b)
    safe = delta.clamp(min=1e-12)
    # Hue sector by the largest channel, R before G before B as colorsys (ties give the
    # same hue on either side).
    red_max, green_max = r == maxc, g == maxc
    h = torch.where(
        red_max, (g - b) / safe, torch.where(green_max, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
    )
    h = (h / 6.0).remainder_(1.0).masked_fill_(delta == 0, 0.0)
    s = (delta / maxc.clamp(min=1e-12)).masked_fill_(maxc == 0, 0.0)
    return torch.stack((h, s, maxc), dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`: channel n is V - V*S*clamp(min(k, 4 - k), 0, 1) with
    k = (6H + n) mod 6 for n = 5, 3, 1 (R, G, B) — no per-sector table to gather from."""
    hue, sat, v = hsv.unbind(-3)
    h6 = hue.remainder(1.0) * 6.0
    vs = v * sat
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n).remainder_(6.0)
        channels.append(v - vs * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(channels, dim=-3)


def _per_sample(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).to(like.device, non_blocking=True).view(-1, 1, 1, 1)


def _scale_shift(x: torch.Tensor, factors: list[float | None], add: bool) -> None:
    """In place, then clamped to 0-255: ``x + f`` (``add``) or ``x * f`` per sample; a
    sample whose factor is None gets the neutral value. Skipped when no sample has one."""
    if all(f is None for f in factors):
        return
    neutral = 0.0 if add else 1.0
    values = _per_sample([neutral if f is None else f for f in factors], x)
    (x.add_(values) if add else x.mul_(values)).clamp_(0, 255)


def apply_photometric(images: torch.Tensor, params: Sequence[PhotometricParams | None]) -> torch.Tensor:
    """Distort uint8 ``B x 3 x H x W`` RGB images, sample ``i`` by ``params[i]`` (None: untouched)."""
    if images.ndim != 4 or images.shape[1] != 3 or len(params) != images.shape[0]:
        raise ValueError(
            f"apply_photometric needs B x 3 x H x W images and B params, got shape "
            f"{tuple(images.shape)} and {len(params)} params"
        )
    ps = [p if p is not None else PhotometricParams() for p in params]
    x = images.float()
    _scale_shift(x, [p.brightness for p in ps], add=True)
    _scale_shift(x, [p.contrast if p.contrast_first else None for p in ps], add=False)
    colour = [i for i, p in enumerate(ps) if p.saturation is not None or p.hue is not None]
    if colour:
        whole = len(colour) == len(ps)  # then no gather/scatter of the subset
        index = torch.tensor(colour, device=x.device)
        sub = [ps[i] for i in colour]
        hsv = rgb_to_hsv((x if whole else x.index_select(0, index)) / 255.0)
        saturation = _per_sample([p.saturation if p.saturation is not None else 1.0 for p in sub], x)
        hue = _per_sample([(p.hue or 0) / 180.0 for p in sub], x)
        hsv[:, 1:2] = (hsv[:, 1:2] * saturation).clamp_(0, 1)
        hsv[:, 0:1] = (hsv[:, 0:1] + hue) % 1.0
        rgb = (hsv_to_rgb(hsv) * 255.0).clamp_(0, 255)
        x = rgb if whole else x.index_copy_(0, index, rgb)
    _scale_shift(x, [None if p.contrast_first else p.contrast for p in ps], add=False)
    return x.round_().to(torch.uint8)


def photometric_distort(image: torch.Tensor, generator: torch.Generator, **draw: Any) -> torch.Tensor:
    """Distort one uint8 ``3 x H x W`` RGB image with parameters drawn from ``generator``
    by :func:`data_pipeline.augment_plan.draw_photometric` (``draw``: its keyword arguments)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"photometric_distort needs a 3 x H x W image, got shape {tuple(image.shape)}")
    return apply_photometric(image.unsqueeze(0), [draw_photometric(generator, **draw)])[0]
