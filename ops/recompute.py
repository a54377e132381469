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
