"""Linear layers that save less for backward: the layer norm before a linear layer, and
the GELU between the two linear layers of an MLP, are recomputed in backward instead of
saved; ReLU and dropout before a linear layer save nothing of their own.

Autograd saves, for ``fc2(gelu(fc1(norm(x))))``, the norm's input (for the norm's
backward) *and* its output (for fc1's weight gradient), and fc1's output (for GELU's
backward) *and* GELU's output (for fc2's weight gradient): per token 2C + 8C values in a
transformer MLP of width 4C. The second of each pair is an elementwise function of the
first, one pass over memory to recompute — a GELU over Swin-T's largest MLP hidden
(8192 × 384) takes under 1 ms on two cores — so these functions save only x and fc1's
output, 5C values a token: half of what the MLP saved. This is the elementwise
recomputation torch.compile's partitioner chooses by itself (it saves the inputs of
cheap pointwise ops rather than their outputs), not checkpointing: no matrix product is
repeated.

Under autocast the linear layers run in its dtype, as ``F.linear`` does there (the
inputs and parameters are cast outside the autograd functions, so their casts' backward
is autograd's), and the layer norm in its input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ops.blocked_attention import autocast_off, compute_dtypes
from ops.dropout import dropout


def _linear_backward(
    grad_out: Tensor, inputs: Tensor | None, weight: Tensor, has_bias: bool, needs, recomputed: bool = False
) -> tuple:
    """(∂L/∂inputs, ∂L/∂W, ∂L/∂b) of ``y = inputs · Wᵀ + b`` from ∂L/∂y, each None where
    ``needs`` (three flags) says it is not needed; ``inputs`` is read only for ∂L/∂W.
    ``recomputed``: ``inputs`` was rebuilt for this backward alone, so ∂L/∂inputs (its
    shape) is written over it once ∂L/∂W is done — one activation-sized buffer fewer at
    the moment these layers' backward sets the step's memory peak (Swin's first stage)."""
    rows = grad_out.reshape(-1, grad_out.shape[-1])
    grad_weight = rows.t().mm(inputs.reshape(-1, inputs.shape[-1])) if needs[1] else None
    grad_bias = rows.sum(0) if has_bias and needs[2] else None
    grad_inputs = None
    if needs[0]:
        reuse = recomputed and inputs is not None and inputs.dtype == grad_out.dtype and inputs.is_contiguous()
        grad_inputs = torch.matmul(grad_out, weight, out=inputs if reuse else None)
    return grad_inputs, grad_weight, grad_bias


class _LayerNormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias):
        normed = F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
        ctx.save_for_backward(x, norm_weight, norm_bias, weight)
        ctx.eps, ctx.has_bias = eps, bias is not None
        return F.linear(normed.to(weight.dtype), weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, norm_weight, norm_bias, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with autocast_off(grad_out.device.type):
            normed, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], norm_weight, norm_bias, ctx.eps)
            normed = normed.to(weight.dtype)
            grad_normed, grad_weight, grad_bias = _linear_backward(
                grad_out, normed, weight, ctx.has_bias, (any(needs[:3]), needs[4], needs[5]), recomputed=True
            )
            del normed
            grad_x = grad_norm_weight = grad_norm_bias = None
            if grad_normed is not None:
                grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
                    grad_normed.to(x.dtype),
                    x,
                    x.shape[-1:],
                    mean,
                    rstd,
                    norm_weight,
                    norm_bias,
                    [needs[0], needs[1] and norm_weight is not None, needs[2] and norm_bias is not None],
                )
        return grad_x, grad_norm_weight, grad_norm_bias, None, grad_weight, grad_bias


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias):
        ctx.save_for_backward(hidden, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(hidden), weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with autocast_off(grad_out.device.type):
            activated = F.gelu(hidden) if needs[1] else None
            grad_activated, grad_weight, grad_bias = _linear_backward(
                grad_out, activated, weight, ctx.has_bias, needs, recomputed=True
            )
            del activated
            if grad_activated is not None:
                # In place: an elementwise kernel may write over its own input.
                torch.ops.aten.gelu_backward.grad_input(grad_activated, hidden, grad_input=grad_activated)
        return grad_activated, grad_weight, grad_bias


class _ReluDropoutLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, p, training):
        activated = dropout(F.relu(hidden), p, training)
        ctx.save_for_backward(activated, weight)
        ctx.has_bias, ctx.scale = bias is not None, 1 / (1 - p) if training and p > 0 else 1.0
        return F.linear(activated, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        activated, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with autocast_off(grad_out.device.type):
            grad_hidden, grad_weight, grad_bias = _linear_backward(
                grad_out, activated, weight, ctx.has_bias, needs
            )
            if grad_hidden is not None:
                # relu(h)·mask·scale > 0 exactly where both ReLU and dropout pass h's
                # gradient, and dropout scales it: no need for h or the mask.
                grad_hidden.mul_(activated > 0)
                if ctx.scale != 1.0:
                    grad_hidden.mul_(ctx.scale)
        return grad_hidden, grad_weight, grad_bias, None, None


def _cast_linear(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``weight`` and ``bias`` in the dtype ``F.linear`` computes in here (autocast's)."""
    dtype = compute_dtypes(weight)[0]
    return weight.to(dtype), (bias.to(dtype) if bias is not None else None)


def layer_norm_linear(x: Tensor, norm: nn.LayerNorm, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(norm(x), weight, bias)``, saving x but not ``norm(x)`` for backward."""
    weight, bias = _cast_linear(weight, bias)
    with autocast_off(x.device.type):
        return _LayerNormLinear.apply(x, norm.weight, norm.bias, norm.eps, weight, bias)


def gelu_linear(hidden: Tensor, linear: nn.Linear) -> Tensor:
    """``linear(F.gelu(hidden))``, saving ``hidden`` but not its GELU for backward."""
    weight, bias = _cast_linear(linear.weight, linear.bias)
    with autocast_off(hidden.device.type):
        return _GeluLinear.apply(hidden.to(weight.dtype), weight, bias)


def relu_dropout_linear(hidden: Tensor, dropout: nn.Dropout, linear: nn.Linear) -> Tensor:
    """``linear(dropout(F.relu(hidden)))`` (DETR's FFN after its first layer), saving only
    the dropout's output, which the linear layer needs anyway: not ReLU's output, nor
    the dropout mask."""
    weight, bias = _cast_linear(linear.weight, linear.bias)
    with autocast_off(hidden.device.type):
        return _ReluDropoutLinear.apply(hidden.to(weight.dtype), weight, bias, dropout.p, dropout.training)


def is_plain_gelu_mlp(mlp: nn.Module) -> bool:
    """Whether ``mlp`` is timm's ``Mlp`` as transformer blocks build it: fc1, exact GELU,
    fc2, no dropout while training and no norm between them — what ``norm_gelu_mlp``
    computes."""
    act, norm = getattr(mlp, "act", None), getattr(mlp, "norm", None)
    drops = [getattr(mlp, name, None) for name in ("drop1", "drop2")]
    return (
        isinstance(getattr(mlp, "fc1", None), nn.Linear)
        and isinstance(getattr(mlp, "fc2", None), nn.Linear)
        and type(act) is nn.GELU
        and act.approximate == "none"
        and isinstance(norm, nn.Identity)
        and all(isinstance(d, nn.Dropout) and (d.p == 0 or not mlp.training) for d in drops)
    )


def norm_gelu_mlp(x: Tensor, norm: nn.LayerNorm, mlp: nn.Module) -> Tensor:
    """``mlp(norm(x))`` for a plain GELU MLP (``is_plain_gelu_mlp``), saving x and fc1's
    output only."""
    return gelu_linear(layer_norm_linear(x, norm, mlp.fc1.weight, mlp.fc1.bias), mlp.fc2)
