"""Run by tests/test_engine.py in a fresh process (one gloo rank): one ZeRO-3 training
step of a MaskFormer on a tiny Swin with activation checkpointing in every part, against
the same model outside DeepSpeed; prints one JSON line comparing loss and gradients.

Why Swin needs its own check at ZeRO-3: segscale's Swin block (``model/swin_block.py``)
reads its norms' and projections' weights from the block's ``forward`` instead of
calling those submodules, so DeepSpeed's per-module gather hooks never run for them;
they are gathered by ZeRO-3's parameter access hook instead, also while a reentrant
checkpoint recomputes the block in backward.
"""

import json
import os

import ops.torchvision_fix  # noqa: F401  (before anything imports timm)

# isort: split
import torch
import torch.distributed as dist

from data_pipeline.synthetic import synthetic_batch
from launcher.config import load_config
from launcher.engine import create_engine
from launcher.environment import free_loopback_port, join_loopback_gloo_group
from model.build import build_criterion, build_model

TINY_SWIN = {
    "embed_dim": 16,
    "depths": (1, 1, 2, 1),
    "num_heads": (1, 1, 2, 1),
    "img_size": 64,
    "window_size": 2,
}


def main() -> None:
    join_loopback_gloo_group(0, 1, free_loopback_port(), zero_stage=3)
    from deepspeed.utils import safe_get_full_grad

    cfg = load_config(
        os.path.join(os.path.dirname(__file__), "..", "configs", "test_tiny.yaml"),
        [
            "train.zero_stage=3",
            "train.precision=fp32",
            "train.grad_clip=0",
            "model.backbone.name=swin_tiny_patch4_window7_224",
            "model.backbone.out_indices=[0,1,2,3]",
            "model.backbone.grad_checkpointing=true",
            "model.pixel_decoder.grad_checkpointing=true",
            "model.decoder.grad_checkpointing=true",
        ],
    )
    cfg.model.backbone.timm_kwargs = dict(TINY_SWIN)
    criterion = build_criterion(cfg.model)
    images, targets = synthetic_batch(cfg.model.num_classes, 64, 2, seed=1)

    torch.manual_seed(0)
    plain = build_model(cfg.model)
    plain_loss = sum(criterion(plain(images), targets).values())
    plain_loss.backward()
    plain_grads = {name: p.grad for name, p in plain.named_parameters()}

    torch.manual_seed(0)
    engine = create_engine(cfg, build_model(cfg.model))
    loss = sum(criterion(engine(images), targets).values())
    engine.backward(loss)
    # Full (gathered) gradients, read before the step: ZeRO-3 frees them in it.
    max_difference, missing = 0.0, []
    for name, param in engine.module.named_parameters():
        grad = safe_get_full_grad(param)
        if grad is None:
            missing.append(name)
            continue
        max_difference = max(max_difference, (grad - plain_grads[name]).abs().max().item())
    engine.step()
    print(
        json.dumps(
            {
                "plain_loss": plain_loss.item(),
                "zero3_loss": loss.item(),
                "max_grad_difference": max_difference,
                "max_plain_grad": max(g.abs().max().item() for g in plain_grads.values()),
                "missing_grads": missing,
                "parameters": len(plain_grads),
                "swin_parameters": sum(1 for name in plain_grads if "norm1" in name or "qkv" in name),
            }
        )
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
