"""Decoding one sample's member bytes (image and label map) with PIL, with the checks
that make a bad sample a one-line error naming its shard, key and source file
(``sample val_00000000 (ADE_val_00000001)``, see ``sample_members``).

PIL per member extension, not webdataset's ``decode("pil")``: that turns a
single-channel label PNG into RGB.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_pipeline.loader_io import ShardReadError
from data_pipeline.sample_encode import SEMANTIC_EXT
from data_pipeline.sample_members import MemberDecodeError, describe_raw, open_member, rgb_pixels
from data_pipeline.transforms import reduce_zero_label

IMAGE_EXTS = ("png", "jpg", "jpeg")  # first one present is the image


def _open_member(raw: dict[str, Any], ext: str) -> Image.Image:
    try:
        return open_member(raw[ext], ext)
    except MemberDecodeError as exn:
        raise ShardReadError(f"{describe_raw(raw)}: {exn}") from exn


def _check_label_range(
    labels: np.ndarray, num_classes: int, ignore_index: int, reduce_zero: bool, where: Callable[[], str]
) -> None:
    """Every label a class, or ignore; checked on the decoded (not yet reduced) values.

    ``where()`` names the sample; it is only called for the error (naming the source file
    parses the sample's .json member)."""
    limit = num_classes + 1 if reduce_zero else num_classes  # raw ids below it are classes (or 0 = other)
    if labels.size == 0 or (int(labels.max()) < limit and int(labels.min()) >= 0):
        return  # the common case: two reductions, no mask
    bad = (labels >= limit) | (labels < 0)
    # Ids that are (or, reduced, become) the ignore index are fine.
    for fine in (ignore_index, ignore_index + 1) if reduce_zero else (ignore_index,):
        bad &= labels != fine
    if bad.any():
        value = int(labels[bad][0]) - int(reduce_zero)  # as training would see it
        raise ShardReadError(f"{where()}: label value {value} out of range "
                             f"(classes 0..{num_classes - 1}, ignore {ignore_index})")  # fmt: skip


def _rgb_array(raw: dict[str, Any], ext: str, image: Image.Image) -> np.ndarray:
    try:
        return rgb_pixels(image)
    except ValueError as exn:  # 32-bit pixels
        raise ShardReadError(f"{describe_raw(raw)}: .{ext} {exn}") from None


def decode_arrays(
    raw: dict[str, Any], reduce_zero: bool = False, ignore_index: int = 255, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Member bytes -> (uint8 image H x W x 3, labels H x W), decoded with PIL, checked
    against ``num_classes`` (with ``reduce_zero``'s meaning) but not yet reduced.

    Labels are uint8 when their ids fit (always for PIL modes L and P), else int64. Both
    arrays are PIL's pixels with one copy each: the training worker ships them as they are.
    """
    image_ext = next((ext for ext in IMAGE_EXTS if ext in raw), None)
    if image_ext is None or SEMANTIC_EXT not in raw:
        members = sorted(k for k in raw if not k.startswith("__"))
        raise ShardReadError(
            f"{describe_raw(raw)}: needs an image (.png/.jpg) and a .{SEMANTIC_EXT}, has {members}"
        )
    image = _open_member(raw, image_ext)
    labels = _open_member(raw, SEMANTIC_EXT)
    if labels.mode not in ("L", "P", "I", "I;16"):  # "P": palette indices are the labels
        raise ShardReadError(
            f"{describe_raw(raw)}: .{SEMANTIC_EXT} must be single-channel, got PIL mode {labels.mode}"
        )
    if labels.size != image.size:
        raise ShardReadError(
            f"{describe_raw(raw)}: image is {image.size} but labels are {labels.size} (W x H)"
        )
    # np.array, not np.asarray: PIL's buffer is read-only, which torch.from_numpy warns about.
    image_np, labels_np = _rgb_array(raw, image_ext, image), np.array(labels)
    if labels_np.dtype != np.uint8:  # modes I and I;16: as narrow as the ids allow
        fits = labels_np.size == 0 or (int(labels_np.min()) >= 0 and int(labels_np.max()) <= 255)
        labels_np = labels_np.astype(np.uint8 if fits else np.int64)
    if num_classes is not None:
        _check_label_range(labels_np, num_classes, ignore_index, reduce_zero, partial(describe_raw, raw))
    return image_np, labels_np


def decode_sample(
    raw: dict[str, Any], reduce_zero: bool = False, ignore_index: int = 255, num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Member bytes -> (uint8 image 3 x H x W, labels H x W: uint8, or int64 for wider ids).

    ``reduce_zero`` (``data.reduce_zero_label``) applies :func:`reduce_zero_label` to the
    labels here, before any padding with ``ignore_index``.
    """
    image, labels = decode_arrays(raw, reduce_zero, ignore_index, num_classes)
    labels_t = torch.from_numpy(labels)
    if reduce_zero:
        labels_t = reduce_zero_label(labels_t, ignore_index)
    return torch.from_numpy(image).permute(2, 0, 1).contiguous(), labels_t
