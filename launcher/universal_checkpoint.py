"""Resuming on a different number of workers: DeepSpeed's universal checkpoints.

A ZeRO-1/2/3 checkpoint holds the optimizer state in one partition per rank, so it
loads only on the world size that wrote it. DeepSpeed's ``ds_to_universal`` rewrites it
as one file per parameter (fp32 weights and Adam moments), which any world size loads
with ``"checkpoint": {"load_universal": true}``. The driver does the conversion before
the workers start, once per checkpoint, into ``<checkpoint>/deepspeed_universal/``: it is
written to a temporary folder and renamed into place, so an interrupted conversion is
redone, never half-used. ZeRO-0 checkpoints hold whole states and need no conversion.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time

import torch

from launcher.checkpoint import DEEPSPEED_DIR, DEEPSPEED_TAG, CheckpointError, CheckpointMeta
from launcher.progress import plural

UNIVERSAL_DIR = "deepspeed_universal"


def needs_universal(meta: CheckpointMeta, world_size: int) -> bool:
    return meta.world_size != world_size and meta.zero_stage > 0


def universal_dir(checkpoint: str) -> str:
    """The folder to pass to ``engine.load_checkpoint`` (with tag ``DEEPSPEED_TAG``)."""
    return os.path.join(checkpoint, UNIVERSAL_DIR)


def ensure_universal(checkpoint: str, meta: CheckpointMeta, world_size: int) -> str:
    """Convert ``checkpoint`` for a resume on ``world_size`` workers if not done yet."""
    target = universal_dir(checkpoint)
    if os.path.isdir(os.path.join(target, DEEPSPEED_TAG)):
        return target
    written_by, converted_for = plural(meta.world_size, "worker"), plural(world_size, "worker")
    print(f"checkpoint {checkpoint} was written by {written_by} (ZeRO-{meta.zero_stage}); "
          f"converting it to DeepSpeed's universal format for {converted_for}", flush=True)
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    staging = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    workers = max(1, min(4, os.cpu_count() or 1))
    args = argparse.Namespace(
        input_folder=os.path.join(checkpoint, DEEPSPEED_DIR, DEEPSPEED_TAG),
        output_folder=os.path.join(staging, DEEPSPEED_TAG),
        num_extract_workers=workers, num_merge_workers=workers,
        keep_temp_folder=False, strict=True, inject_missing_state=False,
    )
    started = time.perf_counter()
    try:
        # DeepSpeed narrates each phase with its own prints and progress bars; they go to
        # stderr so the run's stdout stays one line per event.
        with contextlib.redirect_stdout(sys.stderr):
            ds_to_universal(args)
    except Exception as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"{checkpoint}: conversion to a universal checkpoint failed ({err})") from err
    os.replace(staging, target)
    print(f"converted in {time.perf_counter() - started:.1f} s -> {target}", flush=True)
    return target


def universal_for_load(checkpoint: str) -> str:
    """The converted folder a worker loads; a clear error when the driver did not convert."""
    target = universal_dir(checkpoint)
    if not os.path.isdir(os.path.join(target, DEEPSPEED_TAG)):
        raise CheckpointError(f"{checkpoint}: written by another number of workers and not converted "
                              f"({UNIVERSAL_DIR}/ missing); start the run through `python -m launcher train`, "
                              "which converts it")
    return target


def load_universal_checkpoint(engine, checkpoint: str) -> None:
    """Load ``checkpoint``'s universal form into ``engine`` (built with ``load_universal``).

    At ZeRO-3, DeepSpeed 0.19's universal load
    (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) gives every parameter group
    the hyperparameters of the checkpoint's *first* group — its weight decay (0 when that
    group holds the norms and biases), its name, its learning rate until the scheduler's
    next step — and one AdamW ``step`` tensor shared by every group, which torch's fused
    and foreach AdamW then advance once per group per step, so bias correction goes wrong.
    The groups' own hyperparameters are restored from the engine as this run built them,
    their learning rates from the loaded scheduler, and each group gets its own step.
    ZeRO-1/2 load per group and need none of this.
    """
    stage3 = engine.zero_optimization_stage() == 3
    groups = engine.optimizer.optimizer.param_groups if stage3 else []
    built = [{key: value for key, value in group.items() if key != "params"} for group in groups]
    engine.load_checkpoint(universal_for_load(checkpoint), tag=DEEPSPEED_TAG)
    if not stage3:
        return
    learning_rates = engine.lr_scheduler.get_last_lr() if engine.lr_scheduler is not None else None
    for index, (group, hyperparameters) in enumerate(zip(groups, built)):
        group.update(hyperparameters)
        if learning_rates is not None:
            group["lr"] = learning_rates[index]
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
