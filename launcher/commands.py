"""The ``train``, ``eval`` and ``predict`` commands (argument handling lives in cli.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from data_pipeline.loader import build_eval_loader
from data_pipeline.manifest import load_manifest
from launcher.checkpoint import CheckpointError, find_latest_checkpoint, load_model_weights, read_meta
from launcher.config import RunConfig, config_from_dict, load_config
from launcher.evaluate import evaluate
from launcher.overlay import overlay_panel
from launcher.typed_config import merge, parse_override
from model.build import build_model
from model.inference import semantic_segmentation


def train_command(config_path: str, overrides: list[str], address: str) -> int:
    from launcher.driver import TrainingFailed, run_training

    cfg = load_config(config_path, overrides)
    if address:
        cfg.cluster.address = address
    try:
        outcome = run_training(cfg)
    except TrainingFailed as err:
        print(f"error: {err}", flush=True)
        print(f"resume it with: python -m launcher train --config {config_path} "
              f"--set train.run_name={cfg.train.run_name}", flush=True)
        return 1
    summary = ", ".join(f"{k} {v:.4f}" for k, v in outcome.metrics.items() if isinstance(v, float))
    print(f"run {cfg.train.run_name} finished in {outcome.seconds:.0f} s ({summary})")
    print(f"checkpoint: {outcome.checkpoint}")
    return 0


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder as given, or a run folder's latest verified checkpoint."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    if os.path.exists(os.path.join(path, "segscale_checkpoint.json")):
        return path
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: no verified checkpoint in this run folder")
    return latest


def load_for_inference(config_path: str, overrides: list[str], checkpoint: str) -> tuple[RunConfig, torch.nn.Module, str]:
    """The run config, the model with the checkpoint's weights, and the checkpoint folder.

    The config is ``--config`` when given, else the resolved config the checkpoint was
    trained with; ``--set`` overrides apply to either.
    """
    if not checkpoint:
        if not config_path:
            raise CheckpointError("give --checkpoint (a checkpoint or run folder) or --config with train.run_name set")
        cfg = load_config(config_path, overrides)
        checkpoint = os.path.join(cfg.train.output_dir, cfg.train.run_name)
    directory = resolve_checkpoint(checkpoint)
    if config_path:
        cfg = load_config(config_path, overrides)
    else:
        data = read_meta(directory).config
        for text in overrides:
            data = merge(data, parse_override(text))
        cfg = config_from_dict(data, source=os.path.join(directory, "segscale_checkpoint.json"))
    model = build_model(cfg.model)
    missing, unexpected = model.load_state_dict(load_model_weights(directory), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{directory}: weights do not fit model.{cfg.model.name} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return cfg, model, directory


def _autocast_dtype(cfg: RunConfig) -> torch.dtype | None:
    return torch.bfloat16 if cfg.train.precision == "bf16" else None


def run_evaluation(cfg: RunConfig, model: torch.nn.Module) -> dict:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    matrix = evaluate(model, build_eval_loader(cfg.data, 0, 1), cfg.model.num_classes, cfg.data.ignore_index,
                      autocast_dtype=_autocast_dtype(cfg))
    return matrix.results()


def eval_command(config_path: str, overrides: list[str], checkpoint: str, json_path: str) -> int:
    cfg, model, directory = load_for_inference(config_path, overrides, checkpoint)
    results = run_evaluation(cfg, model)
    classes = load_manifest(cfg.data.val_manifest).classes
    print(f"checkpoint {directory} (step {read_meta(directory).step}) on {cfg.data.val_manifest}")
    for name, iou in zip(classes, results["per_class_iou"]):
        print(f"  {name:<24} IoU {'-' if iou is None else f'{iou:.4f}'}")
    print(f"mIoU {results['miou']:.4f} | pixel accuracy {results['pixel_accuracy']:.4f} | "
          f"mean accuracy {results['mean_accuracy']:.4f} | {results['pixels']} pixels")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"checkpoint": directory, **results}, f, indent=2)
    return 0


def write_predictions(cfg: RunConfig, model: torch.nn.Module, out_dir: str, num: int) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    written: list[str] = []
    dtype = _autocast_dtype(cfg)
    with torch.no_grad():
        for batch in build_eval_loader(cfg.data, 0, 1):
            images = batch["images"]
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                outputs = model(images)
            predictions = semantic_segmentation(outputs, images.shape[-2:])
            for image, prediction, target, key in zip(images, predictions, batch["semantic"], batch["keys"]):
                panel = overlay_panel(image.permute(1, 2, 0).numpy(), prediction.numpy(),
                                      target.numpy().astype(np.int64), cfg.model.num_classes, cfg.data.ignore_index)
                path = os.path.join(out_dir, f"{key}.png")
                panel.save(path)
                written.append(path)
                if len(written) >= num:
                    return written
    return written


def predict_command(config_path: str, overrides: list[str], checkpoint: str, out: str, num: int) -> int:
    cfg, model, directory = load_for_inference(config_path, overrides, checkpoint)
    out_dir = out or os.path.join(os.path.dirname(directory), "predictions")
    written = write_predictions(cfg, model, out_dir, num)
    print(f"wrote {len(written)} overlays (image | prediction | ground truth) to {out_dir}")
    return 0
