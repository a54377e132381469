"""The DeepSpeed config dict, derived from the ``train`` section.

bf16 uses DeepSpeed's ``torch_autocast`` block, not its ``"bf16"`` block: the latter
casts the whole model to bf16, so matcher and loss code that must stay fp32 would see
bf16 parameters; autocast keeps fp32 master weights and casts per op (DESIGN.md 4).
"""

from __future__ import annotations

import torch

from launcher.config import TrainConfig


def build_deepspeed_config(cfg: TrainConfig, micro_batch_size: int, load_universal: bool = False,
                           trainable_params: int | None = None) -> dict:
    """``trainable_params`` (the model's count) caps the ZeRO bucket: a bucket larger
    than all the gradients only costs memory."""
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"train.zero_stage: expected 0, 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.zero_bucket_elements < 1:
        raise ValueError(f"train.zero_bucket_elements: expected a positive element count, got "
                         f"{cfg.zero_bucket_elements}")
    bucket = min(cfg.zero_bucket_elements, max(trainable_params or cfg.zero_bucket_elements, 1))
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    config: dict = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "zero_optimization": {"stage": cfg.zero_stage, "reduce_bucket_size": bucket},
        # We log ourselves (launcher/progress.py); DeepSpeed's own step prints are noise.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if load_universal:  # resuming a checkpoint written by another number of workers
        config["checkpoint"] = {"load_universal": True}
    if cfg.grad_clip > 0:
        config["gradient_clipping"] = cfg.grad_clip
    if cfg.precision == "bf16":
        # No "lower precision safe" modules: by default DeepSpeed reduces the gradients of
        # Linear and Conv layers in bf16 at ZeRO >= 1 (and keeps a second bucket for
        # them); gradients here are fp32 from the backward pass to the optimizer at every
        # stage, as in the papers' AMP training, whose all-reduce is fp32.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    elif cfg.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


def autocast_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """The autocast dtype for forward passes outside the engine (validation, eval, predict)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
