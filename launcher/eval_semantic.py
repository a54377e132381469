"""``eval-semantic``: mIoU of a folder of predicted PNG label maps against ground truth.

Files are found recursively (``*.png``, any case) and matched by file stem, so a flat
prediction folder can be scored against a nested ground-truth tree; a stem that occurs
twice in one tree is an error. Every ground-truth map needs a prediction (else the score
would silently cover a subset); predictions without ground truth are skipped with a
warning (predicting a superset, e.g. val + test, is common and harmless).

Both maps must be single-channel index maps (PIL modes L, P, I, I;16; for P the palette
index is the label) of one size. ``reduce_zero_label`` (ADE20K: 0 -> ignore, others - 1)
applies to the ground truth only: predictions are expected in 0..K-1 already. Ground-truth
labels must be in [0, K) or the ignore index; prediction labels must be in [0, K) wherever
the ground truth is labelled (what they hold at ignored pixels never counts). All pixels of
all images go into one confusion matrix, so the mIoU is the dataset-level number.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data_pipeline.loader import reduce_zero_label as reduce_zero
from launcher.evaluate import ConfusionMatrix
from launcher.predict_record import RECORD_FILE
from launcher.progress import plural
from ops.atomic_file import write_json_atomic

INDEX_MODES = ("L", "P", "I", "I;16")


def find_label_maps(folder: str, what: str) -> dict[str, Path]:
    """Stem -> path of every PNG under ``folder`` (recursively)."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{what} folder {folder} does not exist or is not a folder")
    if (root / RECORD_FILE).is_file() or ((root / "labels").is_dir() and (root / "ground_truth").is_dir()
                                          and any(root.glob("*.png"))):
        # `launcher predict`'s output folder (its record, or its layout: overlays at the top,
        # labels/ and ground_truth/ beside them, all sharing stems).
        raise ValueError(f"{what} folder {folder} is a `launcher predict` output folder; pass "
                         f"--pred-dir {root / 'labels'} (and --gt-dir {root / 'ground_truth'})")
    found: dict[str, Path] = {}
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() == ".png" and p.is_file()):
        if path.stem in found:
            raise ValueError(f"{what} folder {folder}: two files share the stem {path.stem!r}: "
                             f"{found[path.stem]} and {path}")
        found[path.stem] = path
    if not found:
        raise ValueError(f"{what} folder {folder} holds no .png label maps")
    return found


def read_label_map(path: Path) -> np.ndarray:
    """A single-channel PNG -> int64 H×W array (one-line ValueError naming the file)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in INDEX_MODES:
                raise ValueError(f"{path}: PIL mode {image.mode}, expected a single-channel index map "
                                 f"(modes {', '.join(INDEX_MODES)}), not a colour image")
            return np.asarray(image).astype(np.int64)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: cannot read as PNG: {err}") from None


def score_pair(matrix: ConfusionMatrix, pred_path: Path, gt_path: Path, reduce_zero_label: bool) -> None:
    prediction, target = read_label_map(pred_path), read_label_map(gt_path)
    if prediction.shape != target.shape:
        raise ValueError(f"{pred_path}: size {prediction.shape[1]}x{prediction.shape[0]} (W x H) differs from "
                         f"its ground truth {gt_path} ({target.shape[1]}x{target.shape[0]})")
    k, ignore = matrix.num_classes, matrix.ignore_index
    target_t = torch.from_numpy(target)
    if reduce_zero_label:
        target_t = reduce_zero(target_t, ignore)
    bad = (target_t != ignore) & ((target_t < 0) | (target_t >= k))
    if bad.any():
        label = int(target_t[bad].max())
        after = " after --reduce-zero-label" if reduce_zero_label else ""
        zero = (", or do its labels run 1..K with 0 = other (ADE20K) and need --reduce-zero-label"
                if label == k and not reduce_zero_label else "")
        hint = f" (is --num-classes {k} too small{zero}?)"
        raise ValueError(f"{gt_path}: ground-truth label {label}{after} is outside [0, {k}) "
                         f"and not the ignore index {ignore}{hint}")
    prediction_t = torch.from_numpy(prediction)
    bad = (target_t != ignore) & ((prediction_t < 0) | (prediction_t >= k))
    if bad.any():
        raise ValueError(f"{pred_path}: predicted label {int(prediction_t[bad][0])} at a labelled pixel is "
                         f"outside [0, {k}) (is --num-classes {k} too small?)")
    # Values at ignored pixels are dropped by the matrix; zero them so none is out of range.
    matrix.update(prediction_t.masked_fill(target_t == ignore, 0), target_t)


def evaluate_label_folders(pred_dir: str, gt_dir: str, num_classes: int, ignore_index: int = 255,
                           reduce_zero_label: bool = False, progress: bool = True) -> dict:
    """Score every ground-truth map against its prediction; ``results()`` plus counts."""
    if num_classes < 1:
        raise ValueError(f"--num-classes must be >= 1, got {num_classes}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"--ignore-index {ignore_index} is a class index (num classes {num_classes})")
    predictions = find_label_maps(pred_dir, "prediction")
    targets = find_label_maps(gt_dir, "ground-truth")
    missing = [stem for stem in targets if stem not in predictions]
    if missing:
        raise ValueError(f"{targets[missing[0]]} has no prediction {missing[0]}.png in {pred_dir} "
                         f"({len(missing)} of {len(targets)} ground-truth maps have none)")
    extra = sorted(set(predictions) - set(targets))
    if extra:
        print(f"warning: {plural(len(extra), 'prediction')} in {pred_dir} without ground truth skipped "
              f"(e.g. {predictions[extra[0]]})", file=sys.stderr)
    matrix = ConfusionMatrix(num_classes, ignore_index)
    # One image's label maps are too small for intra-op threads to pay: on a loaded machine
    # their spin-waiting made each comparison ~40x slower (30 ms vs 0.7 ms on 256x256).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for stem in tqdm(sorted(targets), desc="eval-semantic", unit="image", disable=not progress,
                         file=sys.stderr):
            score_pair(matrix, predictions[stem], targets[stem], reduce_zero_label)
    finally:
        torch.set_num_threads(threads)
    return {**matrix.results(), "images": len(targets), "skipped_predictions": len(extra)}


def eval_semantic_command(pred_dir: str, gt_dir: str, num_classes: int, ignore_index: int = 255,
                          reduce_zero_label: bool = False, json_path: str = "") -> int:
    """Print per-class IoU, mIoU and pixel accuracy; optionally write them to ``json_path``."""
    results = evaluate_label_folders(pred_dir, gt_dir, num_classes, ignore_index, reduce_zero_label,
                                     progress=sys.stderr.isatty())
    print(f"{results['images']} images, {results['pixels']} labelled pixels ({pred_dir} vs {gt_dir})")
    for index, iou in enumerate(results["per_class_iou"]):
        print(f"  class {index:<4} IoU {'-' if iou is None else f'{iou:.4f}'}")
    print(f"mIoU {results['miou']:.4f} | pixel accuracy {results['pixel_accuracy']:.4f} | "
          f"mean accuracy {results['mean_accuracy']:.4f}")
    if json_path:
        write_json_atomic(json_path, {"pred_dir": pred_dir, "gt_dir": gt_dir, "reduce_zero_label": reduce_zero_label,
                                      **results})
    return 0
