"""Predictions of validation images: overlay PNGs drawn for people, the predicted label
maps (``labels/<name>.png``, classes 0..K-1) and the ground truth as the model is scored
against it (``ground_truth/<name>.png``: after ``data.reduce_zero_label``, ignore pixels at
``data.ignore_index``), so that ``eval-semantic --pred-dir OUT/labels --gt-dir
OUT/ground_truth`` scores the predictions as ``eval`` does, or other tools can.

``<name>`` is the stem of the sample's source image (``ADE_val_00000001``) as the shards
record it, so for datasets whose label files share their image's stem (ADE20K, Pascal
Context, the folder format) ``labels/`` also pairs with the dataset's own annotations
(``eval-semantic --gt-dir .../annotations/validation``; not Cityscapes or COCO-Stuff,
whose label files are named and numbered otherwise). Shards written before sources were
recorded, and synthetic data, have none and use the sample key (``val_00000000``)."""

from __future__ import annotations

import glob
import json
import os
from contextlib import suppress

import numpy as np
import torch
from PIL import Image

from data_pipeline.sample_members import output_stem
from launcher.config import RunConfig
from launcher.deepspeed_config import autocast_dtype
from launcher.evaluate import validation_batches
from launcher.overlay import overlay_panel
from launcher.progress import plural
from model.tta import predict_semantic_scores
from ops.atomic_file import write_json_atomic

# The names the last predict into a folder wrote (see _clear_previous_predictions).
PREDICT_RECORD = "predict.json"


def _clear_previous_predictions(out_dir: str, folders: tuple[str, ...]) -> None:
    """Remove what the last ``predict`` into ``out_dir`` wrote, as its record lists: a run
    that draws fewer or other images must not leave the earlier maps beside its own, for
    ``eval-semantic`` over ``labels/`` would score them as this checkpoint's. PNGs no record
    lists are someone else's: kept, and named in a warning."""
    record = os.path.join(out_dir, PREDICT_RECORD)
    if os.path.isfile(record):
        try:
            with open(record) as f:
                names = [n for n in json.load(f)["names"] if isinstance(n, str) and os.sep not in n]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{record}: unreadable record of the last predict here ({err}); remove it and "
                             f"the PNGs of {out_dir} it listed") from None
        for name in names:
            for folder in folders:
                with suppress(FileNotFoundError):
                    os.remove(os.path.join(folder, f"{name}.png"))
        os.remove(record)
    others = sorted(p for folder in folders[1:] for p in glob.glob(os.path.join(folder, "*.png")))
    if others:
        print(f"warning: {plural(len(others), 'PNG')} in {out_dir}/labels and ground_truth were not written by "
              f"a predict (e.g. {others[0]}): kept, and eval-semantic over these folders scores them too",
              flush=True)


@torch.no_grad()
def write_predictions(cfg: RunConfig, model: torch.nn.Module, out_dir: str, num: int) -> list[str]:
    """Write ``num`` PNGs [image | prediction | ground truth] of the first validation images
    to ``out_dir``, their predicted label maps to ``out_dir/labels`` and their ground truth
    to ``out_dir/ground_truth``; returns the overlays."""
    if num < 1:
        raise ValueError(f"--num {num}: expected a number of images >= 1")
    labels_dir, truth_dir = os.path.join(out_dir, "labels"), os.path.join(out_dir, "ground_truth")
    os.makedirs(labels_dir, exist_ok=True)
    os.makedirs(truth_dir, exist_ok=True)
    _clear_previous_predictions(out_dir, (out_dir, labels_dir, truth_dir))
    written: list[str] = []
    used: set[str] = set()
    try:
        _predict_into(cfg, model, out_dir, num, used, written)
    finally:  # also after Ctrl-C: the next predict here removes what this one wrote
        write_json_atomic(os.path.join(out_dir, PREDICT_RECORD), {"names": sorted(used)})
    return written


def _predict_into(cfg: RunConfig, model: torch.nn.Module, out_dir: str, num: int, used: set[str],
                  written: list[str]) -> None:
    """``write_predictions``' loop: names go into ``used`` before their files are written."""
    labels_dir, truth_dir = os.path.join(out_dir, "labels"), os.path.join(out_dir, "ground_truth")
    dtype = autocast_dtype(cfg.train)
    model.eval()
    for batch in validation_batches(cfg, "predict", limit=num):
        images = batch["images"]
        names = [output_stem(source, key, used) for source, key in zip(batch["sources"], batch["keys"])]
        sizes = batch.get("image_sizes") or [tuple(images.shape[-2:])] * len(images)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            predictions = predict_semantic_scores(model, images, cfg.model.inference, cfg.model.name,
                                                  image_sizes=sizes).argmax(1)
        for image, prediction, target, name, (height, width) in zip(images, predictions, batch["semantic"],
                                                                     names, sizes):
            # Each image at its own size: the batch padding is no part of it.
            panel = overlay_panel(image[:, :height, :width].permute(1, 2, 0).numpy(),
                                  prediction[:height, :width].numpy(),
                                  target[:height, :width].numpy().astype(np.int64), cfg.model.num_classes,
                                  cfg.data.ignore_index)
            path = os.path.join(out_dir, f"{name}.png")
            panel.save(path)
            save_label_map(prediction[:height, :width].numpy(), os.path.join(labels_dir, f"{name}.png"))
            save_label_map(target[:height, :width].numpy(), os.path.join(truth_dir, f"{name}.png"))
            written.append(path)
            if len(written) >= num:
                return


def save_label_map(labels: np.ndarray, path: str) -> None:
    """An H×W class-index map as a single-channel PNG: 8-bit up to 256 classes, else 16-bit."""
    if labels.max(initial=0) < 256:
        Image.fromarray(labels.astype(np.uint8), mode="L").save(path)
    else:
        Image.fromarray(labels.astype(np.uint16)).save(path)  # PIL mode I;16
