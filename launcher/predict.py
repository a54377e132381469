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

import itertools
import os

import numpy as np
import torch
from PIL import Image

from data_pipeline.sample_members import output_stem
from launcher.config import RunConfig
from launcher.deepspeed_config import autocast_dtype
from launcher.evaluate import validation_batches
from launcher.overlay import overlay_panel
from launcher.predict_record import clear_previous, write_record
from model.tta import predict_semantic_scores


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
    batches = validation_batches(cfg, "predict", limit=num)
    first = next(batches, None)  # the data is readable before the last predict's files go
    clear_previous(out_dir, (out_dir, labels_dir, truth_dir))
    written: list[str] = []
    used: set[str] = set()  # names go in before their files are written
    dtype = autocast_dtype(cfg.train)
    model.eval()
    try:
        for batch in itertools.chain([first] if first is not None else [], batches):
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
                    return written
    finally:  # also after Ctrl-C: the next predict here removes what this one wrote
        write_record(out_dir, used)
    return written


def save_label_map(labels: np.ndarray, path: str) -> None:
    """An H×W class-index map as a single-channel PNG: 8-bit up to 256 classes, else 16-bit."""
    if labels.max(initial=0) < 256:
        Image.fromarray(labels.astype(np.uint8), mode="L").save(path)
    else:
        Image.fromarray(labels.astype(np.uint16)).save(path)  # PIL mode I;16
