"""Dataset format readers: each ``(root, split, num_samples=None) -> shard_writer.Source``.

``READERS`` maps the ``--format`` names of ``python -m data_pipeline shard`` to them.
Readers raise :class:`FormatError` (a ``ValueError``) for a bad tree, with one line
naming the file and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable

from data_pipeline.formats.coco_panoptic import coco_panoptic_source
from data_pipeline.formats.common import FormatError, FormatSample
from data_pipeline.formats.semantic import (
    ade20k_source,
    cityscapes_source,
    coco_stuff_source,
    folder_source,
    pascal_context_source,
)
from data_pipeline.shard_writer import Source

READERS: dict[str, Callable[..., Source]] = {
    "ade20k": ade20k_source,
    "cityscapes": cityscapes_source,
    "coco_stuff": coco_stuff_source,
    "pascal_context": pascal_context_source,
    "coco_panoptic": coco_panoptic_source,
    "folder": folder_source,
}

__all__ = [
    "READERS",
    "FormatError",
    "FormatSample",
    "ade20k_source",
    "cityscapes_source",
    "coco_panoptic_source",
    "coco_stuff_source",
    "folder_source",
    "pascal_context_source",
]
