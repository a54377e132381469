"""Swin's window attention — softmax(q·kᵀ·scale + bias + mask)·v over many small windows —
saving only q, k and v for backward.

Autograd's version of this (timm's non-fused path) saves the scaled queries and the
attention weights, windows × heads × T × T values, besides q, k and v; in Swin-T at a
256 crop that is about 50 MiB of a training step's saved tensors (fp32), more than its q,
k and v. Here backward recomputes each block's scores and softmax before their gradients,
as flash attention does; the relative-position bias gets its gradient, summed over the
windows that share it. The scores of one block of windows live in scratch buffers
(``MAX_BLOCK_BYTES``), reused from block to block.

Under autocast the products run in its dtype and the scores, bias, softmax and its
backward in fp32, as autocast runs timm's path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ops.blocked_attention import MAX_BLOCK_BYTES, _blocks, _ranges, autocast_off, compute_dtypes
from ops.scratch import ScratchBuffers


def _scores(scratch, scratch_fp32, q, k, bias, mask, scale, images, windows):
    """softmax(q·kᵀ·scale + bias + mask) of one block: (weights in the bias's dtype — fp32
    at least —, the same in q's dtype). ``scratch`` hands out buffers in q's dtype,
    ``scratch_fp32`` in the bias's."""
    heads, tokens = q.shape[-3], q.shape[-2]
    shape = (images, windows, heads, tokens, tokens)
    low = scratch.get("low", images * windows * heads, tokens, tokens)
    torch.bmm(q.reshape(-1, tokens, q.shape[-1]), k.reshape(-1, tokens, k.shape[-1]).transpose(1, 2), out=low)
    weights = low if low.dtype == bias.dtype else scratch_fp32.get("weights", *low.shape)
    torch.add(bias, low.view(shape), alpha=scale, out=weights.view(shape))
    if mask is not None:
        weights.view(shape).add_(mask)
    torch.ops.aten._softmax.out(weights, -1, False, out=weights)
    if weights is not low:
        low.copy_(weights)
    return weights, low


class _WindowAttention(torch.autograd.Function):
    """q, k, v: images × windows × heads × T × d; bias: heads × T × T; mask: windows × 1 ×
    T × T or None."""

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None, scale: float
    ) -> Tensor:
        images, windows = q.shape[:2]
        per_window = math.prod(q.shape[2:-1]) * q.shape[-2] * bias.element_size()
        blocks = _blocks(images, windows, per_window, 1, MAX_BLOCK_BYTES)
        scratch, scratch_fp32 = ScratchBuffers(q), ScratchBuffers(bias)
        out = v.new_empty(v.shape)
        for ims in _ranges(images, blocks[0]):
            for ws in _ranges(windows, blocks[1]):
                count = (ims.stop - ims.start, ws.stop - ws.start)
                _, weights_low = _scores(
                    scratch,
                    scratch_fp32,
                    q[ims, ws],
                    k[ims, ws],
                    bias,
                    None if mask is None else mask[ws],
                    scale,
                    *count,
                )
                torch.bmm(
                    weights_low,
                    v[ims, ws].reshape(weights_low.shape[0], *v.shape[-2:]),
                    out=out[ims, ws].view(weights_low.shape[0], *v.shape[-2:]),
                )
        ctx.save_for_backward(q, k, v, bias, mask)
        ctx.scale, ctx.blocks = scale, blocks
        return out

    @staticmethod
    @once_differentiable  # backward writes into buffers: no graph of its own
    def backward(ctx, grad_out: Tensor):
        with autocast_off(grad_out.device.type):
            return _WindowAttention._backward(ctx, grad_out.contiguous())

    @staticmethod
    def _backward(ctx, grad_out: Tensor):
        q, k, v, bias, mask = ctx.saved_tensors
        images, windows = q.shape[:2]
        tokens, dim = q.shape[-2:]
        accumulate_dtype = bias.dtype
        grad_q, grad_k, grad_v = (t.new_empty(t.shape) for t in (q, k, v))
        grad_bias = torch.zeros_like(bias) if ctx.needs_input_grad[3] else None
        scratch, scratch_fp32 = ScratchBuffers(q), ScratchBuffers(bias)
        for ims in _ranges(images, ctx.blocks[0]):
            for ws in _ranges(windows, ctx.blocks[1]):
                count = (ims.stop - ims.start, ws.stop - ws.start)
                block_mask = None if mask is None else mask[ws]
                weights, weights_low = _scores(
                    scratch, scratch_fp32, q[ims, ws], k[ims, ws], bias, block_mask, ctx.scale, *count
                )
                # Blocks are contiguous: whole images, or windows of one image.
                q_b, k_b, v_b, grad_out_b, grad_q_b, grad_k_b, grad_v_b = (
                    t[ims, ws].view(weights.shape[0], tokens, dim)
                    for t in (q, k, v, grad_out, grad_q, grad_k, grad_v)
                )
                torch.bmm(weights_low.transpose(1, 2), grad_out_b, out=grad_v_b)
                # The weights' gradient, then in place the scores' (fp32).
                grad_low = scratch.get("grad_low", *weights.shape)
                torch.bmm(grad_out_b, v_b.transpose(1, 2), out=grad_low)
                grad_scores = (
                    grad_low
                    if grad_low.dtype == accumulate_dtype
                    else scratch_fp32.get("grad", *weights.shape)
                )
                if grad_scores is not grad_low:
                    grad_scores.copy_(grad_low)
                torch.ops.aten._softmax_backward_data.out(
                    grad_scores, weights, -1, accumulate_dtype, grad_input=grad_scores
                )
                if grad_bias is not None:  # shared by every window of every image
                    grad_bias += grad_scores.view(-1, *bias.shape).sum(0)
                if grad_scores is not grad_low:
                    grad_low.copy_(grad_scores)
                torch.bmm(grad_low, k_b, out=grad_q_b)
                torch.bmm(grad_low.transpose(1, 2), q_b, out=grad_k_b)
        grad_q.mul_(ctx.scale)
        grad_k.mul_(ctx.scale)
        return grad_q, grad_k, grad_v, grad_bias, None, None


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor, mask: Tensor | None
) -> Tensor:
    """Attention within each window: ``q``, ``k``, ``v`` (images·windows) × heads × T × d,
    windows in the mask's order within each image; ``bias`` heads × T × T (the relative
    position bias, shared by every window); ``mask`` windows × T × T (added to the
    scores; Swin's shifted-window mask) or None. Returns (images·windows) × heads × T × d
    in the compute dtype (autocast's, if on)."""
    heads, tokens, dim = q.shape[1:]
    window_count = mask.shape[0] if mask is not None else 1
    if q.shape[0] % window_count or bias.shape != (heads, tokens, tokens):
        raise ValueError(
            f"window attention: q {tuple(q.shape)}, bias {tuple(bias.shape)} and mask "
            f"{None if mask is None else tuple(mask.shape)} do not fit (expected a bias of heads x T x T and "
            "a window count dividing q's first dim)"
        )
    q, k, v = (t.to(dtype) for t, dtype in zip((q, k, v), compute_dtypes(q, k, v)))
    accumulate_dtype = torch.promote_types(q.dtype, torch.float32)
    bias = bias.to(accumulate_dtype).contiguous()
    if mask is not None:
        mask = mask.to(accumulate_dtype).unsqueeze(1).contiguous()
    q, k, v = (t.reshape(-1, window_count, heads, tokens, dim).contiguous() for t in (q, k, v))
    with autocast_off(q.device.type):
        out = _WindowAttention.apply(q, k, v, bias, mask, scale)
    return out.view(-1, heads, tokens, dim)
