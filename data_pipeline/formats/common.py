"""Shared pieces of the dataset readers: errors, the sample type, file and label checks.

Every reader returns a ``shard_writer.Source`` whose ``load(index)`` gives a
:class:`FormatSample`. Bad input raises :class:`FormatError` (a ``ValueError``) with one
line naming the file and what was expected, which the CLI prints without a traceback.
JPEG datasets keep their original bytes (``image_bytes``/``image_ext``) so the shard
writer stores them as is instead of re-encoding them as (much larger) PNGs. Files a reader
leaves out (not images of the dataset's kind) are named in a warning: a dataset must
never come out smaller than its folder without the user hearing of it.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_pipeline.sample_members import rgb_pixels

IGNORE = 255
JPEG_EXTS = (".jpg", ".jpeg")


class FormatError(ValueError):
    """A dataset tree that does not have the expected layout or content (one line)."""


def warn(message: str) -> None:
    """One line on stderr: something the user should know but that does not stop the job."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def and_more(names: list[str]) -> str:
    """``a`` or ``a (and 3 more)``: the first of several files an error is about."""
    return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


@dataclass
class FormatSample:
    """A ``shard_writer.LabeledSample`` plus the image's original encoded bytes."""

    image: np.ndarray  # uint8 H x W x 3 RGB
    semantic: np.ndarray  # uint8 H x W, 255 = ignore
    panoptic: np.ndarray  # int32 H x W, 0 = void
    segments: list[dict[str, Any]] = field(default_factory=list)
    image_bytes: bytes | None = None  # original file, written as-is when set
    image_ext: str | None = None  # "jpg" or "png"
    # Stem of the image file (``ADE_val_00000001``): recorded in the shard as "source" so
    # errors and ``launcher predict`` name the user's file, not only the sample's position.
    source_name: str | None = None
    # The dataset's own image id (COCO's int), recorded as "image_id" for panoptic outputs.
    image_id: int | str | None = None


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FormatError(f"{path}: {what} folder not found")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FormatError(f"{path}: {what} not found")
    return path


def _open(path: Path, data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except (UnidentifiedImageError, OSError) as exn:
        detail = "not a recognised image" if isinstance(exn, UnidentifiedImageError) else str(exn)
        raise FormatError(f"{path}: cannot decode image: {detail}") from None


def read_image(path: Path) -> tuple[np.ndarray, bytes | None, str | None]:
    """(RGB uint8 array, original bytes, extension) -- bytes only for JPEGs (kept as is)."""
    data = path.read_bytes()
    try:  # the loader's conversion: 16-bit gray by its high byte, not clipped to white
        rgb = rgb_pixels(_open(path, data))
    except ValueError as exn:
        raise FormatError(f"{path}: the image {exn}") from None
    if path.suffix.lower() in JPEG_EXTS:
        return rgb, data, "jpg"
    return rgb, None, None


def read_index_label(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A single-channel label PNG as uint8 H x W, checked against the image's ``shape``."""
    label = _open(path, path.read_bytes())
    if label.mode not in ("L", "P"):
        raise FormatError(
            f"{path}: expected a single-channel index map (PIL mode L or P), got mode {label.mode}"
        )
    array = np.asarray(label, dtype=np.uint8)
    if array.shape != tuple(shape[:2]):
        raise FormatError(
            f"{path}: label is {array.shape[1]}x{array.shape[0]} (WxH) but its image is {shape[1]}x{shape[0]}"
        )
    return array


def check_range(path: Path, labels: np.ndarray, num_values: int) -> None:
    """Raise unless every value is < ``num_values`` or the ignore value 255."""
    bad = labels[(labels >= num_values) & (labels != IGNORE)]
    if bad.size:
        raise FormatError(
            f"{path}: label value {int(bad.max())} out of range (expected 0..{num_values - 1} or {IGNORE})"
        )


def semantic_segments(semantic: np.ndarray, void: tuple[int, ...] = (IGNORE,)) -> tuple[np.ndarray, list]:
    """Panoptic stand-in for semantic-only data: one segment per present class.

    Segment id = class + 1, ``category_id`` = class, ``iscrowd`` 0, ``isthing`` False
    (classes are not split into instances, so no segment claims to be a thing).
    """
    panoptic = np.zeros(semantic.shape, dtype=np.int32)
    segments: list[dict[str, Any]] = []
    for value in np.unique(semantic):
        cls = int(value)
        if cls in void:
            continue
        mask = semantic == value
        panoptic[mask] = cls + 1
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        segments.append(
            {
                "id": cls + 1,
                "category_id": cls,
                "iscrowd": 0,
                "area": int(mask.sum()),
                "isthing": False,
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
            }
        )
    return panoptic, segments
