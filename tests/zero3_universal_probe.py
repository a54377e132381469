"""Run by tests/test_engine.py in fresh processes (2 gloo ranks): a ZeRO-3 run trains 2
steps, checkpoints and trains 2 more; a second engine resumes the checkpoint through its
universal form (``launcher.universal_checkpoint``) and trains the same 2 steps. Rank 0
prints one JSON line comparing the two."""

import json
import os
import shutil
import sys
import tempfile

import ops.torchvision_fix  # noqa: F401  (before anything imports timm)

# isort: split
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from zero3_master_probe import batch  # tests/ is on sys.path when run as a script

from launcher.checkpoint import read_meta, save_checkpoint
from launcher.config import load_config
from launcher.engine import create_engine
from launcher.environment import free_loopback_port, join_loopback_gloo_group
from launcher.universal_checkpoint import ensure_universal, load_universal_checkpoint
from model.build import build_criterion, build_model

WORLD = 2


def train_step(engine, criterion, num_classes: int, step: int) -> float:
    images, targets = batch(num_classes, step)
    loss = sum(criterion(engine(images), targets).values())
    engine.backward(loss)
    engine.step()
    return loss.item()


def hyperparameters(engine) -> list[dict]:
    return [
        {key: value for key, value in group.items() if key != "params"}
        for group in engine.optimizer.optimizer.param_groups
    ]


def steps(engine) -> list[float]:
    return [float(state["step"]) for state in engine.optimizer.optimizer.state.values() if "step" in state]


def rank_main(rank: int, port: int, work: str) -> None:
    join_loopback_gloo_group(rank, WORLD, port, zero_stage=3)
    torch.set_num_threads(1)
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "test_tiny.yaml")
    # Weight decay and a warm-up: both visible in the next steps if a group loses them.
    cfg = load_config(
        config,
        [
            "train.zero_stage=3",
            "train.precision=bf16",
            "train.lr=0.01",
            "train.weight_decay=0.5",
            "train.warmup_steps=3",
            "data.batch_size=2",
        ],
    )
    criterion = build_criterion(cfg.model)
    classes = cfg.model.num_classes

    torch.manual_seed(0)
    first = create_engine(cfg, build_model(cfg.model))
    for step in range(2):
        train_step(first, criterion, classes, step)
    checkpoint = os.path.join(work, "checkpoint")
    save_checkpoint(first, os.path.join(work, f"rank{rank}"), step=2, rank=rank, world_size=WORLD, config={})
    dist.barrier()
    if rank == 0:  # Ray would merge the ranks' folders into one; here rank 1's goes into rank 0's
        shutil.copytree(os.path.join(work, "rank1"), os.path.join(work, "rank0"), dirs_exist_ok=True)
        os.rename(os.path.join(work, "rank0"), checkpoint)
        ensure_universal(checkpoint, read_meta(checkpoint), world_size=WORLD)
    dist.barrier()
    continued = [train_step(first, criterion, classes, step) for step in (2, 3)]

    torch.manual_seed(1)  # other initial weights: the checkpoint must replace them
    resumed = create_engine(cfg, build_model(cfg.model), load_universal=True)
    load_universal_checkpoint(resumed, checkpoint)
    after_load = hyperparameters(resumed)
    resumed_losses = [train_step(resumed, criterion, classes, step) for step in (2, 3)]
    if rank == 0:
        result = {
            "continued": continued,
            "resumed": resumed_losses,
            "groups_match": hyperparameters(first) == hyperparameters(resumed),
            "weight_decays_after_load": sorted({group["weight_decay"] for group in after_load}),
            "steps_first": steps(first),
            "steps_resumed": steps(resumed),
        }
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="zero3-universal-") as work:
        mp.start_processes(rank_main, args=(free_loopback_port(), work), nprocs=WORLD, start_method="spawn")
    sys.exit(0)
