"""``eval-panoptic``: PQ / SQ / RQ of COCO-panoptic predictions against ground truth.

Both sides are in COCO panoptic format: a JSON whose ``annotations`` give each image's
``image_id``, ``file_name`` (an RGB PNG in the matching folder, id = R + 256 G + 256^2 B)
and ``segments_info`` (``id``, ``category_id``, ground truth also ``iscrowd``), and, in the
ground-truth JSON, ``categories`` (``id``, ``name``, ``isthing``). Predictions are paired
with ground truth by ``image_id``: every ground-truth image needs one (else the score would
cover a subset); predictions for other images are skipped with a warning.

Anything that disagrees — an id in a PNG that its ``segments_info`` does not list (other
than ground-truth void 0 and prediction 0 = unlabelled), a listed id absent from its PNG, an
unknown category, PNG sizes that differ, a missing file — is a one-line
``PanopticFormatError`` naming the file and the id (exit code 2 from the command line).
The metric itself is ``launcher.panoptic_quality`` (the COCO panoptic API's rules);
``--workers`` splits the images over processes and sums their statistics.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from launcher.panoptic_quality import PanopticAccumulator, PanopticFormatError, format_table, rgb_to_id
from launcher.progress import plural
from ops.atomic_file import write_json_atomic

# (ground-truth PNG, its segments, prediction PNG, its segments, image id)
Pair = tuple[str, list, str, list, object]


def load_panoptic_json(path: str, what: str, need_categories: bool = False) -> dict:
    """Read and shape-check a COCO-panoptic JSON (one-line errors naming ``path``)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PanopticFormatError(f"{what} JSON {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PanopticFormatError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise PanopticFormatError(f"{path}: expected a COCO-panoptic JSON object with an 'annotations' list")
    for n, ann in enumerate(data["annotations"]):
        missing = [
            key
            for key in ("image_id", "file_name", "segments_info")
            if not isinstance(ann, dict) or key not in ann
        ]
        if missing:
            raise PanopticFormatError(f"{path}: annotations[{n}] has no {missing[0]!r}")
        for segment in ann["segments_info"]:
            for key in ("id", "category_id"):
                if not isinstance(segment, dict) or key not in segment:
                    raise PanopticFormatError(
                        f"{path}: a segment of image_id {ann['image_id']} has no {key!r}"
                    )
    if need_categories:
        categories = data.get("categories")
        if not isinstance(categories, list) or not categories:
            raise PanopticFormatError(f"{path}: no 'categories' list (each with id, name, isthing)")
        for category in categories:
            if not isinstance(category, dict) or "id" not in category or "isthing" not in category:
                raise PanopticFormatError(f"{path}: category {category!r} needs 'id' and 'isthing'")
    return data


def _by_image_id(data: dict, path: str) -> dict:
    out: dict = {}
    for ann in data["annotations"]:
        if ann["image_id"] in out:
            raise PanopticFormatError(f"{path}: image_id {ann['image_id']} has two annotations")
        out[ann["image_id"]] = ann
    return out


def pair_annotations(
    gt: dict, gt_json: str, gt_dir: str, pred: dict, pred_json: str, pred_dir: str
) -> tuple[list[Pair], int]:
    """(ground truth, prediction) per ground-truth image, and the count of unpaired predictions."""
    gt_by_id, pred_by_id = _by_image_id(gt, gt_json), _by_image_id(pred, pred_json)
    pairs: list[Pair] = []
    for image_id, ann in gt_by_id.items():
        if image_id not in pred_by_id:
            missing = sum(i not in pred_by_id for i in gt_by_id)
            # Ids of two numberings (COCO's ints against file-name stems) share none.
            hint = (f"; the two share no image_id: ground truth has e.g. {image_id!r}, predictions "
                    f"{next(iter(pred_by_id))!r}" if missing == len(gt_by_id) and pred_by_id else "")  # fmt: skip
            raise PanopticFormatError(
                f"{pred_json}: no prediction for image_id {image_id} (ground truth "
                f"{Path(gt_dir) / ann['file_name']}; {missing} of {len(gt_by_id)} "
                f"ground-truth images have none{hint})"
            )
        p = pred_by_id[image_id]
        pairs.append(
            (
                str(Path(gt_dir) / ann["file_name"]),
                ann["segments_info"],
                str(Path(pred_dir) / p["file_name"]),
                p["segments_info"],
                image_id,
            )
        )
    return pairs, len(set(pred_by_id) - set(gt_by_id))


def read_panoptic_png(path: str) -> np.ndarray:
    """An RGB COCO-panoptic PNG -> H x W int64 segment ids (one-line error naming the file)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode != "RGB":
                raise PanopticFormatError(
                    f"{path}: PIL mode {image.mode}, expected an RGB COCO-panoptic PNG "
                    "(id = R + 256 G + 256^2 B)"
                )
            return rgb_to_id(np.asarray(image))
    except FileNotFoundError:
        raise PanopticFormatError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise PanopticFormatError(f"{path}: cannot read as PNG: {err}") from None


def score_pair(acc: PanopticAccumulator, pair: Pair) -> None:
    gt_path, gt_segments, pred_path, pred_segments, image_id = pair
    gt_ids, pred_ids = read_panoptic_png(gt_path), read_panoptic_png(pred_path)
    if gt_ids.shape != pred_ids.shape:
        raise PanopticFormatError(
            f"{pred_path}: size {pred_ids.shape[1]}x{pred_ids.shape[0]} (W x H) differs "
            f"from its ground truth {gt_path} ({gt_ids.shape[1]}x{gt_ids.shape[0]})"
        )
    acc.update(
        gt_ids,
        gt_segments,
        pred_ids,
        pred_segments,
        gt_source=f"{gt_path} (image_id {image_id})",
        pred_source=f"{pred_path} (image_id {image_id})",
    )


def _score_chunk(args: tuple[Sequence[Mapping], list[Pair]]) -> tuple[np.ndarray, int]:
    categories, pairs = args
    acc = PanopticAccumulator(categories)
    for pair in pairs:
        score_pair(acc, pair)
    return acc.stats, len(pairs)


def accumulate(
    pairs: list[Pair], categories: Sequence[Mapping], workers: int = 1, progress: bool = True
) -> PanopticAccumulator:
    """Score every pair; with ``workers`` > 1 in a process pool over chunks of images."""
    acc = PanopticAccumulator(categories)
    bar = tqdm(total=len(pairs), desc="eval-panoptic", unit="image", disable=not progress, file=sys.stderr)
    with bar:
        if workers <= 1:
            for pair in pairs:
                score_pair(acc, pair)
                bar.update(1)
            return acc
        size = max(1, min(32, len(pairs) // (workers * 4)))
        chunks = [(categories, pairs[i : i + size]) for i in range(0, len(pairs), size)]
        with multiprocessing.get_context().Pool(workers) as pool:
            for stats, count in pool.imap_unordered(_score_chunk, chunks):
                acc.stats += stats
                bar.update(count)
    return acc


def evaluate_panoptic(
    gt_json: str, gt_dir: str, pred_json: str, pred_dir: str, workers: int = 1, progress: bool = True
) -> dict:
    """PQ / SQ / RQ (All, Things, Stuff, per class; in [0, 1]) plus image counts."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    for folder, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not Path(folder).is_dir():
            raise PanopticFormatError(f"{what} folder {folder} does not exist or is not a folder")
    gt = load_panoptic_json(gt_json, "ground-truth", need_categories=True)
    pred = load_panoptic_json(pred_json, "prediction")
    pairs, skipped = pair_annotations(gt, gt_json, gt_dir, pred, pred_json, pred_dir)
    if not pairs:
        raise PanopticFormatError(f"{gt_json}: no annotations to evaluate")
    if skipped:
        print(
            f"warning: {plural(skipped, 'prediction')} in {pred_json} without a ground-truth image skipped",
            file=sys.stderr,
        )
    acc = accumulate(pairs, gt["categories"], workers=workers, progress=progress)
    return {**acc.results(), "images": len(pairs), "skipped_predictions": skipped}


def eval_panoptic_command(
    gt_json: str, gt_dir: str, pred_json: str, pred_dir: str, json_path: str = "", workers: int = 1
) -> int:
    """Print the panopticapi table (PQ SQ RQ in %, N categories); optionally write ``json_path``."""
    results = evaluate_panoptic(
        gt_json, gt_dir, pred_json, pred_dir, workers=workers, progress=sys.stderr.isatty()
    )
    print(f"{results['images']} images ({pred_json} vs {gt_json})")
    print(format_table(results))
    if json_path:
        write_json_atomic(json_path, {"gt_json": gt_json, "pred_json": pred_json, **results})
    return 0
