"""The DeepSpeed engine a worker trains: AdamW groups, schedule, config, ``initialize``.

Shared by the trainer (``launcher/train_loop.py``) and the ZeRO benchmark
(``benchmarks/zero_stages.py``), so the benchmark measures the engine runs get.
"""

from __future__ import annotations

import torch
from torch import nn

from launcher.build_lock import stale_build_lock_watchdog
from launcher.config import RunConfig
from launcher.deepspeed_config import build_deepspeed_config
from launcher.optim import build_optimizer, build_scheduler


def create_engine(cfg: RunConfig, model: nn.Module, load_universal: bool = False):
    """A DeepSpeed engine around ``model`` with the run's optimizer and lr schedule."""
    import deepspeed  # imported here: it initialises an accelerator at import time

    optimizer = build_optimizer(model, cfg.train, cfg.model.ops.apex)
    scheduler = build_scheduler(optimizer, cfg.train)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ds_config = build_deepspeed_config(
        cfg.train, cfg.data.batch_size, load_universal=load_universal, trainable_params=trainable
    )
    with stale_build_lock_watchdog():  # DeepSpeed loads its JIT-built ops here
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
    share_zero3_master_weights(engine)
    return engine


def share_zero3_master_weights(engine) -> int:
    """At ZeRO-3, let the optimizer update the fp32 parameter partitions in place instead
    of a second fp32 "master" copy of them; returns the bytes freed.

    Under torch autocast the partitions of the model's weights are fp32 already, and
    DeepSpeed 0.19 means to use them as the master weights (``_create_fp32_partitions``,
    and the comment in ``_reassign_or_swap_out_partitioned_parameters``), but it decides
    by comparing a ``torch.device`` with a device-name string, which is never equal: every
    worker keeps 4 bytes per parameter / world size more than needed. Pointing each master
    tensor at its partition's storage (same object, so the optimizer's state keys and
    DeepSpeed's attributes stay) restores the intent: the copy back after each step
    becomes a copy onto itself, which torch skips, and checkpoint loads that fill the
    master tensors fill the partitions. Only before training: both hold the same values
    then.
    """
    if engine.zero_optimization_stage() != 3:
        return 0
    optimizer = engine.optimizer
    freed = 0
    for low, master in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat):
        if (
            low is None
            or low.dtype != master.dtype
            or low.device != master.device
            or low.shape != master.shape
        ):
            continue  # 16-bit weights (fp16 training) or offloaded partitions: the copy is needed
        if low.untyped_storage().data_ptr() == master.untyped_storage().data_ptr():
            continue  # already shared (a DeepSpeed that compares devices correctly)
        if not torch.equal(low.view(torch.uint8), master.view(torch.uint8)):  # bitwise: padding may hold NaNs
            raise RuntimeError("ZeRO-3 master weights differ from the parameter partitions before training")
        freed += master.untyped_storage().nbytes()
        master.data = low.data
    return freed
