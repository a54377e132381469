"""Run by tests/test_engine.py in a fresh process (one gloo rank): trains the same model
at ZeRO-3 twice, with ``launcher.engine.create_engine`` (master weights shared with the
parameter partitions) and with a bare ``deepspeed.initialize`` (DeepSpeed's own second
copy), and prints one JSON line comparing them."""

import json
import os

import ops.torchvision_fix  # noqa: F401  (before anything imports timm)

# isort: split
import torch
import torch.distributed as dist

from data_pipeline.synthetic import synthetic_batch
from launcher.config import load_config
from launcher.deepspeed_config import build_deepspeed_config
from launcher.engine import create_engine
from launcher.environment import free_loopback_port, join_loopback_gloo_group
from launcher.optim import build_optimizer, build_scheduler
from model.build import build_criterion, build_model

STEPS = 3


def batch(num_classes: int, step: int) -> tuple[torch.Tensor, list[dict]]:
    """Step ``step``'s two 32x32 samples."""
    return synthetic_batch(num_classes, 32, 2, seed=1, first=2 * step)


def train(engine, criterion, num_classes: int) -> list[float]:
    losses = []
    for step in range(STEPS):
        images, targets = batch(num_classes, step)
        loss = sum(criterion(engine(images), targets).values())
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def flat_state(engine) -> tuple[torch.Tensor, torch.Tensor]:
    """(parameter partitions, master weights), each flattened in group order."""
    optimizer = engine.optimizer
    return (
        torch.cat([t.reshape(-1) for t in optimizer.fp16_partitioned_groups_flat]),
        torch.cat([t.reshape(-1) for t in optimizer.fp32_partitioned_groups_flat]),
    )


def shares_storage(engine) -> list[bool]:
    optimizer = engine.optimizer
    return [
        low.untyped_storage().data_ptr() == master.untyped_storage().data_ptr()
        for low, master in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat)
    ]


def main() -> None:
    join_loopback_gloo_group(0, 1, free_loopback_port(), zero_stage=3)
    import deepspeed

    cfg = load_config(
        os.path.join(os.path.dirname(__file__), "..", "configs", "test_tiny.yaml"),
        ["train.zero_stage=3", "train.precision=bf16", "train.lr=0.01", "data.batch_size=2"],
    )
    criterion = build_criterion(cfg.model)

    torch.manual_seed(0)
    shared = create_engine(cfg, build_model(cfg.model))
    initial = flat_state(shared)[0].clone()
    shared_losses = train(shared, criterion, cfg.model.num_classes)

    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    copied, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=build_scheduler(optimizer, cfg.train),
        config=build_deepspeed_config(
            cfg.train, 2, trainable_params=sum(p.numel() for p in model.parameters())
        ),
    )
    copied_losses = train(copied, criterion, cfg.model.num_classes)

    (shared_low, shared_master), (copied_low, copied_master) = flat_state(shared), flat_state(copied)
    print(
        json.dumps(
            {
                "shared_storage": shares_storage(shared),
                "copied_storage": shares_storage(copied),
                "shared_losses": shared_losses,
                "copied_losses": copied_losses,
                "weights_equal": torch.equal(shared_low, copied_low),
                "masters_equal": torch.equal(shared_master, copied_master),
                "weights_moved": not torch.equal(initial, shared_low),
                "numel": shared_low.numel(),
            }
        )
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
