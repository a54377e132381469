"""Generic "image file + label PNG" reader that the semantic-only formats are built on.

ADE20K, Cityscapes, COCO-Stuff, Pascal-Context and plain folders differ only in where
their files are, how a label file is named after its image, how many label values the
files may hold and how stored values map to the values we shard. This module does the
rest once: pairing, per-sample checks, the optional lookup table and the panoptic
stand-in (one segment per class). Samples are sorted by image path relative to the
image folder, so the same tree always gives the same order.

Pairing accounts for every file: image extensions match in any case (``.JPG``), an image
without its label or a label without its image is an error, and any other file in the
image folder is named in a warning, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from data_pipeline.formats.common import (
    IGNORE,
    FormatError,
    FormatSample,
    and_more,
    check_range,
    read_image,
    read_index_label,
    semantic_segments,
    warn,
)
from data_pipeline.shard_writer import Source

T = TypeVar("T")


@dataclass(frozen=True)
class LabelSpec:
    """How to read one dataset's label files."""

    num_values: int  # stored values 0..num_values-1 are valid (plus 255 = ignore)
    lut: tuple[int, ...] | None = None  # 256 entries: stored value -> sharded value
    void: tuple[int, ...] = (IGNORE,)  # sharded values that get no panoptic segment


def make_lut(mapping: dict[int, int]) -> tuple[int, ...]:
    """A 256-entry lookup table: ``mapping`` where given, 255 (ignore) elsewhere."""
    lut = [IGNORE] * 256
    for stored, target in mapping.items():
        lut[stored] = target
    return tuple(lut)


@dataclass(frozen=True)
class Layout:
    """How one dataset names its files (name endings are matched case-insensitively)."""

    image_endings: tuple[str, ...]  # lower-case ends of image file names, e.g. (".jpg", ".jpeg")
    label_name: Callable[[Path], Path]  # image path relative to the image folder -> label's
    label_endings: tuple[str, ...] = (".png",)  # what marks a file in the label folder as a label
    depth: str = "*"  # glob of the files below each folder ("*/*": one subfolder per city)


def _files(folder: Path, depth: str) -> list[Path]:
    # Hidden files are no one's data: macOS leaves ._X.png and .DS_Store beside copied files.
    files = (p for p in folder.glob(depth) if p.is_file() and not p.name.startswith("."))
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def pair_files(image_dir: Path, label_dir: Path, layout: Layout) -> list[tuple[str, str]]:
    """(image, label) path pairs, sorted by image path relative to ``image_dir``.

    An image without its label, a label without its image or two images sharing a label
    is an error, not a skip: a silently smaller dataset is worse than a clear message.
    Other files in the image folder are left out with a warning naming each of them.
    """
    images, skipped = [], []
    for path in _files(image_dir, layout.depth):
        (images if path.name.lower().endswith(layout.image_endings) else skipped).append(path)
    if not images:
        raise FormatError(f"{image_dir}: no {'/'.join(layout.image_endings)} images (in any case)")
    if skipped:
        names = ", ".join(p.relative_to(image_dir).as_posix() for p in skipped)
        warn(f"{image_dir}: left out {len(skipped)} file{'s' if len(skipped) > 1 else ''} that "
             f"{'are' if len(skipped) > 1 else 'is'} not {'/'.join(layout.image_endings)} images: {names}")  # fmt: skip
    pairs = []
    seen: dict[Path, Path] = {}
    for image in images:
        label = label_dir / layout.label_name(image.relative_to(image_dir))
        if not label.is_file():
            raise FormatError(f"{image}: no label, expected {label}")
        if label in seen:
            raise FormatError(f"{image}: shares its label {label} with {seen[label]}")
        seen[label] = image
        pairs.append((str(image), str(label)))
    orphans = [str(p) for p in _files(label_dir, layout.depth)
               if p.name.lower().endswith(layout.label_endings) and p not in seen]  # fmt: skip
    if orphans:
        raise FormatError(
            f"{and_more(orphans)}: label without an image, expected one named after it in {image_dir} "
            f"({'/'.join(layout.image_endings)})"
        )
    return pairs


def load_pair(pairs: Sequence[tuple[str, str]], spec: LabelSpec, index: int) -> FormatSample:
    """Read, check and map sample ``index`` (top level, so a partial of it pickles)."""
    image_path, label_path = (Path(p) for p in pairs[index])
    image, data, ext = read_image(image_path)
    labels = read_index_label(label_path, image.shape)
    check_range(label_path, labels, spec.num_values)
    if spec.lut is not None:
        labels = np.asarray(spec.lut, dtype=np.uint8)[labels]
    panoptic, segments = semantic_segments(labels, spec.void)
    return FormatSample(image, labels, panoptic, segments, image_bytes=data, image_ext=ext,
                        source_name=image_path.stem)


def limit(pairs: list[T], num_samples: int | None) -> list[T]:
    """The first ``num_samples`` items (all of them for None)."""
    if num_samples is None:
        return pairs
    if num_samples < 1:
        raise FormatError(f"num_samples must be >= 1, got {num_samples}")
    return pairs[:num_samples]


def paired_source(
    fmt: str,
    classes: list[str],
    pairs: list[tuple[str, str]],
    spec: LabelSpec,
    options: dict[str, Any],
    num_samples: int | None = None,
) -> Source:
    pairs = limit(pairs, num_samples)
    return Source(
        format=fmt,
        classes=list(classes),
        num_samples=len(pairs),
        load=partial(load_pair, tuple(pairs), spec),
        options=dict(options),
    )
