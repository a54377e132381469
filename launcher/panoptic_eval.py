"""Panoptic evaluation and export of a model on the validation shards (``data.task: panoptic``).

The inference rule follows ``model.name``: the MaskFormer family (``maskformer``) runs
MaskFormer's panoptic rule (``model.panoptic_inference.panoptic_from_outputs``, thing /
stuff from the manifest's categories), ``panoptic_segformer`` its mask-wise merging
(``model.panoptic_segformer.panoptic_segformer_panoptic``, thing classes from its config).
PFT (one query per class) and UN-EPT (per-pixel classifier) have no instance outputs: a
panoptic evaluation of them is refused with a one-line error.

Each image is predicted once at its stored size (images of one size in a batch share a
forward); ``model.inference``'s resizing, sliding window and test-time augmentation are
semantic-only and refused here. Under distributed validation each rank scores its own
slice of the shards (``build_eval_loader``) into a ``PanopticAccumulator`` whose
statistics are all-reduced once at the end; under ZeRO-3 every rank runs the same number
of forwards (``launcher.evaluate.in_lockstep`` across batches, padding passes within).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from data_pipeline.loader import build_eval_loader
from data_pipeline.manifest import load_manifest
from data_pipeline.panoptic import output_category_ids, panoptic_categories, with_output_ids
from data_pipeline.sample_members import output_stem
from launcher.config import RunConfig
from launcher.deepspeed_config import autocast_dtype
from launcher.evaluate import in_lockstep, validation_batches
from launcher.panoptic_export import panoptic_overlay_panel, write_coco_panoptic, write_panoptic_json
from launcher.panoptic_quality import PanopticAccumulator
from model.config import InferenceConfig, ModelConfig
from model.panoptic_inference import Segments, panoptic_from_outputs
from model.panoptic_segformer import panoptic_segformer_panoptic, split_classes
from model.tta import max_across_ranks

PANOPTIC_MODELS = ("maskformer", "panoptic_segformer")


def check_panoptic_model(cfg: ModelConfig) -> None:
    """Refuse models without panoptic inference, and semantic-only inference settings."""
    if cfg.name not in PANOPTIC_MODELS:
        raise ValueError(f"data.task=panoptic: model.name={cfg.name} has no panoptic inference "
                         f"(supported: {', '.join(PANOPTIC_MODELS)})")  # fmt: skip
    if cfg.inference != InferenceConfig():
        raise ValueError(
            "data.task=panoptic predicts each image once at its stored size: model.inference "
            "(short_side, max_size, window_size, scales, flip) is semantic-only, leave it at its defaults"
        )


def _categories(cfg: RunConfig) -> list[dict]:
    categories = panoptic_categories(load_manifest(cfg.data.val_manifest), cfg.data.reduce_zero_label)
    if len(categories) != cfg.model.num_classes:
        raise ValueError(f"{cfg.data.val_manifest} has {len(categories)} training classes but "
                         f"model.num_classes is {cfg.model.num_classes}")  # fmt: skip
    return categories


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def predict_panoptic(model: nn.Module, images: torch.Tensor, image_sizes: Sequence[Sequence[int]],
                     cfg: ModelConfig, is_thing: Sequence[bool],
                     sync_passes: bool = False) -> list[tuple[torch.Tensor, Segments]]:  # fmt: skip
    """``images`` B×3×H×W (0..255, padded bottom/right) -> one ``(id_map, segments)`` per
    image at its own ``image_sizes`` entry; ``sync_passes``: as many forwards on every rank."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, (height, width) in enumerate(image_sizes):
        groups.setdefault((int(height), int(width)), []).append(index)
    target = max_across_ranks(len(groups)) if sync_passes else len(groups)
    results: list = [None] * images.shape[0]
    x = images.float()
    inputs = x
    for (height, width), indices in groups.items():
        inputs = x[indices, :, :height, :width]
        outputs = model(inputs)
        if cfg.name == "panoptic_segformer":
            things, stuff = split_classes(cfg.panoptic_segformer.thing_classes, cfg.num_classes)
            per_image = panoptic_segformer_panoptic(outputs, (height, width), things, stuff, cfg.panoptic)
        else:
            per_image = panoptic_from_outputs(outputs, (height, width), is_thing, cfg.panoptic)
        for index, result in zip(indices, per_image):
            results[index] = result
    for _ in range(target - len(groups)):  # ZeRO-3: join the other ranks' parameter gathers
        model(inputs)
    return results


def _ground_truth(batch: dict, b: int) -> tuple[torch.Tensor, list[dict]]:
    """Image ``b``'s id map at its own size and the segments present in it."""
    height, width = batch["image_sizes"][b]
    ids = batch["panoptic"][b, :height, :width]
    present = set(torch.unique(ids).tolist())
    return ids, [s for s in batch["segments"][b] if s["id"] in present]


@torch.no_grad()
def evaluate_panoptic_model(model: nn.Module, batches: Iterable[dict], categories: Sequence[dict],
                            cfg: ModelConfig, dtype: torch.dtype | None = None,
                            device: torch.device | str = "cpu", lockstep: bool = False) -> PanopticAccumulator:  # fmt: skip
    """This rank's PQ statistics of ``model`` over ``batches`` (the eval loader's, with
    ``panoptic`` and ``segments``); ``all_reduce()`` them for the dataset's."""
    check_panoptic_model(cfg)
    accumulator = PanopticAccumulator(categories)
    is_thing = [bool(c["isthing"]) for c in categories]
    device = torch.device(device)
    was_training = model.training
    model.eval()
    stream = in_lockstep(batches) if lockstep else ((batch, True) for batch in batches)
    try:
        for batch, is_real in stream:
            with _autocast(device, dtype):
                predictions = predict_panoptic(model, batch["images"].to(device), batch["image_sizes"], cfg,
                                               is_thing, sync_passes=lockstep)  # fmt: skip
            if not is_real:
                continue
            for b, (ids, segments) in enumerate(predictions):
                gt_ids, gt_segments = _ground_truth(batch, b)
                key = batch["keys"][b]
                accumulator.update(gt_ids, gt_segments, ids.cpu(), segments, gt_source=f"ground truth of {key}",
                                   pred_source=f"prediction of {key}")  # fmt: skip
    finally:
        model.train(was_training)
    return accumulator


def panoptic_validation(cfg: RunConfig, model: nn.Module, rank: int = 0, world_size: int = 1,
                        dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                        batches: Iterable[dict] | None = None) -> dict:  # fmt: skip
    """PQ / SQ / RQ (All, Things, Stuff, per class) of ``model`` on ``data.val_manifest``,
    every rank scoring its own slice (``batches``: the whole set, in one process); the
    statistics are summed over ranks."""
    if batches is None:
        batches = build_eval_loader(cfg.data, rank, world_size)
    accumulator = evaluate_panoptic_model(model, batches, _categories(cfg), cfg.model, dtype, device,
                                          lockstep=cfg.train.zero_stage == 3)  # fmt: skip
    accumulator.all_reduce()
    return accumulator.results()


def evaluate_panoptic_on_validation(cfg: RunConfig, model: nn.Module) -> dict:
    """Single-process panoptic evaluation (``launcher eval``), with progress."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return panoptic_validation(cfg, model, dtype=autocast_dtype(cfg.train), batches=validation_batches(cfg, "eval"))


def summary_line(results: dict) -> str:
    """``PQ 0.4123 (SQ 0.7, RQ 0.5; things PQ 0.3, stuff PQ 0.6)``."""
    a, t, s = results["All"], results["Things"], results["Stuff"]
    return (f"PQ {a['pq']:.4f} (SQ {a['sq']:.4f}, RQ {a['rq']:.4f}; things PQ {t['pq']:.4f}, "
            f"stuff PQ {s['pq']:.4f})")  # fmt: skip


@torch.no_grad()
def write_panoptic_predictions(
    cfg: RunConfig, model: nn.Module, out_dir: str, num: int
) -> tuple[str, int, int]:
    """COCO-panoptic predictions of every validation image (``out_dir/panoptic/<name>.png``
    and ``out_dir/panoptic.json``) and [image | prediction | ground truth] overlays of the
    first ``num`` (``out_dir/overlays/<name>.png``). ``<name>`` is the source image's stem,
    as ``export-panoptic`` names the ground truth (``output_stem``); image and category ids
    are the dataset's own where the shards recorded them (``data_pipeline.panoptic``).
    Returns (JSON path, predictions, overlays)."""
    check_panoptic_model(cfg.model)
    categories = _categories(cfg)
    is_thing = [bool(c["isthing"]) for c in categories]
    device, dtype = torch.device("cpu"), autocast_dtype(cfg.train)
    png_dir, overlay_dir = os.path.join(out_dir, "panoptic"), os.path.join(out_dir, "overlays")
    os.makedirs(overlay_dir, exist_ok=True)
    annotations, overlays = [], 0
    used: set[str] = set()
    model.eval()
    for batch in validation_batches(cfg, "predict"):
        with _autocast(device, dtype):
            predictions = predict_panoptic(model, batch["images"], batch["image_sizes"], cfg.model, is_thing)
        for b, (ids, segments) in enumerate(predictions):
            key, image_id = output_stem(batch["sources"][b], batch["keys"][b], used), batch["image_ids"][b]
            ids_np = ids.cpu().numpy().astype(np.int64)
            image_id = key if image_id is None else image_id  # the dataset's own (COCO's) where recorded
            annotations.append(write_coco_panoptic(png_dir, image_id, f"{key}.png", ids_np, segments))
            if overlays < num:
                height, width = batch["image_sizes"][b]
                image = batch["images"][b, :, :height, :width].permute(1, 2, 0).numpy()
                gt_ids, gt_segments = _ground_truth(batch, b)
                panel = panoptic_overlay_panel(
                    image, ids_np, segments, categories, gt_ids.numpy(), gt_segments
                )
                panel.save(os.path.join(overlay_dir, f"{key}.png"))
                overlays += 1
    json_path = os.path.join(out_dir, "panoptic.json")
    category_ids = output_category_ids(load_manifest(cfg.data.val_manifest), cfg.data.reduce_zero_label)
    write_panoptic_json(json_path, *with_output_ids(annotations, categories, category_ids))
    return json_path, len(annotations), overlays
