"""Dataset statistics over a sharded split: ``python -m data_pipeline stats MANIFEST``.

Reads every sample's ``.seg.png`` label once and reports:

* per class: labelled pixels, their share of all non-ignore pixels, and the number of
  images containing the class; ignore pixels (``ignore_index``) counted separately, and
  label values that are neither a class nor ignore as ``out_of_range_pixels``;
* image sizes: min/median/max height and width, the number of distinct sizes and the
  most common ones;
* the number of samples (and shards).

``shard_stats`` returns a JSON-ready dict; ``format_stats`` renders it for a terminal.
"""

from __future__ import annotations

import sys
import tarfile
from collections import Counter
from typing import Any

import numpy as np
from tqdm import tqdm

from data_pipeline.manifest import Manifest
from data_pipeline.sample_members import MemberDecodeError, open_member, sample_label, sample_source
from data_pipeline.shard_verify import SEMANTIC_EXT, iter_samples

MOST_COMMON_SIZES = 5


class ShardDataError(OSError):
    """A shard cannot be read or holds an undecodable label (one line naming the shard)."""


def _label_counts(data: bytes, where: str) -> tuple[np.ndarray, tuple[int, int]]:
    try:
        label = open_member(data, SEMANTIC_EXT)
    except MemberDecodeError as exn:
        raise ShardDataError(f"{where}: {exn}") from None
    values = np.asarray(label).astype(np.int64, copy=False)
    if values.ndim != 2:
        raise ShardDataError(f"{where}: .{SEMANTIC_EXT} must be single-channel, got shape {values.shape}")
    return np.bincount(values.ravel(), minlength=256), (label.size[1], label.size[0])


def shard_stats(manifest: Manifest, progress: bool | None = None) -> dict[str, Any]:
    """Class pixel frequencies and image sizes of every sample the manifest lists."""
    num_classes, ignore = len(manifest.classes), manifest.ignore_index
    pixels = np.zeros(max(256, num_classes, ignore + 1), dtype=np.int64)
    images = np.zeros_like(pixels)
    sizes: list[tuple[int, int]] = []
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=manifest.num_samples, desc="stats", unit="sample", disable=not show) as bar:
        for path in manifest.shard_paths():
            try:
                with tarfile.open(path, mode="r:") as tar:
                    for key, _, members in iter_samples(tar):
                        where = f"{path}: sample {sample_label(key, sample_source(members))}"
                        if SEMANTIC_EXT not in members:
                            raise ShardDataError(f"{where}: no .{SEMANTIC_EXT} label")
                        counts, size = _label_counts(members[SEMANTIC_EXT], where)
                        if counts.size > pixels.size:
                            pixels = np.pad(pixels, (0, counts.size - pixels.size))
                            images = np.pad(images, (0, counts.size - images.size))
                        pixels[: counts.size] += counts
                        images[: counts.size] += counts > 0
                        sizes.append(size)
                        bar.update(1)
            except (tarfile.TarError, ValueError, EOFError) as exn:
                raise ShardDataError(f"{path}: not a readable tar: {exn}") from None

    total = int(pixels.sum())
    ignored = int(pixels[ignore]) if ignore < pixels.size else 0
    class_pixels = pixels[:num_classes]
    labelled = int(class_pixels.sum())
    out_of_range = total - labelled - ignored
    heights = np.array([h for h, _ in sizes] or [0])
    widths = np.array([w for _, w in sizes] or [0])
    distinct = Counter(sizes)
    return {
        "manifest": str(manifest.path),
        "split": manifest.split,
        "num_samples": len(sizes),
        "num_shards": len(manifest.shards),
        "pixels": total,
        "ignore_index": ignore,
        "ignore_pixels": ignored,
        "ignore_share": ignored / total if total else 0.0,
        "out_of_range_pixels": out_of_range,
        "classes": [
            {
                "id": i,
                "name": name,
                "pixels": int(class_pixels[i]),
                "share": int(class_pixels[i]) / labelled if labelled else 0.0,
                "images": int(images[i]),
            }
            for i, name in enumerate(manifest.classes)
        ],
        "image_size": {
            "height": {
                "min": int(heights.min()),
                "median": float(np.median(heights)),
                "max": int(heights.max()),
            },
            "width": {"min": int(widths.min()), "median": float(np.median(widths)), "max": int(widths.max())},
            "distinct": len(distinct),
            "most_common": [
                {"height": h, "width": w, "count": n} for (h, w), n in distinct.most_common(MOST_COMMON_SIZES)
            ],
        },
    }


def format_stats(stats: dict[str, Any]) -> str:
    """Human-readable multi-line rendering of ``shard_stats``'s result."""
    size = stats["image_size"]
    h, w = size["height"], size["width"]
    lines = [
        f"manifest: {stats['manifest']}",
        f"samples:  {stats['num_samples']} in {stats['num_shards']} shards",
        f"pixels:   {stats['pixels']} ({stats['ignore_pixels']} ignore = {100 * stats['ignore_share']:.2f}%"
        + (f", {stats['out_of_range_pixels']} out of range" if stats["out_of_range_pixels"] else "")
        + ")",
        f"height:   min {h['min']}  median {h['median']:g}  max {h['max']}",
        f"width:    min {w['min']}  median {w['median']:g}  max {w['max']}",
        f"sizes:    {size['distinct']} distinct; most common (HxW): "
        + ", ".join(f"{s['height']}x{s['width']} ({s['count']})" for s in size["most_common"]),
        "",
        f"{'id':>4}  {'class':<24} {'pixels':>14} {'share':>8} {'images':>8}",
    ]
    for c in stats["classes"]:
        lines.append(
            f"{c['id']:>4}  {c['name'][:24]:<24} {c['pixels']:>14} {100 * c['share']:>7.2f}% {c['images']:>8}"
        )
    return "\n".join(lines)
