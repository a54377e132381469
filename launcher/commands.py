"""The ``train``, ``eval`` and ``predict`` commands (argument handling lives in cli.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from data_pipeline.manifest import load_manifest, training_classes
from launcher.checkpoint import META_FILE, CheckpointError, load_model_weights, read_meta, resolve_checkpoint
from launcher.config import ConfigError, RunConfig, config_from_dict, default_run_name, load_config
from launcher.interrupt import run_unless_interrupted
from launcher.preflight import inside_ray_job, model_differences, state_mismatches
from launcher.progress import plural
from launcher.typed_config import merge, parse_override, to_dict
from ops.atomic_file import write_json_atomic

if TYPE_CHECKING:
    import torch

# The models (timm, torchvision) and the evaluation code are imported by the commands that
# use them: `train` runs neither in this process, and starts Ray sooner without them.


def resume_hint(cfg: RunConfig) -> str:
    """How to resume a run that stopped: the same run name and output folder, through the
    config the driver saved in the run folder (the run name, absolute paths, every --set)
    once it got that far, else through the same command with the run name."""
    saved = os.path.join(cfg.train.output_dir, cfg.train.run_name, "config.yaml")
    if os.path.isfile(saved):
        hint = f"resume it with: python -m launcher train --config {saved}"
    else:  # stopped before the driver wrote it (or the output folder is remote)
        hint = f"resume it with the same command and --set train.run_name={cfg.train.run_name}"
    if inside_ray_job():  # this driver is a Ray job's entrypoint
        hint += (f" (on the head node; from elsewhere, submit the job again with --set "
                 f"train.run_name={cfg.train.run_name} and the same train.output_dir)")
    return hint


def train_command(config_path: str, overrides: list[str], address: str) -> int:
    from data_pipeline.loader_io import ShardReadError
    from launcher.driver import TrainingFailed, run_training

    cfg = load_config(config_path, overrides)
    cfg.train.run_name = cfg.train.run_name or default_run_name(config_path)
    if address:
        cfg.cluster.address = address
    try:
        outcome = run_unless_interrupted(lambda: run_training(cfg), lambda: resume_hint(cfg))
    except TrainingFailed as err:
        print(f"error: {err}", flush=True)
        if ShardReadError.__name__ in err.causes:  # resuming alone would stop at the same sample
            manifests = " and ".join(dict.fromkeys(p for p in (cfg.data.train_manifest, cfg.data.val_manifest) if p))
            # Under skip the failure was one skipping cannot pass (validation, or every sample bad).
            skip = "" if cfg.data.on_error == "skip" else (
                " (or, for a training shard, set data.on_error=skip to train past unreadable samples)")
            print(f"the data is at fault: `python -m data_pipeline verify` of {manifests} checks every shard; "
                  f"write the bad one again{skip}, then", flush=True)
        print(resume_hint(cfg), flush=True)
        return 1
    if outcome is None:
        return 130
    if outcome.trained:
        summary = ", ".join(f"{k} {v:.4f}" for k, v in outcome.metrics.items() if isinstance(v, float))
        print(f"run {cfg.train.run_name} finished in {outcome.seconds:.0f} s ({summary})")
    print(f"checkpoint: {outcome.checkpoint}")
    return 0


def load_weights_into(model: torch.nn.Module, directory: str, cfg: RunConfig, config_source: str = "") -> None:
    """The checkpoint's weights into ``model``, or one line saying why they do not fit:
    the first parameter that differs and the model settings behind it. ``config_source``
    names the --config / --set model.* that chose the model; empty: the checkpoint's own
    config did, so the model code itself differs from the one that trained it."""
    state = load_model_weights(directory)
    mismatches = state_mismatches(state, model.state_dict())
    if mismatches:
        first, count = mismatches[0], len(mismatches)
        differences = model_differences(read_meta(directory).config.get("model", {}), to_dict(cfg.model))
        settings = f"; settings unlike the checkpoint's: {differences}" if differences else ""
        tensors = plural(count, "mismatched tensor")
        if config_source:
            why = (f"{tensors}){settings}; without --config and --set model.* the config the checkpoint was "
                   "trained with is used")
        else:
            config_source = "the checkpoint's own config"
            why = f"{tensors}); the model code differs from the segscale that trained it"
        raise CheckpointError(f"{directory}: weights do not fit the model of {config_source} ({first}; {why}")
    model.load_state_dict(state, strict=True)


def load_for_inference(config_path: str, overrides: list[str], checkpoint: str,
                       check: Callable[[RunConfig], None] | None = None) -> tuple[RunConfig, torch.nn.Module, str]:
    """The run config, the model with the checkpoint's weights, and the checkpoint folder.

    The config is ``--config`` when given, else the resolved config the checkpoint was
    trained with; ``--set`` overrides apply to either. Without ``--checkpoint`` the
    latest checkpoint of the config's run (``train.run_name``) is used. ``check(cfg)``
    runs once the config is known, before the model is built and its weights read.
    """
    cfg = load_config(config_path, overrides) if config_path else None
    if not checkpoint:
        if cfg is None or not cfg.train.run_name:
            raise ConfigError("give --checkpoint (a checkpoint or run folder), or --config with train.run_name set")
        checkpoint = os.path.join(cfg.train.output_dir, cfg.train.run_name)
    directory = resolve_checkpoint(checkpoint)
    if cfg is None:
        data = read_meta(directory).config
        for text in overrides:
            data = merge(data, parse_override(text))
        cfg = config_from_dict(data, source=os.path.join(directory, META_FILE))
    if check is not None:
        check(cfg)
    if cfg.cluster.keep_freed_memory:
        from ops.host_allocator import configure_process

        # eval and predict run here, on the CPU, and keep freed memory as a CPU worker does
        # (each forward re-allocates what the last one freed; MaskFormer Swin-T's forwards
        # at 512 ran 15-20 % faster, at the same peak: benchmarks/RESULTS.md): with glibc,
        # since this process has started, unless its user started it with jemalloc.
        print(f"host memory: {configure_process()}", flush=True)
    from model.build import build_model

    model = build_model(cfg.model)
    model_sets = [o for o in overrides if o.startswith("model.")]
    source = config_path or ("the checkpoint's config with " + " ".join(f"--set {o}" for o in model_sets)
                             if model_sets else "")
    load_weights_into(model, directory, cfg, source)
    model.eval()
    return cfg, model, directory


def eval_command(config_path: str, overrides: list[str], checkpoint: str, json_path: str) -> int:
    cfg, model, directory = load_for_inference(config_path, overrides, checkpoint)
    if cfg.data.task == "panoptic":
        return _panoptic_eval(cfg, model, directory, json_path)
    from launcher.evaluate import evaluate_on_validation

    results = evaluate_on_validation(cfg, model)
    classes = training_classes(load_manifest(cfg.data.val_manifest), cfg.data.reduce_zero_label)
    print(f"checkpoint {directory} (step {read_meta(directory).step}) on {cfg.data.val_manifest}")
    for name, iou in zip(classes, results["per_class_iou"]):
        print(f"  {name:<24} IoU {'-' if iou is None else f'{iou:.4f}'}")
    print(f"mIoU {results['miou']:.4f} | pixel accuracy {results['pixel_accuracy']:.4f} | "
          f"mean accuracy {results['mean_accuracy']:.4f} | {results['pixels']} pixels")
    if json_path:
        write_json_atomic(json_path, {"checkpoint": directory, "classes": classes, **results})
    return 0


def predict_command(config_path: str, overrides: list[str], checkpoint: str, out: str, num: int) -> int:
    def check_num(cfg: RunConfig) -> None:
        if num < 1 and cfg.data.task != "panoptic":  # panoptic: 0 = predictions without overlays
            raise ConfigError(f"--num {num}: expected a number of images >= 1")

    cfg, model, directory = load_for_inference(config_path, overrides, checkpoint, check_num)
    out_dir = out or os.path.join(os.path.dirname(directory), "predictions")
    if cfg.data.task == "panoptic":
        from launcher.panoptic_eval import write_panoptic_predictions

        json_path, count, overlays = write_panoptic_predictions(cfg, model, out_dir, num)
        print(f"wrote {count} COCO-panoptic predictions ({json_path}, PNGs in {out_dir}/panoptic) and "
              f"{overlays} overlays (image | prediction | ground truth) to {out_dir}/overlays")
        return 0
    from launcher.predict import write_predictions

    written = write_predictions(cfg, model, out_dir, num)
    print(f"wrote {len(written)} overlays (image | prediction | ground truth) to {out_dir}, their label maps "
          f"(classes 0..{cfg.model.num_classes - 1}) to {os.path.join(out_dir, 'labels')} and the ground truth to "
          f"{os.path.join(out_dir, 'ground_truth')}: eval-semantic --pred-dir {os.path.join(out_dir, 'labels')} "
          f"--gt-dir {os.path.join(out_dir, 'ground_truth')} --num-classes {cfg.model.num_classes} scores them")
    return 0


def _panoptic_eval(cfg: RunConfig, model: torch.nn.Module, directory: str, json_path: str) -> int:
    """``eval`` of a ``data.task: panoptic`` config: the PQ table, per-class PQ, --json."""
    from launcher.panoptic_eval import evaluate_panoptic_on_validation, summary_line
    from launcher.panoptic_quality import format_table

    results = evaluate_panoptic_on_validation(cfg, model)
    print(f"checkpoint {directory} (step {read_meta(directory).step}) on {cfg.data.val_manifest}")
    for c in results["per_class"]:
        kind = "thing" if c["isthing"] else "stuff"
        numbers = f"PQ {c['pq']:.4f} SQ {c['sq']:.4f} RQ {c['rq']:.4f}" if c["counted"] else "-"
        print(f"  {c['name']:<24} {kind}  {numbers}")
    print(format_table(results))
    print(summary_line(results))
    if json_path:
        write_json_atomic(json_path, {"checkpoint": directory, **results})
    return 0
