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

from collections.abc import Callable, Sequence
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


def checkpointed_per_sample(
    enabled: bool, function: Callable[..., Tensor], *args: Any, parameters: Sequence[Tensor]
) -> Tensor:
    """``checkpointed`` for a deterministic ``function`` that treats every sample on its own
    (convolutions, GroupNorm, elementwise ops; not BatchNorm, not dropout), its tensor
    arguments batch-first, its output one batch-first tensor: backward rebuilds and
    differentiates one sample at a time. For the pixel decoders' stride-4 level, whose
    rebuilt maps and their gradients (256 channels at a quarter of the crop) are the
    checkpointed step's peak, that halves this part at two images per worker.

    ``parameters`` must list every parameter ``function`` uses: their gradients, summed
    over the samples, are this segment's outputs to autograd, so each parameter's gradient
    accumulates once a step. (One reentrant checkpoint per sample would accumulate it once
    per sample, and DeepSpeed ZeRO reduces a gradient each time one accumulates.) Under
    ZeRO-3 the segment is checkpointed whole, as ``checkpointed`` does."""
    if not (enabled and torch.is_grad_enabled()):
        return function(*args)
    if any(hasattr(p, "ds_id") for p in parameters):
        # DeepSpeed ZeRO-3's partitioned parameters: it gathers them in module hooks for a
        # backward pass, not for a gradient asked of them directly; whole-batch reentrant.
        return checkpointed(enabled, function, *args)
    tensors = [a for a in args if isinstance(a, Tensor)]
    # Unlike reentrant checkpointing, the parameters are inputs here: a segment fed only by
    # frozen inputs still gives them gradients.
    if not any(t.requires_grad for t in [*tensors, *parameters]):
        return function(*args)
    batch = tensors[0].shape[0]
    if any(t.dim() == 0 or t.shape[0] != batch for t in tensors):
        raise ValueError(
            f"checkpointed_per_sample: tensor arguments of batch sizes {[tuple(t.shape[:1]) for t in tensors]}; "
            f"expected every one batch-first with {batch} samples"
        )
    return _PerSampleCheckpoint.apply(function, args, len(tensors), *tensors, *parameters)


_TENSOR = object()


class _PerSampleCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function: Callable, args: tuple, count: int, *tensors: Tensor) -> Tensor:
        # Tensor arguments only through save_for_backward (_TENSOR marks their places).
        ctx.function, ctx.count = function, count
        ctx.args = tuple(_TENSOR if isinstance(a, Tensor) else a for a in args)
        ctx.parameters = tensors[count:]
        ctx.save_for_backward(*tensors[:count])
        device = tensors[0].device.type
        # The rebuild runs in backward, outside the forward's autocast: it re-enters it.
        ctx.autocast = {"device_type": device, "enabled": torch.is_autocast_enabled(device),
                        "dtype": torch.get_autocast_dtype(device)}
        with torch.no_grad():
            return function(*args)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]  # after (function, args, count)
        wanted, params = needs[: ctx.count], [p for p, n in zip(ctx.parameters, needs[ctx.count :]) if n]
        input_grads = [torch.empty_like(t) if w else None for t, w in zip(inputs, wanted)]
        param_grads: list[Tensor | None] = [None] * len(params)
        for sample in range(grad.shape[0]):
            pieces = iter([t[sample : sample + 1].detach().requires_grad_(w) for t, w in zip(inputs, wanted)])
            sample_args = [next(pieces) if a is _TENSOR else a for a in ctx.args]
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                out = ctx.function(*sample_args)
            leaves = [a for a in sample_args if isinstance(a, Tensor) and a.requires_grad]
            grads = torch.autograd.grad(out, [*leaves, *params], grad[sample : sample + 1], allow_unused=True)
            leaf_grads = iter(grads[: len(leaves)])
            for buffer in input_grads:
                if buffer is None:
                    continue
                piece = next(leaf_grads)
                if piece is None:  # the output does not depend on this input
                    buffer[sample : sample + 1].zero_()
                else:
                    buffer[sample : sample + 1].copy_(piece)
            for i, g in enumerate(grads[len(leaves) :]):
                if g is not None:
                    param_grads[i] = g if param_grads[i] is None else param_grads[i].add_(g)
        summed = iter(param_grads)
        return None, None, None, *input_grads, *(next(summed) if n else None for n in needs[ctx.count :])
