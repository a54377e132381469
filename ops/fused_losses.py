"""Memory-lean sigmoid focal and dice losses: autograd saves only logits and targets.

Written with plain tensor ops, the focal loss keeps a dozen full-size intermediates
(sigmoid, BCE, p_t, its power, alpha weights...) alive until backward, for every matched
mask of every deep-supervision layer: at 256x256 with 6 decoder layers that is hundreds
of MB, more than the backbone's activations. These functions save only the fp32 logits
and the (boolean) targets and recompute the rest in backward with the closed-form
gradient, so a mask loss costs two mask-sized tensors of memory however many terms it has.

Both reduce as MaskFormer does: focal = mean over pixels, summed over masks; dice =
1 - (2|p.t| + 1) / (|p| + |t| + 1) summed over masks; the caller divides by num_masks.
Always fp32, whatever the autocast.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _focal_parts(logits: Tensor, targets: Tensor, alpha: float, gamma: float):
    """sigmoid, BCE, p_t and alpha_t: the pieces both the loss and its gradient need."""
    prob = torch.sigmoid(logits)
    # BCE with logits, numerically stable: max(x, 0) - x*t + log(1 + exp(-|x|))
    ce = torch.nn.functional.softplus(-logits.abs()) + logits.clamp(min=0) - logits * targets
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets) if alpha >= 0 else torch.ones_like(targets)
    return prob, ce, p_t, alpha_t


class _SigmoidFocalLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
        targets_f = targets.float()
        _, ce, p_t, alpha_t = _focal_parts(logits, targets_f, alpha, gamma)
        loss = alpha_t * ce * (1 - p_t).pow(gamma)
        ctx.save_for_backward(logits, targets)
        ctx.alpha, ctx.gamma = alpha, gamma
        return loss.mean(dim=1).sum()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        logits, targets = ctx.saved_tensors
        targets_f = targets.float()
        alpha, gamma = ctx.alpha, ctx.gamma
        prob, ce, p_t, alpha_t = _focal_parts(logits, targets_f, alpha, gamma)
        one_minus_pt = 1 - p_t
        # d/dx [alpha_t * ce * (1 - p_t)^gamma], with d ce/dx = p - t and
        # d (1 - p_t)/dx = -(2t - 1) p (1 - p).
        grad = (prob - targets_f) * one_minus_pt.pow(gamma)
        if gamma != 0:
            grad = grad - ce * gamma * one_minus_pt.pow(gamma - 1) * (2 * targets_f - 1) * prob * (1 - prob)
        grad = grad * alpha_t * (grad_output / logits.shape[1])
        return grad, None, None, None


class _DiceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        prob = torch.sigmoid(logits)
        targets_f = targets.float()
        numerator = 2 * (prob * targets_f).sum(1) + 1
        denominator = prob.sum(1) + targets_f.sum(1) + 1
        ctx.save_for_backward(logits, targets, numerator, denominator)
        return (1 - numerator / denominator).sum()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        logits, targets, numerator, denominator = ctx.saved_tensors
        prob = torch.sigmoid(logits)
        # loss_i = 1 - N_i / D_i;  dN/dp = 2t, dD/dp = 1  ->  dloss/dp = (N - 2t D) / D^2
        grad_prob = (numerator[:, None] - 2 * targets.float() * denominator[:, None]) / denominator[:, None].pow(2)
        return grad_output * grad_prob * prob * (1 - prob), None


def _as_fp32_flat(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    logits = logits.float().flatten(1)
    targets = targets.flatten(1)
    if targets.dtype != torch.bool and targets.is_floating_point():
        targets = targets.float()
    return logits, targets


def fused_sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_masks: float, alpha: float = 0.25,
                             gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss of N masks (N x ...), mean over pixels, summed, / num_masks."""
    with torch.autocast(logits.device.type, enabled=False):
        logits, targets = _as_fp32_flat(logits, targets)
        return _SigmoidFocalLoss.apply(logits, targets, alpha, gamma) / num_masks


def fused_dice_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Dice loss of N masks (N x ...), summed over masks, / num_masks."""
    with torch.autocast(logits.device.type, enabled=False):
        logits, targets = _as_fp32_flat(logits, targets)
        return _DiceLoss.apply(logits, targets) / num_masks
