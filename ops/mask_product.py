"""Per-query mask logits, ``einsum("bqc,bchw->bqhw", embed, features)``, whose backward
hands the GEMM library a contiguous operand and, on CPU, multiplies only the rows of the
incoming gradient that are not all zero (see ``SPARSE_FRACTION``).

Why: autograd's backward of that product computes ∂L/∂features as ``bmm(embedᵀ, grad)``
with ``embedᵀ`` a transposed view, and oneDNN's batched GEMM runs ~30 % slower on it
(2-core CPU, fp32, B=2, Q=100, C=256, 64×64: 6.1 ms against 4.6 ms with a contiguous
copy of the B×C×Q ``embedᵀ``, which is tiny). MaskFormer and PFT run this product once per
supervised decoder layer (or per scale). Values are the same product; only the GEMM's
summation order may differ.

Under autocast both operands are cast as autocast casts ``einsum``'s (ops.blocked_attention's
``compute_dtypes``), outside the function, so the casts' backward is autograd's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ops.blocked_attention import autocast_off, compute_dtypes
from ops.upsample import upsample_bilinear


class _MaskProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embed: Tensor, features: Tensor) -> Tensor:
        b, c = features.shape[:2]
        ctx.save_for_backward(embed, features)  # as einsum saves: features are shared by every layer
        return torch.bmm(embed, features.reshape(b, c, -1)).view(b, embed.shape[1], *features.shape[2:])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        embed, features = ctx.saved_tensors
        b, q, c = embed.shape
        pixels = math.prod(features.shape[2:])  # not -1: q may be 0 (no matched query in the batch)
        rows = grad.reshape(b, q, pixels)
        feats = features.reshape(b, c, pixels)
        need_embed, need_features = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with autocast_off(grad.device.type):
            # Queries whose mask gets any gradient. ``ne(0)`` after ``amax``, not ``> 0``,
            # so a NaN row counts as live and still propagates. CPU only: counting them
            # would stall a GPU's stream every layer.
            live = rows.abs().amax(-1).ne(0) if grad.device.type == "cpu" else None
            if live is None or int(live.sum()) * SPARSE_FRACTION > live.numel():
                grad_embed = torch.bmm(rows, feats.transpose(1, 2)) if need_embed else None
                grad_features = None
                if need_features:
                    # Allocated in the features' shape and filled through a view, not returned
                    # as a view: autograd sums the gradients from every layer in place into a
                    # buffer only when it is a plain tensor (else one new tensor per layer).
                    grad_features = features.new_empty(features.shape)
                    torch.bmm(embed.transpose(1, 2).contiguous(), rows, out=grad_features.view(b, c, -1))
                return grad_embed, grad_features
            return _sparse_backward(embed, feats, rows, live, need_embed, need_features, features.shape)


# A mask loss gathered from the full product reaches only the matched queries' masks (the
# classes present, in PFT), so in training most rows of the incoming gradient are
# exactly zero. Below 1/SPARSE_FRACTION live rows the backward multiplies only those:
# the zero rows add exactly nothing to either gradient. 2-core CPU, fp32, B=2, Q=100,
# C=256, 64×64, 5 live rows per image: forward + backward 17.8 → 9.3 ms a layer (the
# check costs 0.06 ms). The criteria of MaskFormer and PFT avoid the gather in training
# (matched_mask_logits); it remains for outputs given without their factors.
SPARSE_FRACTION = 2


def _sparse_backward(
    embed: Tensor, feats: Tensor, rows: Tensor, live: Tensor, need_embed: bool, need_features: bool,
    features_shape: torch.Size,
) -> tuple[Tensor | None, Tensor | None]:
    """The two gradients of ``bmm(embed, feats)`` from the ``live`` rows of ``rows`` only."""
    b, c = feats.shape[:2]
    grad_embed = torch.zeros_like(embed) if need_embed else None
    grad_features = feats.new_empty(features_shape) if need_features else None
    for image in range(b):
        index = live[image].nonzero().squeeze(1)
        grad_rows = rows[image].index_select(0, index)  # n×HW
        if need_embed:
            grad_embed[image].index_copy_(0, index, torch.mm(grad_rows, feats[image].t()))
        if need_features:
            # n = 0 gives a zero-filled C×HW product, as the dense path would.
            picked = embed[image].index_select(0, index).t().contiguous()
            torch.mm(picked, grad_rows, out=grad_features[image].view(c, -1))
    return grad_embed, grad_features


def mask_logits(embed: Tensor, features: Tensor) -> Tensor:
    """``einsum("bqc,bchw->bqhw", embed, features)``: B×Q×C query embeddings times B×C×H×W
    mask features (any number of trailing spatial dims)."""
    if embed.dim() != 3 or features.dim() < 3 or features.shape[:2] != (embed.shape[0], embed.shape[2]):
        raise ValueError(
            f"mask_logits needs B×Q×C embeddings and B×C×… features, got {tuple(embed.shape)} and {tuple(features.shape)}"
        )
    dtype = torch.promote_types(*compute_dtypes(embed, features))
    with autocast_off(embed.device.type):
        return _MaskProduct.apply(embed.to(dtype), features.to(dtype))


def average_over_scales(scale_logits: Iterable[Tensor], size: Sequence[int]) -> Tensor:
    """PFT's masks from several scales: each scale's mask logits upsampled (bilinear) to
    ``size`` and averaged in logit space; one scale (MaskFormer) is returned as it is. A
    running sum, so the S full-size maps (the largest tensors here) are never stacked."""
    total: Tensor | None = None
    count = 0
    for logits in scale_logits:
        if logits.shape[-2:] != tuple(size):
            logits = upsample_bilinear(logits, size)  # ATen's CPU backward is slow
        total = logits if total is None else total + logits
        count += 1
    if total is None:
        raise ValueError("average_over_scales needs at least one scale")
    return total / count if count > 1 else total


def matched_mask_logits(
    embeds: Sequence[Tensor], features: Sequence[Tensor], queries: list[Tensor], dtype: torch.dtype
) -> Tensor:
    """The mask logits of the listed queries only (N×H×W, N = the queries listed over all
    images): ``cat_b average_over_scales(mask_logits(embeds[s], features[s]))[b, queries[b]]``
    with one B×Q×C embedding and one B×C×H×W feature map per scale (MaskFormer: one scale;
    PFT: its four, H×W the first's), each product computed in ``dtype`` (that of the full
    product the model returned, so the values are the ones it holds).

    Why: a loss on the matched masks, gathered from the full B×Q×H×W product, gets from
    the gather's backward a zero-filled gradient of that whole product — one per decoder
    layer, all of them allocated before any layer's product runs its backward (autograd
    runs the loss's nodes first), ~20 MiB apiece at a 640 crop with 100 queries; in PFT
    each scale's upsampling then runs its backward over all K class rows, where only the
    classes in the image get a gradient. Here the products are taken again for a few rows:
    B×n_max queries, n_max the most listed in one image or 1 (the others repeat query 0,
    their logits dropped), and the gradients are those rows' only."""
    if len(embeds) != len(features) or not embeds:
        raise ValueError(f"matched_mask_logits needs one embedding per feature map, got {len(embeds)} and {len(features)}")
    batch = embeds[0].shape[0]
    device = embeds[0].device
    # At least one row: with no query listed, upsampling would get zero rows (ATen rejects them).
    most = max([1, *(len(q) for q in queries)])
    index = torch.zeros(batch, most, dtype=torch.long, device=device)
    keep = []
    for image, rows in enumerate(queries):
        index[image, : len(rows)] = rows.to(device)
        keep.append(image * most + torch.arange(len(rows), device=device))

    def scale_rows(embed: Tensor, feats: Tensor) -> Tensor:
        rows = embed.gather(1, index[..., None].expand(-1, -1, embed.shape[-1]))
        return mask_logits(rows.to(dtype), feats.to(dtype))

    with autocast_off(device.type):  # every operand in ``dtype``, whatever the caller's autocast
        logits = average_over_scales(map(scale_rows, embeds, features), features[0].shape[-2:])
    return logits.flatten(0, 1)[torch.cat(keep)]
