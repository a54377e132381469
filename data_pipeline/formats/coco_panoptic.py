"""COCO panoptic: ``annotations/panoptic_<split>2017.json`` + its PNG folder + the JPEGs.

Categories sorted by COCO id become contiguous classes 0..132 (the manifest's label
values); each segment keeps its id, ``iscrowd``, ``bbox`` and ``area``, with
``category_id`` rewritten to the contiguous class (``coco_category_id`` keeps the
original; the manifest's ``category_ids`` list them per class and every sample records
its COCO ``image_id``, so panoptic outputs pair with COCO's own JSON). The semantic map derived from the PNG puts void (id 0) and crowd regions at
255, as panoptic training does. ``load`` is a small picklable object that re-reads the
JSON once per process (cached), so ``workers > 1`` does not ship the whole annotation
file to the pool with every task. The JSON decides what is sharded; images it lists
without an annotation and files in the image or PNG folder it does not name are left out
with a warning naming them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.formats.common import (
    IGNORE,
    FormatError,
    FormatSample,
    read_image,
    require_dir,
    require_file,
    warn,
)
from data_pipeline.formats.paired import limit
from data_pipeline.shard_state import plural
from data_pipeline.shard_writer import Source, decode_panoptic


@dataclass(frozen=True)
class _Annotations:
    classes: list[str]
    thing_classes: list[int]
    contiguous: dict[int, int]  # COCO category id -> class index
    # (image file, panoptic png file, segments_info, COCO image id), sorted by image file name
    samples: list[tuple[str, str, list[dict[str, Any]], Any]]
    unannotated: list[str]  # image files the JSON lists without an annotation


def _get(item: dict[str, Any], key: str, path: Path, where: str) -> Any:
    if not isinstance(item, dict) or key not in item:
        raise FormatError(f"{path}: {where} has no {key!r}")
    return item[key]


@lru_cache(maxsize=4)
def _read_annotations(json_path: str) -> _Annotations:
    path = Path(json_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exn:
        raise FormatError(f"{path}: not valid JSON: {exn}") from None
    categories = sorted(
        _get(data, "categories", path, "the file"), key=lambda c: _get(c, "id", path, "category")
    )
    if not categories:
        raise FormatError(f"{path}: no categories")
    contiguous = {int(c["id"]): i for i, c in enumerate(categories)}
    classes = [str(_get(c, "name", path, f"category {c['id']}")) for c in categories]
    things = [i for i, c in enumerate(categories) if _get(c, "isthing", path, f"category {c['id']}")]
    images = {_get(im, "id", path, "image"): _get(im, "file_name", path, "image")
              for im in _get(data, "images", path, "the file")}  # fmt: skip
    samples = []
    for ann in _get(data, "annotations", path, "the file"):
        image_id = _get(ann, "image_id", path, "annotation")
        if image_id not in images:
            raise FormatError(f"{path}: annotation {ann.get('file_name')} names unknown image_id {image_id}")
        samples.append((images[image_id], _get(ann, "file_name", path, "annotation"),
                        _get(ann, "segments_info", path, f"annotation {ann['file_name']}"), image_id))  # fmt: skip
    samples.sort(key=lambda s: s[0])
    unannotated = sorted(set(images.values()) - {s[0] for s in samples})
    return _Annotations(classes, things, contiguous, samples, unannotated)


@dataclass(frozen=True)
class CocoPanopticLoader:
    """Picklable ``load(index)``: the JSON path and folders, not the parsed annotations."""

    json_path: str
    image_dir: str
    png_dir: str

    def __call__(self, index: int) -> FormatSample:
        ann = _read_annotations(self.json_path)
        image_file, png_file, infos, image_id = ann.samples[index]
        image_path, png_path = Path(self.image_dir) / image_file, Path(self.png_dir) / png_file
        require_file(image_path, f"image of {png_file}")
        require_file(png_path, f"panoptic PNG of {image_file}")
        image, data, ext = read_image(image_path)
        rgb, _, _ = read_image(png_path)  # panoptic PNGs are RGB-encoded ids
        if rgb.shape != image.shape:
            raise FormatError(
                f"{png_path}: panoptic PNG is {rgb.shape[1]}x{rgb.shape[0]} (WxH) but its image is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        panoptic = decode_panoptic(rgb)
        semantic = np.full(panoptic.shape, IGNORE, dtype=np.uint8)
        segments = []
        for info in infos:
            seg_id, cat = int(info["id"]), int(info["category_id"])
            if cat not in ann.contiguous:
                raise FormatError(
                    f"{self.json_path}: {png_file}: segment {seg_id} has unknown category_id {cat}"
                )
            cls = ann.contiguous[cat]
            crowd = int(info.get("iscrowd", 0))
            if not crowd:
                semantic[panoptic == seg_id] = cls
            segments.append({**info, "id": seg_id, "category_id": cls, "coco_category_id": cat,
                             "iscrowd": crowd, "isthing": cls in ann.thing_classes})  # fmt: skip
        known = {s["id"] for s in segments} | {0}
        stray = sorted(set(np.unique(panoptic).tolist()) - known)
        if stray:
            raise FormatError(f"{png_path}: segment ids {stray[:5]} are not in its segments_info")
        return FormatSample(image, semantic, panoptic, segments, image_bytes=data, image_ext=ext,
                            source_name=image_path.stem, image_id=image_id)


def _warn_left_out(json_path: Path, ann: _Annotations, image_dir: Path, png_dir: Path) -> None:
    """Name what is in the tree but will not be sharded (the JSON is what counts)."""
    if ann.unannotated:
        warn(f"{json_path}: left out {plural(len(ann.unannotated), 'listed image')} without a panoptic annotation: "
             f"{', '.join(ann.unannotated)}")  # fmt: skip
    for folder, named in ((image_dir, {s[0] for s in ann.samples} | set(ann.unannotated)),
                          (png_dir, {s[1] for s in ann.samples})):  # fmt: skip
        extra = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in named)
        if extra:
            warn(f"{folder}: left out {plural(len(extra), 'file')} that {json_path.name} does not name: "
                 f"{', '.join(extra)}")  # fmt: skip


def coco_panoptic_source(root: str | os.PathLike[str], split: str, num_samples: int | None = None) -> Source:
    """``ROOT/annotations/panoptic_<folder>.json``, ``.../panoptic_<folder>/``, ``ROOT/<folder>/``.

    ``split`` train/val means the 2017 folders (``train2017``/``val2017``); any other
    value is used as the folder name.
    """
    folder = {"train": "train2017", "val": "val2017"}.get(split, split)
    base = require_dir(Path(root), "COCO root")
    json_path = require_file(
        base / "annotations" / f"panoptic_{folder}.json", "COCO panoptic annotation file"
    )
    png_dir = require_dir(base / "annotations" / f"panoptic_{folder}", "COCO panoptic PNG")
    image_dir = require_dir(base / folder, f"COCO {split} images")
    ann = _read_annotations(str(json_path.resolve()))
    if not ann.samples:
        raise FormatError(f"{json_path}: no annotations")
    _warn_left_out(json_path, ann, image_dir, png_dir)
    count = len(limit(ann.samples, num_samples))
    return Source(
        format="coco_panoptic",
        classes=list(ann.classes),
        num_samples=count,
        load=CocoPanopticLoader(str(json_path.resolve()), str(image_dir), str(png_dir)),
        thing_classes=list(ann.thing_classes),
        category_ids=sorted(ann.contiguous, key=ann.contiguous.__getitem__),
        options={
            "root": str(root),
            "split_folder": folder,
            "labels": "categories sorted by id -> 0..N-1; void and crowd 255 in .seg.png",
            "reduce_zero_label": False,
        },  # fmt: skip
    )
