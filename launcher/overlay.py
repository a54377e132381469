"""Colour overlays of label maps: what ``launcher predict`` writes for people to look at."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

IGNORE_COLOUR = (0, 0, 0)


def palette(num_classes: int) -> np.ndarray:
    """A fixed, well-spread colour per class (golden-ratio hue steps); uint8 K x 3."""
    colours = []
    for i in range(num_classes):
        hue = (i * 0.618033988749895) % 1.0
        value = 0.95 if i % 2 == 0 else 0.75
        r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return np.asarray(colours, dtype=np.uint8)


def colourise(labels: np.ndarray, colours: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """H x W integer labels -> H x W x 3 uint8 colours (ignored pixels black)."""
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < len(colours))
    out[valid] = colours[labels[valid]]
    out[~valid] = IGNORE_COLOUR
    return out


def blend(image: np.ndarray, colour_map: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    return (image.astype(np.float32) * (1 - alpha) + colour_map.astype(np.float32) * alpha).astype(np.uint8)


def overlay_panel(image: np.ndarray, prediction: np.ndarray, target: np.ndarray | None, num_classes: int,
                  ignore_index: int = 255, min_side: int = 256) -> Image.Image:
    """[image | prediction overlay | ground-truth overlay], upscaled so small inputs stay visible."""
    colours = palette(num_classes)
    panels = [image, blend(image, colourise(prediction, colours, ignore_index))]
    if target is not None:
        panels.append(blend(image, colourise(target, colours, ignore_index)))
    strip = np.concatenate(panels, axis=1)
    picture = Image.fromarray(strip)
    scale = max(1, int(np.ceil(min_side / image.shape[0])))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture
