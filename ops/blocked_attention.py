"""Exact attention in cache-sized blocks, scores recomputed in backward: the ``blocked``
backend of ``ops.attention``, and why that module picks it for bf16 on CPU.

Why a backend of our own: on CPU, torch 2.13's flash kernel is no faster in bf16 than in
fp32 (its backward dominates), while plain matmul-softmax attention in bf16 uses the
CPU's bf16 matrix units but materialises the whole B×H×Q×N matrix several times over
(scores, softmax, their gradients) and streams each through main memory. Here each block
of heads × query rows keeps its full key rows — so the softmax is exact, with no online
rescaling — and is small enough (``GROUP_BYTES``, ``MAX_BLOCK_BYTES``) to stay in the
CPU's cache through every step that touches it: bf16 matrix products with fp32
accumulation, torch's fused softmax and softmax-backward kernels (fp32 inside). Nothing
of the matrix is saved for backward: only q (pre-scaled), k and v; backward recomputes
each block's scores and softmax before its gradients. At PFT's query-pixel shapes (150
queries × 16,384 stride-4 tokens, bf16) this runs in about half the time of plain bf16
attention and of torch's CPU flash kernel, in two blocks of scratch.

Precision: the scores leave the bf16 product rounded to bf16 (torch has no CPU product
of bf16 inputs with an fp32 output), as in plain attention under bf16 autocast; the
softmax and its backward compute in fp32. A flash kernel keeps fp32 scores and is more
exact for large logits (benchmarks/RESULTS.md); ``ops.attention`` picks this path only
for bf16 on CPU, where it is the fast one.

No masks and no dropout (``ops.attention`` routes those elsewhere).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ops.scratch import ScratchBuffers

# Block sizes (bytes of one block's scores; forward holds one such matrix, backward two):
# heads are grouped up to GROUP_BYTES (or the block budget, if smaller), so small
# attentions are a few large products rather than many tiny ones; a head whose matrix is
# above the budget (MAX_BLOCK_BYTES by default) is split into query-row blocks, one
# between the two runs alone. Measured at PFT's stride-4 shape (one head: 4.7 MiB) and
# at 600×600 (0.7 MiB a head): see the block-size table in benchmarks/RESULTS.md.
GROUP_BYTES = 2 * 2**20
MAX_BLOCK_BYTES = 8 * 2**20
# What autocast lowers (fp64 stays fp64).
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


def _blocks(heads: int, queries: int, keys: int, itemsize: int, max_block_bytes: int) -> tuple[int, int]:
    """(heads per block, query rows per block); a block's scores never exceed
    ``max_block_bytes`` unless a single query row does."""
    per_head = max(1, queries * keys * itemsize)  # empty inputs: one block
    if per_head <= max_block_bytes:
        return max(1, min(heads, min(GROUP_BYTES, max_block_bytes) // per_head)), max(1, queries)
    return 1, max(1, min(queries, max_block_bytes // max(1, keys * itemsize)))


def _ranges(total: int, step: int):
    for start in range(0, total, step):
        yield slice(start, min(start + step, total))


class _BlockedAttention(torch.autograd.Function):
    """Forward holds one block of scratch, backward two. Softmax and its backward run in
    place (scores → weights, the weights' gradient → the scores'): torch's softmax
    kernels finish reading a row before they write it, so one buffer serves both;
    ``tests/test_attention.py`` checks the in-place calls bitwise against out-of-place
    ones."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, max_block_bytes: int) -> Tensor:
        q_shape = q.shape
        q, k, v = (t.reshape(math.prod(t.shape[:-2]), *t.shape[-2:]) for t in (q, k, v))  # (batch·heads, …)
        q_scaled = q * scale  # folded into the small operand instead of a pass over the scores
        heads, rows = _blocks(q.shape[0], q.shape[1], k.shape[1], q.element_size(), max_block_bytes)
        scratch = ScratchBuffers(q)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        for hs in _ranges(q.shape[0], heads):
            keys_t = k[hs].transpose(1, 2)
            for rs in _ranges(q.shape[1], rows):
                n_heads, n_rows = hs.stop - hs.start, rs.stop - rs.start
                weights = scratch.get("weights", n_heads, n_rows, k.shape[1])
                torch.bmm(q_scaled[hs, rs], keys_t, out=weights)  # the scores, then in place:
                torch.ops.aten._softmax.out(weights, -1, False, out=weights)  # fp32 inside
                torch.bmm(weights, v[hs], out=out[hs, rs])
        ctx.save_for_backward(q_scaled, k, v)
        ctx.scale, ctx.blocks, ctx.q_shape = scale, (heads, rows), q_shape
        return out.view(*q_shape[:-1], v.shape[-1])

    @staticmethod
    @once_differentiable  # backward writes into buffers: no graph of its own
    def backward(ctx, grad_out: Tensor):
        # A backward called inside an autocast region would otherwise run the products
        # below in its dtype.
        with torch.autocast(grad_out.device.type, enabled=False):
            return _BlockedAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):
        q_scaled, k, v = ctx.saved_tensors
        heads, rows = ctx.blocks
        grad_out = grad_out.reshape(*q_scaled.shape[:-1], v.shape[-1])
        grad_q = torch.empty_like(q_scaled)
        # With no query rows the loops below write nothing: k's and v's gradients are sums
        # over no rows, zeros (empty_like would hand back uninitialised memory).
        new = torch.zeros_like if q_scaled.shape[1] == 0 else torch.empty_like
        grad_k, grad_v = new(k), new(v)
        scratch = ScratchBuffers(q_scaled)
        several_row_blocks = rows < q_scaled.shape[1]
        accumulate_dtype = torch.promote_types(k.dtype, torch.float32)
        for hs in _ranges(q_scaled.shape[0], heads):
            keys_t, values_t = k[hs].transpose(1, 2), v[hs].transpose(1, 2)
            # k's and v's gradients sum over query rows: across row blocks, in fp32 at least.
            if several_row_blocks:
                acc_k = torch.zeros(grad_k[hs].shape, dtype=accumulate_dtype, device=k.device)
                acc_v = torch.zeros(grad_v[hs].shape, dtype=accumulate_dtype, device=v.device)
            for rs in _ranges(q_scaled.shape[1], rows):
                n_heads, n_rows = hs.stop - hs.start, rs.stop - rs.start
                weights = scratch.get("weights", n_heads, n_rows, k.shape[1])
                grad_scores = scratch.get("grad_scores", n_heads, n_rows, k.shape[1])
                torch.bmm(q_scaled[hs, rs], keys_t, out=weights)
                torch.ops.aten._softmax.out(weights, -1, False, out=weights)
                torch.bmm(grad_out[hs, rs], values_t, out=grad_scores)  # the weights' gradient, then:
                torch.ops.aten._softmax_backward_data.out(
                    grad_scores, weights, -1, weights.dtype, grad_input=grad_scores
                )
                torch.bmm(grad_scores, k[hs], out=grad_q[hs, rs])
                if several_row_blocks:
                    acc_v += torch.bmm(weights.transpose(1, 2), grad_out[hs, rs])
                    acc_k += torch.bmm(grad_scores.transpose(1, 2), q_scaled[hs, rs])
                else:
                    torch.bmm(weights.transpose(1, 2), grad_out[hs, rs], out=grad_v[hs])
                    torch.bmm(grad_scores.transpose(1, 2), q_scaled[hs, rs], out=grad_k[hs])
            if several_row_blocks:
                grad_k[hs].copy_(acc_k)
                grad_v[hs].copy_(acc_v)
        grad_q.mul_(ctx.scale)  # d(q·scale)/dq
        leading = ctx.q_shape[:-2]
        return (
            grad_q.view(ctx.q_shape),
            grad_k.view(*leading, *k.shape[-2:]),
            grad_v.view(*leading, *v.shape[-2:]),
            None,
            None,
        )


def autocast_off(device_type: str):
    """A context with autocast off for ``device_type`` (nothing to turn off on devices
    autocast does not know, such as meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def compute_dtypes(*tensors: Tensor) -> list[torch.dtype]:
    """The dtype each tensor is computed in by an op that autocast lowers: autocast's
    dtype for fp32/fp16/bf16 tensors while it is on for their device, else their own."""
    device = tensors[0].device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return [t.dtype for t in tensors]
    lowered = torch.get_autocast_dtype(device)
    return [lowered if t.dtype in _AUTOCAST_CASTS else t.dtype for t in tensors]


def blocked_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, max_block_bytes: int = MAX_BLOCK_BYTES
) -> Tensor:
    """softmax(q·kᵀ·scale)·v for ``q`` …×Q×D and ``k``/``v`` …×N×D (leading dims
    broadcast); output in the compute dtype; scratch of one block of at most
    ``max_block_bytes`` in forward and two in backward. Under autocast the inputs are
    cast to its dtype, as autocast casts them for attention, and the blocks then run
    without it (autocast would lift the softmax to fp32 and add casts around every
    product)."""
    if k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"blocked attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
            "(k and v need the same length, q and k the same head dim)"
        )
    device = q.device.type
    q, k, v = (t.to(dtype) for t, dtype in zip((q, k, v), compute_dtypes(q, k, v)))
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"blocked attention: q, k and v need one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[:-2] != k.shape[:-2]:  # broadcast leading dims; expand's backward sums the gradients
        leading = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        q, k, v = (t.expand(*leading, *t.shape[-2:]) for t in (q, k, v))
    with torch.autocast(device, enabled=False):
        return _BlockedAttention.apply(q, k, v, scale, max_block_bytes)
