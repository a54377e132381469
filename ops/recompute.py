"""Activation checkpointing of one segment of a decoder (a layer, a pyramid level).

The decoders and pixel decoders all checkpoint the same way, here: torch's *reentrant*
checkpoint, because DeepSpeed ZeRO-3 gathers partitioned parameters in module hooks,
which the non-reentrant variant breaks (DESIGN.md §4; the backbone's timm checkpointing
is switched to reentrant for ZeRO-3 by ``launcher/environment.py``).

Reentrant checkpointing tracks only the top-level tensor arguments, and its output
requires grad only when one of them does: a segment whose inputs all come from a frozen
part (a pixel decoder's coarsest level reads only backbone features) would give its own
parameters no gradient. Such a segment runs plainly instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint  # called through the module attribute, so spies that patch it see it
from torch import Tensor


def checkpointed(enabled: bool, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``; when ``enabled`` and autograd is recording, under reentrant
    activation checkpointing: backward keeps only ``args`` and runs ``function`` again."""
    if enabled and torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=True)
    return function(*args)


def checkpointed_per_sample(enabled: bool, function: Callable[..., Tensor], *args: Any) -> Tensor:
    """``checkpointed`` for a ``function`` that treats every sample on its own (convolutions,
    GroupNorm, elementwise ops; not BatchNorm), each tensor argument batch-first: one
    checkpointed segment per sample, so backward rebuilds one sample's activations at a
    time. For the stride-4 pyramid levels, whose rebuilt activations and their gradients
    (256 channels at a quarter of the crop) are the checkpointed step's peak, this halves
    that part at two images per worker. Returns the samples' outputs concatenated."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    batch = tensors[0].shape[0] if tensors else 0
    if batch < 2 or not (enabled and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return checkpointed(enabled, function, *args)
    if any(t.dim() == 0 or t.shape[0] != batch for t in tensors):
        raise ValueError(
            f"checkpointed_per_sample: tensor arguments of batch sizes {[tuple(t.shape[:1]) for t in tensors]}; "
            f"expected every one batch-first with {batch} samples"
        )
    # split (not indexing): its backward waits for every sample's gradient and concatenates
    # them once, where per-sample slicing would give each sample a whole zero-filled copy.
    per_sample = [a.split(1) if isinstance(a, Tensor) else [a] * batch for a in args]
    return torch.cat([checkpointed(True, function, *sample) for sample in zip(*per_sample)])
