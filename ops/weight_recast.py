"""Saving parameters, not their low-precision copies, for backward under autocast.

Under bf16 autocast every linear layer and convolution casts its fp32 weight to bf16, and
autograd saves that copy for backward: 2 bytes per parameter held from the forward pass to
the backward pass, next to the fp32 parameter it was cast from, which is alive anyway (79
MiB for MaskFormer Swin-T, a third of what its bf16 step saves). Inside
``recast_saved_weights()``, a saved tensor that is a low-precision copy of a parameter, or
a view of one (a transpose, a slice of a fused qkv weight), is replaced by a reference to
the parameter and cast again when backward needs it. The values are the same (rounding is
deterministic and the parameter does not change between forward and backward); the cost is
one cast per saved weight in backward. Autocast's own cache of the casts lives only until
the autocast block ends, so the copies are gone before the loss and backward.

Not for DeepSpeed ZeRO-3, which frees each partitioned parameter between its module's
forward and backward (the launcher leaves it off there); nor when parameters change
between forward and backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor


class _ParameterCast(NamedTuple):
    """What is saved instead of ``parameter.to(dtype).as_strided(size, stride, offset)``."""

    parameter: Tensor
    dtype: torch.dtype
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def parameter_cast_source(tensor: Tensor) -> Tensor | None:
    """The parameter (autograd leaf) ``tensor`` is a dtype cast of, or a view of such a
    cast, laid out as the parameter is; else None."""
    base = tensor if tensor._base is None else tensor._base
    node = base.grad_fn
    if node is None or node.name() != "ToCopyBackward0":
        return None
    parameter = getattr(node.next_functions[0][0], "variable", None)  # an AccumulateGrad node's leaf
    if parameter is None or parameter.dtype == base.dtype:
        return None
    if base.shape != parameter.shape or base.stride() != parameter.stride() or base.storage_offset() != 0:
        return None
    return parameter


def _pack(tensor: Tensor) -> Tensor | _ParameterCast:
    parameter = parameter_cast_source(tensor)
    if parameter is None:
        return tensor
    return _ParameterCast(parameter, tensor.dtype, tensor.size(), tensor.stride(), tensor.storage_offset())


def _unpack(saved: Tensor | _ParameterCast) -> Tensor:
    if isinstance(saved, _ParameterCast):
        copy = saved.parameter.detach().to(saved.dtype)
        return copy.as_strided(saved.size, saved.stride, saved.offset)
    return saved


def recast_applies(precision: str, zero_stage: int) -> bool:
    """Whether a run recasts (the train loop's and ``describe``'s rule): under bf16
    autocast, below ZeRO-3."""
    return precision == "bf16" and zero_stage < 3


@contextlib.contextmanager
def recast_saved_weights(enabled: bool = True) -> Iterator[None]:
    """Within this block (the forward pass), low-precision copies of parameters are not
    saved for backward but cast again from the parameters when backward runs."""
    if not enabled:
        yield
        return
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield
