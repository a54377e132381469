"""Multi-scale deformable attention (Deformable DETR, as used by Mask2Former): the
pure-torch reference.

``ms_deform_attn_reference`` is the computation every other implementation is tested
against: every query samples ``points`` locations per head and per level by bilinear
interpolation (``grid_sample``, zeros padding, align_corners=False, i.e. pixel centres at
(i + 0.5) / size) and sums them with its attention weights. Autograd saves every level's
samples for backward; ``ops.ms_deform_attn_lean`` avoids that.

Shapes (Mask2Former's names): B batch, S = sum of H_l*W_l value tokens, Q queries,
M heads, D head dim, L levels, P points per level and head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def level_layout(
    value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor
) -> tuple[list[tuple[int, int]], list[int]]:
    """Checks the shared shape contract of every implementation and returns the levels'
    (H, W) and start offsets as Python ints."""
    if value.dim() != 4 or sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"ms_deform_attn: expected value B×S×M×D and sampling_locations B×Q×M×L×P×2, got "
            f"{tuple(value.shape)} and {tuple(sampling_locations.shape)}"
        )
    num_tokens = value.shape[1]
    levels = sampling_locations.shape[3]
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    if len(shapes) != levels or len(starts) != levels:
        raise ValueError(
            f"ms_deform_attn: sampling_locations has {levels} levels but spatial_shapes/level_start_index "
            f"have {len(shapes)}/{len(starts)}"
        )
    expected_tokens = sum(h * w for h, w in shapes)
    if expected_tokens != num_tokens:
        raise ValueError(
            f"ms_deform_attn: value has {num_tokens} tokens, spatial_shapes sum to {expected_tokens}"
        )
    # Levels must tile S in order: the lean backward writes each level's slice of the
    # value gradient once, and any other layout would read the wrong tokens silently.
    expected_starts = [sum(h * w for h, w in shapes[:level]) for level in range(levels)]
    if starts != expected_starts:
        raise ValueError(
            f"ms_deform_attn: level_start_index must be {expected_starts} for spatial_shapes {shapes}, got {starts}"
        )
    return shapes, starts


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """``value``: B×S×M×D; ``spatial_shapes``: L×2 (H, W) integers; ``level_start_index``:
    L offsets of each level in S; ``sampling_locations``: B×Q×M×L×P×2, (x, y) in [0, 1] of
    each level's extent; ``attention_weights``: B×Q×M×L×P. Returns B×Q×(M*D) in
    ``value.dtype``.

    Points outside [0, 1] read zeros. Under autocast torch runs ``grid_sample`` in fp32
    (its autocast policy), so the locations are passed in their own dtype there and the
    sample grid keeps full precision; outside autocast the grid follows ``value``'s dtype,
    which ``grid_sample`` requires. (torch 2.13 has bf16 CPU kernels for grid_sample,
    forward and backward, so no cast to fp32 is forced.)
    """
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    shapes, starts = level_layout(value, spatial_shapes, level_start_index, sampling_locations)

    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] coordinates
    if grids.dtype != value.dtype and not torch.is_autocast_enabled(value.device.type):
        grids = grids.to(value.dtype)
    # (B, Q, M, L, P) -> (B*M, Q, L, P): one weight per sampled value.
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, num_queries, levels, points)

    output: Tensor | None = None
    for level, ((height, width), start) in enumerate(zip(shapes, starts)):
        # B×HW×M×D -> (B*M)×D×H×W: each head samples its own slice of channels.
        # Both made contiguous: CPU grid_sample on these strided views was ~3x slower
        # (measured at 64x64, 5376 queries, 8 heads, 4 points).
        value_l = value[:, start : start + height * width].permute(0, 2, 3, 1)
        value_l = value_l.reshape(batch * heads, head_dim, height, width).contiguous()
        # B×Q×M×P×2 -> (B*M)×Q×P×2
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1).contiguous()
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        # (B*M)×D×Q×P weighted over P; accumulated per level instead of stacking all levels,
        # so only one level's samples are alive at a time.
        contribution = (sampled * weights[:, None, :, level]).sum(-1)
        output = contribution if output is None else output + contribution
    assert output is not None  # levels >= 1 (checked against spatial_shapes above)
    # (B*M)×D×Q -> B×Q×(M*D), heads major as in the CUDA kernel's layout.
    return output.view(batch, heads * head_dim, num_queries).transpose(1, 2).contiguous().to(value.dtype)
