"""Process environment shared by the driver, the workers and ``make install``.

DeepSpeed JIT-compiles its CPU ops (the shared-memory communication op at the first
``deepspeed.initialize``, ~25 s) into ``TORCH_EXTENSIONS_DIR``. Pointing every process at
one persistent cache means the build happens once per machine (``make install`` does it
ahead of time) instead of at the start of every run.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ops.host_allocator import MALLOC_ENV_VARS, worker_allocator_env

if TYPE_CHECKING:
    from launcher.config import RunConfig


def torch_extensions_dir() -> str:
    """``TORCH_EXTENSIONS_DIR``, else one cache per Python environment: torch rebuilds an
    op whenever its source path changes, so two checkouts (two virtualenvs) sharing one
    folder would rebuild it (~25 s) every time they take turns."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    environment = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~"), ".cache", "segscale", "torch_extensions", environment)


# Settings a user sets where they type the command that every process of the run must
# share: the driver hands them to its workers, and ``submit`` to the job it starts.
# Malloc settings (glibc's MALLOC_MMAP_THRESHOLD_ ... and GLIBC_TUNABLES, jemalloc's
# MALLOC_CONF; an allocator reads them when a process starts, so they must be in the
# worker's environment from the start, as Ray's runtime_env puts them): e.g. a fixed mmap
# threshold returns freed tensors above it to the OS, so a CPU worker's resident memory
# follows its live tensors, for more step time (README "Troubleshooting"). A worker that
# finds glibc's leaves malloc to them (ops/host_allocator.py), on a cluster as on a local
# instance.
USER_ENV_VARS = ("OMP_NUM_THREADS", *MALLOC_ENV_VARS, "SEGSCALE_FAULT", "SEGSCALE_NATIVE_OPS")


# What a local Ray instance started by the driver runs with, unless the user has set it.
# Ray Train's controller polls its workers every 2 s by default, so noticing that the group
# started or finished waits up to one interval each; on a machine of our own the poll is
# cheap, and 0.5 s took ~6 s off each short local run (48-51 s -> 43 s for
# configs/test_tiny.yaml). The controller is a process of that instance, so the driver
# sets these before ray.init; clusters keep their own settings.
LOCAL_INSTANCE_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def runtime_env_vars(use_gpu: bool = False, zero_stage: int = 0, cpu_allocator: str | None = None) -> dict[str, str]:
    """Environment variables every Ray worker of a run gets. ``cpu_allocator``
    (``cluster.host_allocator``; None: malloc as the process starts) is the host allocator
    CPU workers start with: jemalloc must be preloaded into a process as it starts.
    Raises ValueError for ``jemalloc`` where it is not installed."""
    env = {
        "TORCH_EXTENSIONS_DIR": torch_extensions_dir(),
        # Ray Train V2 re-routes print() through the root logger, which DeepSpeed also
        # writes to: every progress line would reach the driver twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if zero_stage == 3:
        # ZeRO-3 fetches partitioned parameters in module hooks, which non-reentrant
        # activation checkpointing (timm's default) breaks; reentrant recomputation works.
        env["TIMM_REENTRANT_CKPT"] = "1"
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # skips DeepSpeed's accelerator probe and its warning
    # Pass through settings a user set on the driver that workers must share.
    for name in ("RAY_AUTH_MODE", *USER_ENV_VARS):
        if name in os.environ:
            env[name] = os.environ[name]
    if not use_gpu and cpu_allocator:
        env.update(worker_allocator_env(cpu_allocator))
    return env


def worker_env_vars(cfg: RunConfig) -> dict[str, str]:
    """``runtime_env_vars`` of a run's workers, from its config."""
    cluster = cfg.cluster
    return runtime_env_vars(cluster.use_gpu, cfg.train.zero_stage,
                            cluster.host_allocator if cluster.keep_freed_memory else None)


def setup_process_environment() -> None:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips DeepSpeed's probe and its warning
    # Ray Train V2 is the default in Ray 2.60, and resume-by-run-name relies on it: V1
    # would restart a re-run from step 0. Pin it whatever the environment says.
    os.environ["RAY_TRAIN_V2_ENABLED"] = "1"


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_loopback_gloo_group(rank: int, world_size: int, port: int, zero_stage: int = 0) -> None:
    """Join a gloo process group on 127.0.0.1:``port`` with what a Ray Train worker of a
    run has: its environment (``runtime_env_vars``) and the rank variables DeepSpeed
    reads. For benchmarks and tests that run the trainer's engine without Ray."""
    import torch.distributed as dist

    setup_process_environment()
    os.environ.update(runtime_env_vars(zero_stage=zero_stage))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)


def build_deepspeed_ops() -> list[str]:
    """JIT-build the DeepSpeed CPU ops a run needs into the cache; returns their names."""
    setup_process_environment()
    from deepspeed.accelerator import get_accelerator

    from launcher.build_lock import stale_build_lock_watchdog

    built = []
    for builder_name in ("ShareMemCommBuilder",):
        builder = get_accelerator().create_op_builder(builder_name)
        if builder is None or not builder.is_compatible():
            continue
        with stale_build_lock_watchdog():
            builder.load(verbose=False)
        built.append(builder.NAME)
    return built


@contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """``os.environ`` with ``values`` for the block only (None: unset), restored after, so
    that this process's later commands and tests inherit nothing from it."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        _assign(values)
        yield
    finally:
        _assign(saved)


def _assign(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
