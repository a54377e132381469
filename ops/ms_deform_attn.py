"""Multi-scale deformable attention (Deformable DETR, as used by Mask2Former): the
implementation choice and the module.

``ms_deform_attn`` runs one of three implementations with one contract (shapes in
``ops.ms_deform_attn_reference``):

- ``triton``: fused Triton kernels (``ops.ms_deform_attn_triton``) — CUDA tensors, or
  CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests them);
- ``lean``: memory-lean torch (``ops.ms_deform_attn_lean``), saves only its inputs;
- ``reference``: plain ``grid_sample`` torch (``ops.ms_deform_attn_reference``).

``auto`` takes Triton for CUDA tensors when Triton is importable, otherwise ``lean``.
``MSDeformAttn`` is the module with Deformable DETR's projections and initialisation.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import Tensor, nn

from ops.ms_deform_attn_lean import ms_deform_attn_lean
from ops.ms_deform_attn_reference import ms_deform_attn_reference

DEFORM_ATTN_IMPLEMENTATIONS = ("auto", "triton", "lean", "reference")


def resolve_implementation(name: str, device_type: str) -> str:
    """The implementation ``name`` runs as on ``device_type`` (``auto`` resolved)."""
    if name not in DEFORM_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"model.ops.deform_attn must be one of {', '.join(DEFORM_ATTN_IMPLEMENTATIONS)}, got {name!r}"
        )
    if name != "auto":
        return name
    if device_type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "lean"


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    implementation: str = "auto",
) -> Tensor:
    """B×Q×(M·D) from value B×S×M×D, locations B×Q×M×L×P×2 and weights B×Q×M×L×P."""
    chosen = resolve_implementation(implementation, value.device.type)
    if chosen == "triton":
        # Imported on use: the module needs Triton only when it actually runs.
        from ops.ms_deform_attn_triton import ms_deform_attn_triton

        return ms_deform_attn_triton(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    if chosen == "lean":
        return ms_deform_attn_lean(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return ms_deform_attn_reference(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


class MSDeformAttn(nn.Module):
    """Deformable DETR's multi-scale deformable attention module.

    ``forward(query: B×Q×C, reference_points: B×Q×L×2 (x, y in [0, 1]) or B×Q×L×4 (boxes
    cx, cy, w, h), input_flatten: B×S×C, spatial_shapes: L×2, level_start_index: L,
    padding_mask: B×S bool (True = padding) or None) -> B×Q×C``.

    Offsets are predicted in pixels of each level (divided by the level's W, H) for
    point references, or relative to half the box size for box references.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        implementation: str = "auto",
    ) -> None:
        super().__init__()
        resolve_implementation(implementation, "cpu")  # rejects unknown names at build time
        self.implementation = implementation
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
            locations = (
                reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"MSDeformAttn: reference_points must end in 2 or 4 values, got {reference_points.shape[-1]}"
            )
        output = ms_deform_attn(
            value, spatial_shapes, level_start_index, locations, weights, self.implementation
        )
        return self.output_proj(output)
