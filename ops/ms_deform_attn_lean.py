"""Multi-scale deformable attention, memory-lean torch implementation (CPU and GPU).

The usual pure-torch formulation (Deformable DETR's ``ms_deform_attn_core_pytorch``,
transformers' ``multi_scale_deformable_attention``) samples every level with
``grid_sample``, stacks the samples into a (B·M)×D×Q×(L·P) tensor, multiplies by the
weights and sums. Autograd keeps that stacked tensor (and the per-level samples) alive
from forward to backward, and the forward holds the per-level list, the stack and the
product at once: several copies of the largest tensor of the layer.

Here a custom autograd function saves only its inputs. Forward samples one level and
one block of queries at a time and folds the samples into the output at once (in place:
nothing needs them later). Backward recomputes that block's samples (``grid_sample``'s
forward, a gather, cheaper than its scatter-add backward) to get the attention-weight
gradient, and sends the weighted output gradient through ``grid_sample``'s backward for
the value and location gradients. Peak extra memory is one block's samples (bounded by
``block_mib``) instead of several full (B·M)×D×Q×(L·P) tensors.

Under autocast the sampling runs in the promoted dtype of value and locations (fp32 when
the locations are fp32, as torch's autocast runs ``grid_sample``); the result is in
value's dtype, like the reference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ops.ms_deform_attn_reference import level_layout

# Upper bound of one block's sampled values (MiB); queries are split to stay below it.
DEFAULT_BLOCK_MIB = 16.0


def _query_blocks(
    batch_heads: int, head_dim: int, queries: int, points: int, itemsize: int, block_mib: float
):
    per_query = batch_heads * head_dim * points * itemsize
    block = max(1, min(queries, int(block_mib * 2**20 // max(per_query, 1))))
    return [(start, min(start + block, queries)) for start in range(0, queries, block)]


def _level_values(value: Tensor, start: int, height: int, width: int) -> Tensor:
    """B×S×M×D -> (B·M)×D×H×W of one level; contiguous (strided views made CPU
    ``grid_sample`` ~3× slower)."""
    batch, _, heads, head_dim = value.shape
    value_l = value[:, start : start + height * width].permute(0, 2, 3, 1)
    return value_l.reshape(batch * heads, head_dim, height, width).contiguous()


def _sample(value_l: Tensor, grid: Tensor) -> Tensor:
    """(B·M)×D×H×W sampled at (B·M)×q×P×2 grid points -> (B·M)×D×q×P."""
    return F.grid_sample(value_l, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class _MSDeformAttnLean(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
        block_mib: float,
    ) -> Tensor:
        shapes, starts = level_layout(value, spatial_shapes, level_start_index, sampling_locations)
        ctx.save_for_backward(value, sampling_locations, attention_weights)
        ctx.layout = (shapes, starts, block_mib)
        with torch.autocast(value.device.type, enabled=False):
            return _forward(value, shapes, starts, sampling_locations, attention_weights, block_mib)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        value, sampling_locations, attention_weights = ctx.saved_tensors
        shapes, starts, block_mib = ctx.layout
        with torch.autocast(value.device.type, enabled=False):
            grads = _backward(
                grad_output, value, shapes, starts, sampling_locations, attention_weights, block_mib
            )
        grad_value, grad_locations, grad_weights = grads
        return (
            grad_value if ctx.needs_input_grad[0] else None,
            None,
            None,
            grad_locations if ctx.needs_input_grad[3] else None,
            grad_weights if ctx.needs_input_grad[4] else None,
            None,
        )


def _prepare(value: Tensor, sampling_locations: Tensor, attention_weights: Tensor):
    """Compute dtype, and the grids / weights level-major: L×(B·M)×Q×P(×2), contiguous
    per level (CPU ``grid_sample`` on a strided grid was ~3× slower, forward and backward)."""
    compute = torch.promote_types(value.dtype, sampling_locations.dtype)
    batch, num_queries, heads, levels, points, _ = sampling_locations.shape
    grids = (2 * sampling_locations.to(compute) - 1).permute(3, 0, 2, 1, 4, 5)  # L×B×M×Q×P×2, [-1, 1]
    grids = grids.reshape(levels, batch * heads, num_queries, points, 2)
    weights = (
        attention_weights.to(compute)
        .permute(3, 0, 2, 1, 4)
        .reshape(levels, batch * heads, num_queries, points)
    )
    return compute, grids, weights


def _block(t: Tensor, level: int, q0: int, q1: int) -> Tensor:
    """Level ``level``, queries q0:q1 of a level-major tensor, contiguous (a copy only
    when the queries are split into blocks)."""
    return t[level, :, q0:q1].contiguous()


def _forward(value, shapes, starts, sampling_locations, attention_weights, block_mib) -> Tensor:
    batch, _, heads, head_dim = value.shape
    num_queries, points = sampling_locations.shape[1], sampling_locations.shape[4]
    compute, grids, weights = _prepare(value, sampling_locations, attention_weights)
    output = value.new_zeros(batch * heads, head_dim, num_queries, dtype=compute)
    blocks = _query_blocks(batch * heads, head_dim, num_queries, points, compute.itemsize, block_mib)
    value_c = value.to(compute)
    for level, ((height, width), start) in enumerate(zip(shapes, starts)):
        value_l = _level_values(value_c, start, height, width)
        for q0, q1 in blocks:
            sampled = _sample(value_l, _block(grids, level, q0, q1))  # (B·M)×D×q×P
            sampled.mul_(_block(weights, level, q0, q1)[:, None])
            output[:, :, q0:q1] += sampled.sum(-1)
    # (B·M)×D×Q -> B×Q×(M·D), heads major as in the CUDA kernel's layout.
    return output.view(batch, heads * head_dim, num_queries).transpose(1, 2).contiguous().to(value.dtype)


def _backward(grad_output, value, shapes, starts, sampling_locations, attention_weights, block_mib):
    batch, _, heads, head_dim = value.shape
    num_queries, levels, points = (
        sampling_locations.shape[1],
        sampling_locations.shape[3],
        sampling_locations.shape[4],
    )
    compute, grids, weights = _prepare(value, sampling_locations, attention_weights)
    # B×Q×(M·D) -> (B·M)×D×Q
    grad_out = grad_output.to(compute).transpose(1, 2).reshape(batch * heads, head_dim, num_queries)
    # Every entry is written below (the levels tile S, the blocks tile Q): no zero fill.
    grad_value = torch.empty_like(value, dtype=compute)  # B×S×M×D
    grad_grids = torch.empty_like(grids)
    grad_weights = torch.empty_like(weights)
    blocks = _query_blocks(batch * heads, head_dim, num_queries, points, compute.itemsize, block_mib)
    value_c = value.to(compute)
    for level, ((height, width), start) in enumerate(zip(shapes, starts)):
        value_l = _level_values(value_c, start, height, width).requires_grad_(True)
        grad_value_l: Tensor | None = None
        for q0, q1 in blocks:
            grid = _block(grids, level, q0, q1).requires_grad_(True)
            with torch.enable_grad():
                sampled = _sample(value_l, grid)  # recomputed, (B·M)×D×q×P
            g = grad_out[:, :, q0:q1, None]
            # In place: grid_sample's backward needs its input and grid, not its output.
            grad_weights[level, :, q0:q1] = sampled.detach().mul_(g).sum(1)
            grad_sampled = g * _block(weights, level, q0, q1)[:, None]
            dv, dg = torch.autograd.grad(sampled, (value_l, grid), grad_sampled)
            grad_value_l = dv if grad_value_l is None else grad_value_l.add_(dv)
            grad_grids[level, :, q0:q1] = dg
        if grad_value_l is None:  # no queries, no blocks: nothing sampled this level
            grad_value[:, start : start + height * width] = 0
            continue
        # (B·M)×D×H×W -> B×HW×M×D slice of the value gradient
        grad_value[:, start : start + height * width] = grad_value_l.view(
            batch, heads, head_dim, height * width
        ).permute(0, 3, 1, 2)
    # L×(B·M)×Q×P(×2) -> B×Q×M×L×P(×2)
    grad_locations = (
        (2 * grad_grids).view(levels, batch, heads, num_queries, points, 2).permute(1, 3, 2, 0, 4, 5)
    )
    grad_weights = grad_weights.view(levels, batch, heads, num_queries, points).permute(1, 3, 2, 0, 4)
    return (
        grad_value.to(value.dtype),
        grad_locations.to(sampling_locations.dtype),
        grad_weights.to(attention_weights.dtype),
    )


def ms_deform_attn_lean(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    block_mib: float = DEFAULT_BLOCK_MIB,
) -> Tensor:
    """Same contract as ``ops.ms_deform_attn_reference.ms_deform_attn_reference``."""
    return _MSDeformAttnLean.apply(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, block_mib
    )
