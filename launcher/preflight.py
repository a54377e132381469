"""Checks a run's config against its data and its own checkpoints before Ray starts.

Everything that can be known on the driver is checked here, so bad input is a one-line
``ConfigError`` in a second instead of a worker traceback a minute into start-up: the
manifests exist and agree with the model's class count, the lr schedule fits the run, the
precision fits the hardware, the model builds and its pretrained file fits, paths make
sense for where the driver runs, and a resumed run's checkpoint is complete (and converted,
for another world size, by the driver).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from data_pipeline.loader import DataConfigError, resolve_manifest
from data_pipeline.manifest import Manifest, check_shard_size, training_classes
from launcher.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    damaged_checkpoints,
    find_latest_checkpoint,
    newest_verified_checkpoint,
    verify_checkpoint,
)
from launcher.config import ConfigError, RunConfig, TrainConfig, config_from_dict
from launcher.deepspeed_config import build_deepspeed_config
from launcher.environment import worker_env_vars
from launcher.fault_injection import ENV_VAR as FAULT_ENV_VAR
from launcher.fault_injection import parse_fault
from launcher.progress import plural
from launcher.typed_config import to_dict
from ops import cpu_native

# Set by Ray's job supervisor in the environment of a `ray job submit` entrypoint.
RAY_JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def inside_ray_job() -> bool:
    return RAY_JOB_ENV_VAR in os.environ


def _is_remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def check_paths_for_job(raw: RunConfig, in_job: bool | None = None) -> None:
    """Inside ``ray job submit`` the working dir is a temporary copy: relative paths would
    put checkpoints where they are garbage-collected and name data no other node has.

    ``in_job`` defaults to whether this process is a job; ``submit`` passes True to refuse
    such paths before it uploads anything."""
    if not (inside_ray_job() if in_job is None else in_job):
        return
    for key, value in (("train.output_dir", raw.train.output_dir), ("data.train_manifest", raw.data.train_manifest),
                       ("data.val_manifest", raw.data.val_manifest)):
        if value and not os.path.isabs(value) and not _is_remote(value):
            raise ConfigError(f"{key}: {value!r} is relative; inside a Ray job it would resolve into the job's "
                              "temporary working dir. Give an absolute path on storage every node sees")


def check_run(cfg: RunConfig) -> None:
    """Validate a resolved (absolute-path) config; raises ConfigError naming the key.
    Each value's own range was checked when the config loaded (the sections' RULES); what
    is left depends on several keys, the machine or the files."""
    train = cfg.train
    check_lr_schedule(train)
    try:
        parse_fault(os.environ.get(FAULT_ENV_VAR, ""))  # a drill's typo fails here, not at step 1
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:  # host_allocator: jemalloc where it is not installed fails here, not in every worker
        worker_env_vars(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:  # SEGSCALE_NATIVE_OPS=off fails here, not at every worker's first convolution
        cpu_native.enabled()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.data.task == "panoptic":
        from launcher.panoptic_eval import check_panoptic_model  # heavy imports only when needed

        try:
            check_panoptic_model(cfg.model)  # else the run would fail at its first validation
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if _is_remote(train.output_dir):
        raise ConfigError(f"train.output_dir: {train.output_dir!r}: object storage is not supported yet; "
                          "use a local folder or a shared file system path (NFS)")
    try:
        build_deepspeed_config(train, cfg.data.batch_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_manifests(cfg)
    check_model(cfg)


def check_model(cfg: RunConfig) -> None:
    """The model builds (backbone name, ``timm_kwargs``, decoder sizes) and its pretrained
    file exists and fits the backbone: on the ``meta`` device, reading only the file's keys
    and shapes, in a few seconds (timm's import most of them), where a worker would
    otherwise fail a minute into start-up with a traceback per rank."""
    from model.backbone import Backbone  # heavy imports (timm) only here
    from model.build import build_meta_model
    from model.pretrained import match_pretrained

    try:
        model = build_meta_model(cfg.model)
        if cfg.model.backbone.pretrained_path:
            for module in model.modules():
                if isinstance(module, Backbone):
                    match_pretrained(module.body, cfg.model.backbone.pretrained_path, shapes_only=True)
    except (ValueError, OSError) as err:
        raise ConfigError(str(err)) from None


def check_lr_schedule(train: TrainConfig) -> None:
    """The step schedule's steps and factor, and the lr multipliers, make sense
    (``launcher.optim``)."""
    for fragment, mult in train.lr_multipliers.items():
        if not fragment or not mult > 0:
            raise ConfigError(f"train.lr_multipliers: expected a non-empty name fragment -> a positive "
                              f"multiplier, got {fragment!r}: {mult}")  # fmt: skip
    steps, schedule = train.lr_steps, train.lr_schedule
    if schedule == "poly":
        if steps:
            raise ConfigError(f"train.lr_steps: {steps} is set but train.lr_schedule is 'poly', which ignores it; "
                              "set train.lr_schedule=step to decay at these steps")
        return
    if not steps:
        raise ConfigError("train.lr_steps: train.lr_schedule=step needs at least one step, got []")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ConfigError(f"train.lr_steps: expected strictly increasing steps, got {steps}")
    if steps[0] <= 0 or steps[-1] >= train.max_steps:
        raise ConfigError(f"train.lr_steps: expected steps in (0, train.max_steps={train.max_steps}), got {steps}")
    if steps[0] < train.warmup_steps:
        raise ConfigError(f"train.lr_steps: step {steps[0]} falls inside the warm-up "
                          f"(train.warmup_steps={train.warmup_steps}); decay steps come after it")
    if not 0 < train.lr_step_factor <= 1:
        raise ConfigError(f"train.lr_step_factor: expected a value in (0, 1], got {train.lr_step_factor}")


def check_manifests(cfg: RunConfig) -> None:
    """Both manifests load (the loader's own checks) and match the model's class count."""
    for key in ("train_manifest", "val_manifest"):
        try:
            manifest = resolve_manifest(cfg.data, key)
        except DataConfigError as err:
            raise ConfigError(str(err)) from None
        # Evaluation never skips a bad sample (a metric over a shrunken set would mislead).
        check_shard_sizes(manifest, key, tolerate=key == "train_manifest" and cfg.data.on_error == "skip")
        classes = training_classes(manifest, cfg.data.reduce_zero_label)
        if len(classes) != cfg.model.num_classes:
            reduced = " after data.reduce_zero_label" if cfg.data.reduce_zero_label else ""
            raise ConfigError(f"model.num_classes: {cfg.model.num_classes}, but data.{key} {manifest.path} has "
                              f"{len(classes)} classes{reduced}")


def check_shard_sizes(manifest: Manifest, key: str, tolerate: bool) -> None:
    """Every shard file exists with the size its manifest recorded (a stat each; ``data_pipeline
    verify`` also checks the sha256 and every sample). A shard cut short would otherwise
    stop the run where a worker reaches it, or, tolerated (training shards under
    ``data.on_error=skip``), silently lose the rest of it: there it is a warning."""
    for shard, path in zip(manifest.shards, manifest.shard_paths()):
        problem = check_shard_size(shard, path)
        if problem is None:
            continue
        message = (f"data.{key}: shard {path}: {problem}; `python -m data_pipeline verify {manifest.path}` "
                   "checks them all")
        if not tolerate:
            raise ConfigError(message)
        print(f"warning: {message}; data.on_error=skip drops the samples that cannot be read", flush=True)


def check_resume(cfg: RunConfig, run_dir: str) -> str | None:
    """The checkpoint the workers will resume from (or None): the newest verified one of
    the run folder and ``train.resume_from``, as ``train_loop`` chooses. An explicit
    ``resume_from`` that is not a complete checkpoint is an error, not a silent skip."""
    if cfg.train.resume_from:
        if not os.path.isdir(cfg.train.resume_from):
            raise ConfigError(f"train.resume_from: {cfg.train.resume_from}: no such checkpoint folder")
        try:
            verify_checkpoint(cfg.train.resume_from)
        except CheckpointError as err:
            raise ConfigError(f"train.resume_from: {err}") from None
    chosen = newest_verified_checkpoint([find_latest_checkpoint(run_dir), cfg.train.resume_from])
    _report_damaged(cfg, run_dir, chosen)
    return chosen


def _report_damaged(cfg: RunConfig, run_dir: str, chosen: str | None) -> None:
    """Say which of the run's checkpoints are passed over, and refuse to start the run over
    from step 0 when one of them was complete once: a checkpoint that lost a file (a
    partial copy, a cleanup, a full disk) must not silently cost the run, and once new
    checkpoints come Ray Train deletes it."""
    damaged = damaged_checkpoints(run_dir)
    if chosen is not None and os.path.dirname(chosen) == run_dir:  # older ones do not matter
        damaged = [entry for entry in damaged if os.path.basename(entry[0]) > os.path.basename(chosen)]
    for directory, err, _sealed in damaged:
        print(f"warning: checkpoint {directory} is not used: {str(err).removeprefix(directory + ': ')}", flush=True)
    sealed = [(directory, err) for directory, err, was_sealed in damaged if was_sealed]
    if chosen is None and sealed:
        directory, err = sealed[-1]
        raise ConfigError(f"train.run_name={cfg.train.run_name}: no complete checkpoint to resume from, and the run "
                          f"would start over from step 0: {err}. Restore the file, or set train.resume_from to "
                          "another checkpoint, or move the run's checkpoint_* folders away to start over")


def _flatten(data: dict, prefix: str) -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def model_differences(trained: dict, used: dict, limit: int = 4) -> str:
    """``model.x=1 (checkpoint: 2), ...``: the model keys where ``used`` departs from the
    config the checkpoint was trained with."""
    before, after = _flatten(trained, "model."), _flatten(used, "model.")
    changed = [f"{k}={after[k]!r} (checkpoint: {before[k]!r})" for k in after if k in before and before[k] != after[k]]
    return ", ".join(changed[:limit]) + (f" and {len(changed) - limit} more" if len(changed) > limit else "")


def _tensor_mismatches(trained: dict, cfg: RunConfig) -> list[str]:
    """How the weights of the model that ``trained`` (a checkpoint's model section)
    builds differ from ``cfg.model``'s, first difference first; both built on the meta
    device, so nothing is read from the checkpoint."""
    from model.build import build_meta_model

    theirs = build_meta_model(config_from_dict({"model": trained}, source="checkpoint config").model).state_dict()
    return state_mismatches(theirs, build_meta_model(cfg.model).state_dict())


def state_mismatches(checkpoint: Mapping[str, Any], model: Mapping[str, Any]) -> list[str]:
    """How a checkpoint's state dict differs from a model's, shapes first, then the
    model's tensors the checkpoint lacks, then the checkpoint's the model lacks."""
    shapes = [f"{k} is {list(v.shape)} in the checkpoint, {list(model[k].shape)} here"
              for k, v in checkpoint.items() if k in model and tuple(v.shape) != tuple(model[k].shape)]
    return (shapes + [f"{k} is not in the checkpoint" for k in model if k not in checkpoint]
            + [f"the checkpoint's {k} is not in the model" for k in checkpoint if k not in model])


def check_resume_fits(cfg: RunConfig, directory: str, meta: CheckpointMeta, key: str) -> None:
    """The checkpoint the workers would load fits this config: the same model weights and
    ZeRO stage. Otherwise each worker fails a minute into start-up inside DeepSpeed's load
    (a size-mismatch line per tensor, or a bare AssertionError for another stage), and the
    failed run's resume hint names a config that fails the same way. ``key`` is the
    setting that chose the checkpoint (train.run_name or train.resume_from)."""
    where = f"checkpoint {directory} (step {meta.step}, chosen by {key})"
    instead = "no train.resume_from" if key == "train.resume_from" else "another train.run_name"
    trained = meta.config.get("model") if isinstance(meta.config, dict) else None
    if isinstance(trained, dict) and trained != to_dict(cfg.model):
        try:
            mismatches = _tensor_mismatches(trained, cfg)
        except (ConfigError, ValueError, OSError):
            mismatches = []  # written by another segscale: DeepSpeed's own load decides
        if mismatches:
            differences = model_differences(trained, to_dict(cfg.model))
            settings = f"; settings unlike the checkpoint's: {differences}" if differences else ""
            raise ConfigError(f"model: {where} does not fit this config's model ({mismatches[0]}; "
                              f"{plural(len(mismatches), 'mismatched tensor')}){settings}. Use the checkpoint's "
                              f"model settings, or {instead} to train this model from scratch")
    # ZeRO-1 and 2 share DeepSpeed's optimizer and its state layout; 0 and 3 have their own.
    if meta.zero_stage != cfg.train.zero_stage and {meta.zero_stage, cfg.train.zero_stage} != {1, 2}:
        allowed = "1 or 2" if meta.zero_stage in (1, 2) else str(meta.zero_stage)
        raise ConfigError(f"train.zero_stage: {cfg.train.zero_stage}, but {where} holds "
                          f"ZeRO-{meta.zero_stage} state, which DeepSpeed cannot load at another stage; set "
                          f"train.zero_stage={allowed} to resume it")
