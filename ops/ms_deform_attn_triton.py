"""Multi-scale deformable attention (Deformable DETR / Mask2Former) as Triton kernels.

``ms_deform_attn_triton`` has the signature and result of
``ops.ms_deform_attn_reference.ms_deform_attn_reference`` (bilinear sampling with zeros
padding and align_corners=False: pixel x = loc_x * W - 0.5; a neighbour outside the map
reads zero), with a hand-written backward that saves only the inputs: no per-level
samples are kept alive between forward and backward.

Kernel layout. One kernel serves both passes (``BACKWARD`` is a constexpr), so forward
and backward share a single copy of the sampling arithmetic. A program owns one (batch,
head) pair and a block of ``BLOCK_Q`` queries and works on a BLOCK_Q×BLOCK_D tile, D
being the head dim padded to a power of two and masked. It loops over levels and points;
for each it loads the queries' (x, y) and attention weight, finds the four neighbour
pixels and their bilinear weights, and gathers the four BLOCK_Q×D tiles of ``value``. A
head's D channels are contiguous in the B×S×M×D value, so each gathered row is one
contiguous read, as in the official CUDA kernel's channel-per-thread layout.

- Forward accumulates weight * bilinear sample into the tile and writes it once.
- Backward recomputes the same samples and, per (query, level, point), stores
  d/dweight = <grad_out, sample> and d/d(x, y) = W (or H) * <grad_out * weight,
  d sample / d pixel coordinate> directly (each program owns those entries), and scatters
  grad_out * weight * corner weight into grad_value with atomic adds (many queries read
  the same pixels).

Precision: everything is accumulated in fp32 whatever the input dtypes (bf16/fp16 value
with fp32 locations under autocast works), or in fp64 when any input is fp64 so that
``gradcheck`` is meaningful; grad_value is accumulated in that dtype too and cast at the
end. Results come back in each input's own dtype.

Triton is optional: without it this module still imports and ``triton_available()`` is
False. On CPU tensors the kernels only run in Triton's interpreter (TRITON_INTERPRET=1),
which is how the tests run them.
"""

import functools
import os

import torch
from torch import Tensor

from ops.ms_deform_attn_reference import level_layout

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is an optional (GPU) dependency
    triton = None
    tl = None


def triton_available() -> bool:
    """Whether Triton can be imported (it is not installed on CPU-only setups)."""
    return triton is not None


if triton is not None:
    # Deliberately not decorated here: see _kernel(). For the same reason the body calls
    # only builtins: triton.language's own @jit helpers (tl.zeros, tl.sum) were decorated
    # in whatever mode TRITON_INTERPRET had when triton was imported, and a compiled-mode
    # helper cannot be called from an interpreted kernel. Hence tl.full for zeros and
    # tl.reduce with tl.sum's combine function (which the interpreter maps to numpy's sum).
    def _ms_deform_attn_kernel(
        value_ptr,  # B×S×M×D
        table_ptr,  # L×3 int32: height, width, start token of each level
        loc_ptr,  # B×Q×M×L×P×2, (x, y) in [0, 1]
        attn_ptr,  # B×Q×M×L×P
        out_ptr,  # B×Q×M×D: forward writes the output, backward reads its gradient
        grad_value_ptr,  # backward only: B×S×M×D, zero-initialised, ACC dtype
        grad_loc_ptr,  # backward only: like loc
        grad_attn_ptr,  # backward only: like attn
        num_tokens,
        num_queries,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        LEVELS: tl.constexpr,
        POINTS: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ACC: tl.constexpr,
        BACKWARD: tl.constexpr,
    ):
        batch_head = tl.program_id(1)
        b = (batch_head // HEADS).to(tl.int64)  # int64: B*S*M*D can pass 2**31
        m = batch_head % HEADS
        q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        d = tl.arange(0, BLOCK_D)
        q_mask = q < num_queries
        d_mask = d < HEAD_DIM
        # Flat index of (b, q, m): the row of the output and the prefix of loc/attn.
        bqm = (b * num_queries + q) * HEADS + m
        out_offsets = (bqm * HEAD_DIM)[:, None] + d[None, :]
        out_mask = q_mask[:, None] & d_mask[None, :]
        if BACKWARD:
            grad_out = tl.load(out_ptr + out_offsets, mask=out_mask, other=0.0).to(ACC)
        else:
            acc = tl.full([BLOCK_Q, BLOCK_D], 0.0, ACC)

        for level in range(LEVELS):
            height = tl.load(table_ptr + 3 * level)
            width = tl.load(table_ptr + 3 * level + 1)
            level_start = b * num_tokens + tl.load(table_ptr + 3 * level + 2)
            height_f = height.to(ACC)
            width_f = width.to(ACC)
            for point in range(POINTS):
                lp = (bqm * LEVELS + level) * POINTS + point
                x = tl.load(loc_ptr + 2 * lp, mask=q_mask, other=0.0).to(ACC)
                y = tl.load(loc_ptr + 2 * lp + 1, mask=q_mask, other=0.0).to(ACC)
                weight = tl.load(attn_ptr + lp, mask=q_mask, other=0.0).to(ACC)
                # grid_sample's align_corners=False pixel coordinates. Clamped one pixel
                # beyond the map, where all four neighbours are outside anyway (result and
                # gradient zero either way): keeps floor() in int32 range for wild points.
                x_pix = tl.minimum(tl.maximum(x * width_f - 0.5, -2.0), width_f + 1.0)
                y_pix = tl.minimum(tl.maximum(y * height_f - 0.5, -2.0), height_f + 1.0)
                x0_f = tl.floor(x_pix)
                y0_f = tl.floor(y_pix)
                lx = x_pix - x0_f  # weight of the right neighbour
                ly = y_pix - y0_f  # weight of the lower neighbour
                hx = 1.0 - lx
                hy = 1.0 - ly
                x0 = x0_f.to(tl.int32)
                y0 = y0_f.to(tl.int32)
                x0_in = (x0 >= 0) & (x0 < width)
                x1_in = (x0 >= -1) & (x0 + 1 < width)
                y0_in = q_mask & (y0 >= 0) & (y0 < height)
                y1_in = q_mask & (y0 >= -1) & (y0 + 1 < height)
                # Element offsets of the four neighbours' head-m rows; (y, x) order.
                row0 = level_start + y0 * width + x0
                off00 = ((row0 * HEADS + m) * HEAD_DIM)[:, None] + d[None, :]
                off01 = off00 + HEADS * HEAD_DIM
                off10 = off00 + width * HEADS * HEAD_DIM
                off11 = off10 + HEADS * HEAD_DIM
                mask00 = (y0_in & x0_in)[:, None] & d_mask[None, :]
                mask01 = (y0_in & x1_in)[:, None] & d_mask[None, :]
                mask10 = (y1_in & x0_in)[:, None] & d_mask[None, :]
                mask11 = (y1_in & x1_in)[:, None] & d_mask[None, :]
                v00 = tl.load(value_ptr + off00, mask=mask00, other=0.0).to(ACC)
                v01 = tl.load(value_ptr + off01, mask=mask01, other=0.0).to(ACC)
                v10 = tl.load(value_ptr + off10, mask=mask10, other=0.0).to(ACC)
                v11 = tl.load(value_ptr + off11, mask=mask11, other=0.0).to(ACC)
                w00 = (hy * hx)[:, None]
                w01 = (hy * lx)[:, None]
                w10 = (ly * hx)[:, None]
                w11 = (ly * lx)[:, None]
                sample = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
                if BACKWARD:
                    grad_weight = tl.reduce(grad_out * sample, 1, tl.standard._sum_combine)
                    tl.store(grad_attn_ptr + lp, grad_weight.to(grad_attn_ptr.dtype.element_ty), mask=q_mask)
                    grad_sample = grad_out * weight[:, None]
                    # d sample / d x_pix and / d y_pix, then the chain rule through
                    # x_pix = x * W - 0.5 (and y_pix = y * H - 0.5).
                    d_x = hy[:, None] * (v01 - v00) + ly[:, None] * (v11 - v10)
                    d_y = hx[:, None] * (v10 - v00) + lx[:, None] * (v11 - v01)
                    grad_x = tl.reduce(grad_sample * d_x, 1, tl.standard._sum_combine) * width_f
                    grad_y = tl.reduce(grad_sample * d_y, 1, tl.standard._sum_combine) * height_f
                    loc_ty = grad_loc_ptr.dtype.element_ty
                    tl.store(grad_loc_ptr + 2 * lp, grad_x.to(loc_ty), mask=q_mask)
                    tl.store(grad_loc_ptr + 2 * lp + 1, grad_y.to(loc_ty), mask=q_mask)
                    # Relaxed: pure accumulation, nothing is read back in this kernel.
                    tl.atomic_add(grad_value_ptr + off00, grad_sample * w00, mask=mask00, sem="relaxed")
                    tl.atomic_add(grad_value_ptr + off01, grad_sample * w01, mask=mask01, sem="relaxed")
                    tl.atomic_add(grad_value_ptr + off10, grad_sample * w10, mask=mask10, sem="relaxed")
                    tl.atomic_add(grad_value_ptr + off11, grad_sample * w11, mask=mask11, sem="relaxed")
                else:
                    acc += weight[:, None] * sample

        if not BACKWARD:
            tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # recent triton: the knob reads TRITON_INTERPRET at every access
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _kernel(interpret: bool):
    # triton.jit chooses between compiling and the interpreter from TRITON_INTERPRET when
    # it decorates. Decorating at import would freeze that choice at whenever this module
    # happened to be imported first (e.g. by a model before a test set the variable), so
    # decorate on first use, once per mode. `interpret` is only the cache key: jit reads
    # the same setting that _interpreting() just did.
    del interpret
    return triton.jit(_ms_deform_attn_kernel)


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _launch(
    backward: bool, value: Tensor, table: Tensor, loc: Tensor, attn: Tensor, out: Tensor, *grads: Tensor
):
    batch, tokens, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = loc.shape
    if batch * queries * heads == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    # 512-element tiles, 4 per thread at the default 4 warps: the kernel holds ~6 tiles
    # plus 4 of 64-bit pointers. ptxas (sm_90, D=32) reports 79 (forward) and 142
    # (backward) registers and no spills; 2048-element tiles spilled in both passes.
    block_q = max(1, min(512 // block_d, 64, triton.next_power_of_2(queries)))
    grad_value, grad_loc, grad_attn = grads if backward else (value, loc, attn)  # unused in forward
    acc = tl.float64 if _acc_dtype(value, loc, attn) == torch.float64 else tl.float32
    grid = (triton.cdiv(queries, block_q), batch * heads)
    _kernel(_interpreting())[grid](
        value, table, loc, attn, out, grad_value, grad_loc, grad_attn, tokens, queries,
        HEADS=heads, HEAD_DIM=head_dim, LEVELS=levels, POINTS=points,
        BLOCK_Q=block_q, BLOCK_D=block_d, ACC=acc, BACKWARD=backward,
    )  # fmt: skip


class _MSDeformAttnTriton(torch.autograd.Function):
    """Inputs contiguous, ``table`` L×3 int32 on value's device (see ms_deform_attn_triton)."""

    @staticmethod
    def forward(ctx, value: Tensor, table: Tensor, loc: Tensor, attn: Tensor) -> Tensor:
        batch, _, heads, head_dim = value.shape
        out = value.new_empty(batch, loc.shape[1], heads * head_dim)
        _launch(False, value, table, loc, attn, out)
        ctx.save_for_backward(value, table, loc, attn)  # inputs only; backward resamples
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        value, table, loc, attn = ctx.saved_tensors
        # Accumulated by atomic adds from many programs: in fp32 (fp64) whatever value's
        # dtype, since bf16 atomics would round every partial sum.
        grad_value = torch.zeros(value.shape, dtype=_acc_dtype(value, loc, attn), device=value.device)
        grad_loc = torch.empty_like(loc)
        grad_attn = torch.empty_like(attn)
        _launch(True, value, table, loc, attn, grad_out.contiguous(), grad_value, grad_loc, grad_attn)
        return grad_value.to(value.dtype), None, grad_loc, grad_attn


def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Same contract as ``ms_deform_attn_reference``: ``value`` B×S×M×D,
    ``spatial_shapes`` L×2 (H, W), ``level_start_index`` L, ``sampling_locations``
    B×Q×M×L×P×2 (x, y in [0, 1]), ``attention_weights`` B×Q×M×L×P; returns B×Q×(M*D) in
    ``value.dtype``. Float inputs may differ in dtype (bf16 value with fp32 locations
    under autocast); gradients come back in each input's own dtype.

    Needs CUDA tensors, or TRITON_INTERPRET=1 (Triton's CPU interpreter, slow)."""
    if triton is None:
        raise RuntimeError("ms_deform_attn_triton: triton is not installed (pip install triton)")
    level_layout(value, spatial_shapes, level_start_index, sampling_locations)
    batch, _, heads, _ = value.shape
    if sampling_locations.shape[0] != batch or sampling_locations.shape[2] != heads:
        raise ValueError(
            f"ms_deform_attn_triton: value {tuple(value.shape)} and sampling_locations "
            f"{tuple(sampling_locations.shape)} disagree on batch or heads"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"ms_deform_attn_triton: attention_weights {tuple(attention_weights.shape)} should be "
            f"sampling_locations' shape without the last dim, {tuple(sampling_locations.shape[:-1])}"
        )
    for t in (sampling_locations, attention_weights):
        if t.device != value.device or not t.is_floating_point():
            raise ValueError(
                f"ms_deform_attn_triton: expected floating tensors on {value.device}, got {t.dtype} on {t.device}"
            )
    if not value.is_floating_point():
        raise ValueError(f"ms_deform_attn_triton: value must be floating point, got {value.dtype}")
    if value.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"ms_deform_attn_triton: Triton kernels need a CUDA device or TRITON_INTERPRET=1 "
            f"(got {value.device.type} tensors)"
        )
    # (H, W, start) per level as one tiny int32 table on the kernel's device.
    table = torch.cat((spatial_shapes.reshape(-1, 2), level_start_index.reshape(-1, 1).to(spatial_shapes)), 1)
    table = table.to(device=value.device, dtype=torch.int32).contiguous()
    return _MSDeformAttnTriton.apply(
        value.contiguous(), table, sampling_locations.contiguous(), attention_weights.contiguous()
    )
