"""Writing panoptic predictions: COCO-panoptic PNG + annotation, and overlay pictures.

``write_coco_panoptic`` is what a model's panoptic inference calls per image; the
annotations it returns, gathered into ``write_panoptic_json``, form a prediction set that
``python -m launcher eval-panoptic`` scores. ``panoptic_overlay_panel`` draws
[image | prediction | ground truth] for people, in ``launcher.overlay``'s class colours.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from launcher.overlay import IGNORE_COLOUR, blend, palette
from launcher.panoptic_quality import VOID, PanopticFormatError, id_to_rgb


def write_coco_panoptic(
    out_dir: str, image_id, file_name: str, id_map: np.ndarray, segments: Sequence[Mapping]
) -> dict:
    """Write ``id_map`` (H x W segment ids, 0 = unlabelled) as ``out_dir/<stem>.png`` and return
    its COCO-panoptic annotation. ``segments``: one dict per id (``id``, ``category_id``, any
    extra keys such as ``score`` are kept); ``area`` and ``bbox`` ([x, y, w, h]) are computed."""
    ids = np.asarray(id_map, dtype=np.int64)
    if ids.ndim != 2:
        raise PanopticFormatError(f"image_id {image_id}: id map must be H x W, got shape {ids.shape}")
    png_name = Path(file_name).with_suffix(".png").name
    present, counts = np.unique(ids, return_counts=True)
    area = dict(zip(present.tolist(), counts.tolist()))
    listed = {int(s["id"]) for s in segments}
    unlisted = sorted(set(area) - listed - {VOID})
    if unlisted:
        raise PanopticFormatError(
            f"{png_name} (image_id {image_id}): segment id {unlisted[0]} is in the map but not in segments"
        )
    out_segments = []
    for segment in segments:
        sid = int(segment["id"])
        if sid == VOID or sid not in area:
            raise PanopticFormatError(
                f"{png_name} (image_id {image_id}): segment id {sid} is "
                f"{'reserved for unlabelled pixels' if sid == VOID else 'not in the map'}"
            )
        rows, cols = np.nonzero((ids == sid).any(1))[0], np.nonzero((ids == sid).any(0))[0]
        bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        out_segments.append(
            {
                **segment,
                "id": sid,
                "category_id": int(segment["category_id"]),
                "iscrowd": int(segment.get("iscrowd", 0)),
                "area": int(area[sid]),
                "bbox": bbox,
            }
        )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Image.fromarray(id_to_rgb(ids)).save(Path(out_dir) / png_name)
    return {"image_id": image_id, "file_name": png_name, "segments_info": out_segments}


def write_panoptic_json(path: str, annotations: Sequence[Mapping], categories: Sequence[Mapping]) -> None:
    """The prediction JSON that goes with the PNGs of ``write_coco_panoptic``."""
    with open(path, "w") as f:
        json.dump({"annotations": list(annotations), "categories": list(categories)}, f)


def panoptic_colours(
    id_map: np.ndarray, segments: Sequence[Mapping], categories: Sequence[Mapping]
) -> np.ndarray:
    """H x W x 3 uint8: each segment in its category's palette colour, thing instances of one
    category shaded apart, boundaries between segments white, void / unlabelled black."""
    ids = np.asarray(id_map, dtype=np.int64)
    colours = palette(len(categories))
    index = {int(c["id"]): i for i, c in enumerate(categories)}
    things = {int(c["id"]) for c in categories if c.get("isthing")}
    out = np.zeros((*ids.shape, 3), dtype=np.uint8)
    out[:] = IGNORE_COLOUR
    seen: dict[int, int] = {}
    for segment in segments:
        category = int(segment["category_id"])
        colour = colours[index[category]].astype(np.int32) if category in index else np.array([128, 128, 128])
        if category in things:  # the k-th instance of a category is shifted in brightness
            k = seen.get(category, 0)
            seen[category] = k + 1
            colour = np.clip(colour + (-40, 40, -20, 20, 0)[k % 5], 0, 255)
        out[ids == int(segment["id"])] = colour
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge[1:, :] |= ids[1:, :] != ids[:-1, :]
    out[edge] = 255
    return out


def panoptic_overlay_panel(
    image: np.ndarray,
    pred_ids: np.ndarray,
    pred_segments: Sequence[Mapping],
    categories: Sequence[Mapping],
    gt_ids: np.ndarray | None = None,
    gt_segments: Sequence[Mapping] = (),
    min_side: int = 256,
) -> Image.Image:
    """[image | prediction overlay | ground-truth overlay], upscaled so small inputs stay visible."""
    panels = [image, blend(image, panoptic_colours(pred_ids, pred_segments, categories))]
    if gt_ids is not None:
        panels.append(blend(image, panoptic_colours(gt_ids, gt_segments, categories)))
    picture = Image.fromarray(np.concatenate(panels, axis=1))
    scale = max(1, int(np.ceil(min_side / image.shape[0])))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture
