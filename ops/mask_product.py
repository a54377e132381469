"""Per-query mask logits, ``einsum("bqc,bchw->bqhw", embed, features)``, whose backward
hands the GEMM library a contiguous operand.

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

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ops.blocked_attention import autocast_off, compute_dtypes


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
        rows = grad.reshape(b, q, -1)
        with autocast_off(grad.device.type):
            grad_embed = torch.bmm(rows, features.reshape(b, c, -1).transpose(1, 2)) if ctx.needs_input_grad[0] else None
            grad_features = None
            if ctx.needs_input_grad[1]:
                # Allocated in the features' shape and filled through a view, not returned
                # as a view: autograd sums the gradients from every layer in place into a
                # buffer only when it is a plain tensor (else one new tensor per layer).
                grad_features = features.new_empty(features.shape)
                torch.bmm(embed.transpose(1, 2).contiguous(), rows, out=grad_features.view(b, c, -1))
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
