"""Generic "image file + label PNG" reader that the semantic-only formats are built on.

ADE20K, Cityscapes, COCO-Stuff, Pascal-Context and plain folders differ only in where
their files are, how a label file is named after its image, how many label values the
files may hold and how stored values map to the values we shard. This module does the
rest once: pairing, per-sample checks, the optional lookup table and the panoptic
stand-in (one segment per class). Samples are sorted by image path relative to the
image folder, so the same tree always gives the same order.
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
    check_range,
    read_image,
    read_index_label,
    semantic_segments,
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


def pair_files(
    image_dir: Path,
    label_dir: Path,
    image_glob: str,
    label_name: Callable[[Path], Path],
    suffixes: tuple[str, ...] | None = None,
) -> list[tuple[str, str]]:
    """(image, label) path pairs, sorted by image path relative to ``image_dir``.

    ``label_name`` maps an image path relative to ``image_dir`` to its label path
    relative to ``label_dir``. An image without its label is an error, not a skip: a
    silently smaller dataset is worse than a clear message.
    """
    images = sorted(
        (p for p in image_dir.glob(image_glob) if suffixes is None or p.suffix.lower() in suffixes),
        key=lambda p: p.relative_to(image_dir).as_posix(),
    )
    if not images:
        raise FormatError(f"{image_dir}: no images matching {image_glob!r}")
    pairs = []
    seen: dict[Path, Path] = {}
    for image in images:
        label = label_dir / label_name(image.relative_to(image_dir))
        if not label.is_file():
            raise FormatError(f"{image}: no label, expected {label}")
        if label in seen:
            raise FormatError(f"{image}: shares its label {label} with {seen[label]}")
        seen[label] = image
        pairs.append((str(image), str(label)))
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
    return FormatSample(image, labels, panoptic, segments, image_bytes=data, image_ext=ext)


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
