"""Panoptic members of a shard sample (``.pan.png`` ids + ``.json`` segments) in the
label space the model trains on, and the validation ground truth as COCO panoptic.

A shard sample stores its segment ids as a COCO-style RGB PNG (id = R + 256 G + 256^2 B,
0 = void) and ``segments_info`` whose ``category_id`` is already the contiguous class of
the manifest (``data_pipeline.formats.coco_panoptic``, ``data_pipeline.synthetic``). Here
the classes follow ``data.reduce_zero_label`` as the semantic labels do: stored class 0
becomes void (its segments' pixels are set to id 0 and the segments dropped) and every
other class shifts down by one. The categories (``id`` = training class, ``name``,
``isthing``) come from the manifest's ``classes`` and ``thing_classes``.

``export_panoptic_gt`` writes a split's ground truth as COCO panoptic (PNGs + JSON), so
``python -m launcher eval-panoptic`` can score the predictions ``python -m launcher
predict`` exports for a panoptic config. Both name files by the source image's stem; both
write the dataset's own image ids and category ids where the shards recorded them (COCO:
``image_id`` per sample, the manifest's ``category_ids``), so their files also pair with
the dataset's own annotation JSON; elsewhere the id is the stem and the training class.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_pipeline.loader_io import ShardReadError, ShardRef, read_shard
from data_pipeline.manifest import Manifest, training_classes
from data_pipeline.sample_encode import META_EXT, PANOPTIC_EXT, decode_panoptic, encode_panoptic
from data_pipeline.sample_members import describe_raw, output_stem, sample_image_id, sample_source


def panoptic_categories(manifest: Manifest, reduce_zero_label: bool) -> list[dict[str, Any]]:
    """COCO ``categories`` of the training classes: ``{"id": class, "name", "isthing"}``."""
    shift = 1 if reduce_zero_label else 0
    things = {int(t) - shift for t in manifest.thing_classes}
    return [
        {"id": c, "name": name, "isthing": int(c in things)}
        for c, name in enumerate(training_classes(manifest, reduce_zero_label))
    ]


def output_category_ids(manifest: Manifest, reduce_zero_label: bool) -> list[int] | None:
    """The category id each training class is written with in panoptic outputs: the
    dataset's own (the manifest's ``category_ids``), or None where the class index is it."""
    if not manifest.category_ids:
        return None
    return list(manifest.category_ids[1 if reduce_zero_label else 0 :])


def with_output_ids(
    annotations: list[dict[str, Any]], categories: list[dict[str, Any]], category_ids: list[int] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """COCO-panoptic ``annotations`` and ``categories`` in training classes -> the same with
    ``output_category_ids``' ids (unchanged where those are None)."""
    if category_ids is None:
        return annotations, categories
    annotations = [
        {**ann, "segments_info": [{**s, "category_id": category_ids[s["category_id"]]} for s in ann["segments_info"]]}
        for ann in annotations
    ]
    return annotations, [{**c, "id": category_ids[c["id"]]} for c in categories]


def training_segments(
    segments: list[dict[str, Any]], reduce_zero_label: bool, ignore_index: int = 255
) -> tuple[list[dict[str, Any]], list[int]]:
    """(segments in the training label space as ``{id, category_id, iscrowd, isthing}``,
    ids whose class becomes void: stored class 0 under ``reduce_zero_label``, or ignore)."""
    kept, void = [], []
    for segment in segments:
        category = int(segment["category_id"])
        if reduce_zero_label:
            category = ignore_index if category in (0, ignore_index) else category - 1
        if category == ignore_index:
            void.append(int(segment["id"]))
            continue
        kept.append({"id": int(segment["id"]), "category_id": category,
                     "iscrowd": int(segment.get("iscrowd", 0)), "isthing": bool(segment.get("isthing", False))})  # fmt: skip
    return kept, void


def decode_panoptic_members(
    raw: dict[str, Any],
    shape: tuple[int, int] | None = None,
    reduce_zero_label: bool = False,
    ignore_index: int = 255,
    num_classes: int | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A raw shard sample -> (int32 H x W segment ids, 0 = void; its training segments).

    ``shape`` is the sample's image size (checked when given); errors are ``ShardReadError`` naming shard and key.
    """
    if PANOPTIC_EXT not in raw or META_EXT not in raw:
        members = sorted(k for k in raw if not k.startswith("__"))
        raise ShardReadError(
            f"{describe_raw(raw)}: data.task=panoptic needs .{PANOPTIC_EXT} and .{META_EXT}, has {members}"
        )
    try:
        with Image.open(io.BytesIO(raw[PANOPTIC_EXT])) as image:
            rgb = np.asarray(image.convert("RGB"))
        segments = json.loads(raw[META_EXT])["segments_info"]
    except Exception as exn:
        raise ShardReadError(f"{describe_raw(raw)}: cannot decode the panoptic members: {exn}") from exn
    if shape is not None and rgb.shape[:2] != tuple(shape):
        raise ShardReadError(
            f"{describe_raw(raw)}: .{PANOPTIC_EXT} is {rgb.shape[:2]} but the image is {tuple(shape)} (H x W)"
        )
    ids = decode_panoptic(rgb).astype(np.int32)
    kept, void = training_segments(segments, reduce_zero_label, ignore_index)
    if num_classes is not None:
        bad = [s for s in kept if not 0 <= s["category_id"] < num_classes]
        if bad:
            raise ShardReadError(f"{describe_raw(raw)}: segment {bad[0]['id']} has class {bad[0]['category_id']} "
                                 f"outside 0..{num_classes - 1}")  # fmt: skip
    if void:
        ids[np.isin(ids, void)] = 0
    return ids, kept


def export_panoptic_gt(
    manifest: Manifest, out_dir: str, reduce_zero_label: bool = False, ignore_index: int = 255
) -> tuple[str, str]:
    """Write every sample of ``manifest`` as ``out_dir/panoptic/<name>.png`` plus
    ``out_dir/panoptic.json`` (annotations, categories); ``<name>`` is the source image's
    stem, or the sample key where none was recorded, as ``launcher predict`` names its
    predictions (``output_stem``); the image id is the recorded one, else ``<name>``.
    Returns (JSON path, PNG folder)."""
    png_dir = Path(out_dir) / "panoptic"
    png_dir.mkdir(parents=True, exist_ok=True)
    annotations = []
    used: set[str] = set()
    first = 0
    for info, path in zip(manifest.shards, manifest.shard_paths()):
        for raw in read_shard(ShardRef(path=path, num_samples=info.num_samples, first_index=first)):
            ids, segments = decode_panoptic_members(raw, None, reduce_zero_label, ignore_index)
            key = output_stem(sample_source(raw), raw["__key__"], used)
            Image.fromarray(encode_panoptic(ids)).save(png_dir / f"{key}.png")
            present = set(np.unique(ids).tolist())
            image_id = sample_image_id(raw)
            annotations.append({"image_id": key if image_id is None else image_id, "file_name": f"{key}.png",
                                "segments_info": [s for s in segments if s["id"] in present]})  # fmt: skip
        first += info.num_samples
    json_path = Path(out_dir) / "panoptic.json"
    annotations, categories = with_output_ids(annotations, panoptic_categories(manifest, reduce_zero_label),
                                              output_category_ids(manifest, reduce_zero_label))  # fmt: skip
    json_path.write_text(json.dumps({"annotations": annotations, "categories": categories}))
    return str(json_path), str(png_dir)
