"""The one attention entry point of every decoder: ``scaled_dot_product_attention`` with
an explicit backend choice, and ``MultiheadAttention`` built on it.

Why not call ``F.scaled_dot_product_attention`` and let torch pick? Because torch falls
back to its *math* backend silently, and the math backend materialises the whole
B×H×Q×N attention matrix (plus its softmax and dropout mask, all saved for backward).
For PFT's query-pixel cross-attention at 640² that is 150 queries × 25,600 stride-4
tokens × 8 heads × 4 scales per image — gigabytes. Here the choice is made explicitly,
by device, dtype, mask and dropout, and the memory-bounded ``chunked`` path replaces the
math backend whenever the matrix would exceed a budget:

- CPU: bf16 without mask or dropout → ``blocked`` (``ops/blocked_attention.py``: exact
  attention in cache-sized blocks, bf16 products, scores recomputed in backward; faster
  in bf16 than both torch's CPU flash kernel and plain matmul-softmax); otherwise torch's
  flash kernel (tiled, fp32/bf16/fp16, boolean and additive masks) when there is no
  dropout — it has no dropout support on CPU; with dropout ``math`` for small matrices
  and ``chunked`` for large ones.
- CUDA: half precision → cuDNN (sm90+, no mask) / flash (no mask) / memory-efficient
  (masks); fp32 → memory-efficient; torch may fall through this list in order. fp64 →
  math / chunked.

``chunked`` splits the queries into blocks whose matrix fits the budget and runs each
block under non-reentrant activation checkpointing, so backward keeps only the inputs
and recomputes one block at a time (dropout masks are reproduced: checkpointing restores
the RNG state). It and ``math`` compute scores and softmax in fp32 for half-precision
inputs — the fp32 accumulation the fused kernels do internally.

Masks follow SDPA's convention: boolean ``True`` = may attend, or an additive float
mask. A query row that may attend to nothing (Mask2Former's masked attention when a
predicted mask is empty) attends to every key instead, as Mask2Former does, rather than
producing NaNs or zeros.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from ops.blocked_attention import blocked_attention, compute_dtypes
from ops.dropout import dropout

AttentionBackend = Literal["auto", "flash", "cudnn", "efficient", "math", "chunked", "blocked"]
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)

# The math backend's matrix above which ``auto`` switches to ``chunked`` (scores + softmax
# + dropout mask, fp32), and the target size of one chunk's matrix.
DEFAULT_MAX_MATRIX_MIB = 256.0

_SDP_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_FUSED_ON = {"cpu": ("flash",), "cuda": ("flash", "cudnn", "efficient")}
_HALF = (torch.float16, torch.bfloat16)


def check_backend(name: str) -> str:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"model.ops.attention_backend: attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
            f"got {name!r}"
        )
    return name


def matrix_bytes(batch_heads: int, queries: int, keys: int, dropout_p: float) -> int:
    """Bytes the math backend allocates for one attention: fp32 scores and softmax, plus
    the dropout mask when there is dropout."""
    per_entry = 4 + 4 + (4 if dropout_p > 0 else 0)
    return batch_heads * queries * keys * per_entry


def choose_backends(
    device_type: str,
    dtype: torch.dtype,
    *,
    has_mask: bool,
    dropout_p: float,
    matrix_size: int,
    max_matrix_bytes: float,
    requested: str = "auto",
    cuda_capability: tuple[int, int] | None = None,
) -> list[str]:
    """Backends to try, in priority order, for one attention call. ``chunked`` and
    ``math`` are never mixed with fused backends: the fused list is given to torch, which
    falls through it, and fails rather than silently materialising the matrix."""
    check_backend(requested)
    fused_here = _FUSED_ON.get(device_type, ())
    if requested != "auto":
        if requested in _SDP_BACKENDS and requested != "math" and requested not in fused_here:
            raise ValueError(
                f"model.ops.attention_backend: attention backend {requested!r} does not run on {device_type}; "
                f"choose one of auto, {', '.join(fused_here + ('math', 'chunked', 'blocked'))}"
            )
        if requested == "blocked" and (has_mask or dropout_p > 0.0):
            raise ValueError(
                "model.ops.attention_backend: attention backend 'blocked' takes no mask and no dropout; "
                "use auto, flash, math or chunked here"
            )
        return [requested]
    small = matrix_size <= max_matrix_bytes
    fallback = ["math"] if small else ["chunked"]
    if device_type == "cpu":
        if dtype == torch.bfloat16 and not has_mask and dropout_p == 0.0:
            return ["blocked"]
        if dtype in (torch.float32, *_HALF) and dropout_p == 0.0:
            return ["flash"]
        return fallback
    if device_type == "cuda":
        if dtype in _HALF:
            order = []
            if not has_mask and cuda_capability is not None and cuda_capability >= (9, 0):
                order.append("cudnn")
            if not has_mask:
                order.append("flash")
            return order + ["efficient"]
        if dtype == torch.float32:
            return ["efficient"]
    return fallback


def _attend_somewhere(mask: Tensor) -> Tensor:
    """Rows that may attend to no key attend to all of them (Mask2Former)."""
    if mask.dtype == torch.bool:
        return mask | ~mask.any(-1, keepdim=True)
    blocked = torch.isinf(mask) & (mask < 0)
    return mask.masked_fill(blocked.all(-1, keepdim=True), 0.0)


def _math_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, scale: float
) -> Tensor:
    """Explicit attention with fp32 scores, softmax and accumulation; output in q's dtype.
    (Autocast is off inside: it would run the matmuls in half precision again.)"""
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        if mask is not None:
            scores = (
                scores.masked_fill(~mask, float("-inf"))
                if mask.dtype == torch.bool
                else scores + mask.float()
            )
        weights = scores.softmax(-1)
        if dropout_p > 0.0:
            weights = dropout(weights, dropout_p)
        return torch.matmul(weights, v.float()).to(q.dtype)


def _chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    dropout_p: float,
    scale: float,
    max_matrix_bytes: float,
) -> Tensor:
    batch_heads = math.prod(q.shape[:-2])
    queries, keys = q.shape[-2], k.shape[-2]
    per_query = max(1, matrix_bytes(batch_heads, 1, keys, dropout_p))
    chunk = max(1, min(queries, int(max_matrix_bytes // per_query)))
    if queries == 0:  # no chunks to run (and torch.cat takes no empty list)
        return _math_attention(q, k, v, mask, dropout_p, scale)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outputs = []
    for start in range(0, queries, chunk):
        q_chunk = q[..., start : start + chunk, :]
        mask_chunk = None
        if mask is not None:
            # Masks broadcast over batch/heads; only a query dimension > 1 is sliced.
            mask_chunk = mask[..., start : start + chunk, :] if mask.shape[-2] > 1 else mask
        if needs_grad:
            out = checkpoint(
                _math_attention, q_chunk, k, v, mask_chunk, dropout_p, scale, use_reentrant=False
            )
        else:
            out = _math_attention(q_chunk, k, v, mask_chunk, dropout_p, scale)
        outputs.append(out)
    return torch.cat(outputs, dim=-2)


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    backend: str = "auto",
    max_matrix_mib: float = DEFAULT_MAX_MATRIX_MIB,
    scale: float | None = None,
) -> Tensor:
    """``q``: B×H×Q×D, ``k``/``v``: B×H×N×D (any leading dims), ``attn_mask``
    broadcastable to B×H×Q×N (bool, True = attend; or additive float). Returns B×H×Q×D in
    q's dtype."""
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
            "(q and k need the same head dim, k and v the same length)"
        )
    if attn_mask is not None:
        attn_mask = _attend_somewhere(attn_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    max_bytes = max_matrix_mib * 2**20
    capability = torch.cuda.get_device_capability(q.device) if q.device.type == "cuda" else None
    # The dtype the kernel will see: autocast lowers fp32 inputs; mixed dtypes go by q's
    # (the fused kernels refuse them, with torch's own error).
    dtypes = set(compute_dtypes(q, k, v))
    backends = choose_backends(
        q.device.type,
        dtypes.pop() if len(dtypes) == 1 else q.dtype,
        has_mask=attn_mask is not None,
        dropout_p=dropout_p,
        matrix_size=matrix_bytes(math.prod(q.shape[:-2]), q.shape[-2], k.shape[-2], dropout_p),
        max_matrix_bytes=max_bytes,
        requested=backend,
        cuda_capability=capability,
    )
    if backends == ["chunked"]:
        return _chunked_attention(q, k, v, attn_mask, dropout_p, scale, max_bytes)
    if backends == ["math"]:
        return _math_attention(q, k, v, attn_mask, dropout_p, scale)
    if backends == ["blocked"]:
        return blocked_attention(q, k, v, scale)
    with sdpa_kernel([_SDP_BACKENDS[name] for name in backends], set_priority=True):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    if q.device.type == "cpu":
        # torch's CPU flash kernel (2.13) returns a zero row for a query row holding NaN
        # or Inf, where every other backend returns NaN: add the row's sum times zero, so
        # a NaN in comes out as NaN (finite rows get + 0, their values unchanged).
        out = out + (q.sum(-1, keepdim=True) * 0).to(out.dtype)
    return out


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters (q/k/v/out
    projections with biases, the same count) on ``scaled_dot_product_attention``.
    ``forward(query: B×Q×C, key: B×N×C, value: B×N×C, attn_mask=None) -> B×Q×C``; a
    mask is B×Q×N or B×H×Q×N (True = may attend)."""

    def __init__(
        self,
        dim: int,
        nheads: int,
        dropout: float = 0.0,
        backend: str = "auto",
        max_matrix_mib: float = DEFAULT_MAX_MATRIX_MIB,
    ) -> None:
        super().__init__()
        if dim % nheads:
            raise ValueError(f"attention: dim={dim} must be divisible by nheads={nheads}")
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.nheads = nheads
        self.dropout = dropout
        self.backend = check_backend(backend)
        self.max_matrix_mib = max_matrix_mib
        # nn.MultiheadAttention's initialisation: packed Xavier q/k/v, zero biases.
        self.reset_qkv()
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.zeros_(proj.bias)

    @torch.no_grad()
    def reset_qkv(self) -> None:
        """Xavier-uniform over q/k/v stacked as one 3C×C matrix, as on
        nn.MultiheadAttention's ``in_proj_weight`` (a smaller bound than per C×C matrix)."""
        packed = torch.empty(3 * self.q_proj.out_features, self.q_proj.in_features)
        nn.init.xavier_uniform_(packed)
        for proj, chunk in zip((self.q_proj, self.k_proj, self.v_proj), packed.chunk(3)):
            proj.weight.copy_(chunk)

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.nheads, dim // self.nheads).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        batch, length, dim = query.shape
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask[:, None]  # same mask for every head
        out = scaled_dot_product_attention(
            self._heads(self.q_proj(query)),
            self._heads(self.k_proj(key)),
            self._heads(self.v_proj(value)),
            attn_mask,
            self.dropout if self.training else 0.0,
            backend=self.backend,
            max_matrix_mib=self.max_matrix_mib,
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


def xavier_init_like_detr(module: nn.Module) -> None:
    """DETR's transformer initialisation: Xavier-uniform on every matrix, where the
    attentions' q/k/v count as nn.MultiheadAttention's one packed matrix."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    for m in module.modules():
        if isinstance(m, MultiheadAttention):
            m.reset_qkv()
