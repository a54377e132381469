"""Multi-scale deformable attention (Deformable DETR, as used by Mask2Former), pure torch.

``ms_deform_attn`` is the reference computation: every query samples ``points`` locations
per head and per level by bilinear interpolation (``grid_sample``, zeros padding,
align_corners=False, i.e. pixel centres at (i + 0.5) / size) and sums them with its
attention weights. It is a pure function of its tensors so that memory-lean or Triton
versions with the same signature can replace it. ``MSDeformAttn`` is the module with
Deformable DETR's projections and initialisation around it.

Shapes (Mask2Former's names): B batch, S = sum of H_l*W_l value tokens, Q queries,
M heads, D head dim, L levels, P points per level and head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def ms_deform_attn(
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
    batch, num_tokens, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    if len(shapes) != levels or len(starts) != levels:
        raise ValueError(
            f"ms_deform_attn: sampling_locations has {levels} levels but spatial_shapes/level_start_index "
            f"have {len(shapes)}/{len(starts)}"
        )
    expected_tokens = sum(h * w for h, w in shapes)
    if expected_tokens != num_tokens:
        raise ValueError(f"ms_deform_attn: value has {num_tokens} tokens, spatial_shapes sum to {expected_tokens}")

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


class MSDeformAttn(nn.Module):
    """Deformable DETR's multi-scale deformable attention module.

    ``forward(query: B×Q×C, reference_points: B×Q×L×2 (x, y in [0, 1]) or B×Q×L×4 (boxes
    cx, cy, w, h), input_flatten: B×S×C, spatial_shapes: L×2, level_start_index: L,
    padding_mask: B×S bool (True = padding) or None) -> B×Q×C``.

    Offsets are predicted in pixels of each level (divided by the level's W, H) for
    point references, or relative to half the box size for box references.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"MSDeformAttn: d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Offsets start on a fixed pattern, not at random: head h looks along direction
        # 2*pi*h/M (scaled so the larger coordinate is 1), point p at distance p + 1 —
        # a spread-out receptive field from the first step (Deformable DETR).
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())
        # Zero weights -> uniform attention over all L*P points at the start.
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        batch, num_queries, _ = query.shape
        num_tokens = input_flatten.shape[1]
        heads, levels, points = self.n_heads, self.n_levels, self.n_points

        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(batch, num_tokens, heads, self.d_model // heads)

        # Locations and weights in fp32 even under autocast: a bf16 location in [0, 1] is
        # only good to ~1/256 of the map, a visible shift on large levels.
        offsets = self.sampling_offsets(query).float().view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).float().view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        reference_points = reference_points.float()
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by (W, H).
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"MSDeformAttn: reference_points must end in 2 or 4 values, got {reference_points.shape[-1]}"
            )
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(output)
