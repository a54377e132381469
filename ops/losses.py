"""Mask losses of DETR / MaskFormer: sigmoid focal loss and dice loss, on mask logits.

Two forms of each:

- ``sigmoid_focal_loss`` / ``dice_loss``: one prediction per target (matched pairs),
  summed over masks and divided by ``num_masks`` (the number of ground-truth masks,
  averaged over ranks by the caller) — the criterion's terms.
- ``batch_sigmoid_focal_loss`` / ``batch_dice_loss``: every prediction against every
  target, an N×M cost matrix — the Hungarian matcher's costs.

``focal_ce_loss`` is PFT's focal-style cross-entropy on the *class* logits (sigmoid focal
loss against one-hot class targets), normalised like the mask losses.

All math runs in float32 with autocast off, whatever the caller's precision: the sigmoid
of bf16 logits saturates early, and sums over 10^5 pixels lose most of bf16's 8 bits of
mantissa. ``inputs`` are logits of shape N×P (or N×H×W: flattened here); ``targets`` are
0/1 (bool or float, soft values also work) of the same shape, or M×P for the batch forms.

Pure functions; this module imports nothing of ours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _fp32_flat(x: Tensor) -> Tensor:
    return x.float().flatten(1)


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    num_masks: float | Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """Focal loss (Lin et al.) averaged over pixels, summed over masks, / ``num_masks``.

    ``alpha < 0`` disables the class-balancing factor.
    """
    with torch.autocast(device_type=inputs.device.type, enabled=False):
        inputs = _fp32_flat(inputs)
        targets = _fp32_flat(targets)
        prob = inputs.sigmoid()
        ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
        p_t = prob * targets + (1 - prob) * (1 - targets)
        loss = ce_loss * ((1 - p_t) ** gamma)
        if alpha >= 0:
            alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
            loss = alpha_t * loss
        return loss.mean(1).sum() / num_masks


def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float | Tensor) -> Tensor:
    """``1 - (2|p∩t| + 1) / (|p| + |t| + 1)`` per mask (p = sigmoid), summed, / ``num_masks``.

    The +1 smoothing (DETR's) keeps empty-vs-empty at loss 0 and the gradient finite.
    """
    with torch.autocast(device_type=inputs.device.type, enabled=False):
        inputs = _fp32_flat(inputs).sigmoid()
        targets = _fp32_flat(targets)
        numerator = 2 * (inputs * targets).sum(-1)
        denominator = inputs.sum(-1) + targets.sum(-1)
        loss = 1 - (numerator + 1) / (denominator + 1)
        return loss.sum() / num_masks


def batch_sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Pairwise focal loss: ``out[i, j] = focal(inputs[i], targets[j])`` averaged over pixels.

    Computed as two matrix products (positive and negative pixel terms) instead of an
    N×M×P tensor, so the matcher's memory stays O((N + M)·P).
    """
    with torch.autocast(device_type=inputs.device.type, enabled=False):
        inputs = _fp32_flat(inputs)
        targets = _fp32_flat(targets)
        hw = inputs.shape[1]
        prob = inputs.sigmoid()
        # BCE(x, 1) = softplus(-x) and BCE(x, 0) = softplus(x), computed stably.
        focal_pos = ((1 - prob) ** gamma) * F.softplus(-inputs)
        focal_neg = (prob**gamma) * F.softplus(inputs)
        if alpha >= 0:
            focal_pos = focal_pos * alpha
            focal_neg = focal_neg * (1 - alpha)
        loss = focal_pos @ targets.T + focal_neg @ (1 - targets).T
        return loss / hw


def batch_dice_loss(inputs: Tensor, targets: Tensor) -> Tensor:
    """Pairwise dice loss: ``out[i, j] = dice(inputs[i], targets[j])`` (N×M)."""
    with torch.autocast(device_type=inputs.device.type, enabled=False):
        inputs = _fp32_flat(inputs).sigmoid()
        targets = _fp32_flat(targets)
        numerator = 2 * (inputs @ targets.T)
        denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
        return 1 - (numerator + 1) / (denominator + 1)


def focal_ce_loss(
    logits: Tensor,
    target_classes: Tensor,
    num_masks: float | Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """PFT's focal-CE: sigmoid focal loss of ``logits`` (…×K) against one-hot ``target_classes``.

    ``target_classes`` (…, int64) holds a class in [0, K) or K for "no object", whose
    target row is all zeros (every class sigmoid pushed down). The focal terms are
    *summed* over queries and classes and divided by ``num_masks`` — Deformable DETR's
    normalisation of its focal classification loss. Dividing by the number of
    ground-truth masks (not by Q·K) keeps the loss's scale independent of the number of
    classes, where a mean over Q·K (22,500 entries for ADE20K) would shrink its gradient
    to nothing next to the mask losses; and it matches how focal/dice are normalised.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float()
        num_classes = logits.shape[-1]
        if target_classes.shape != logits.shape[:-1]:
            raise ValueError(
                f"focal_ce_loss: targets of shape {tuple(target_classes.shape)} for logits {tuple(logits.shape)}"
            )
        onehot = F.one_hot(target_classes.long(), num_classes + 1)[..., :num_classes].to(logits.dtype)
        prob = logits.sigmoid()
        ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        p_t = prob * onehot + (1 - prob) * (1 - onehot)
        loss = ce * ((1 - p_t) ** gamma)
        if alpha >= 0:
            loss = (alpha * onehot + (1 - alpha) * (1 - onehot)) * loss
        return loss.sum() / num_masks
