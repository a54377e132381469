"""Mask and class losses of DETR / MaskFormer / PFT, on logits.

Two forms of each mask loss:

- ``sigmoid_focal_loss`` / ``dice_loss``: one prediction per target (matched pairs),
  averaged over pixels, summed over masks and divided by ``num_masks`` (the number of
  ground-truth masks, averaged over ranks by the caller). These are the plain-formula
  references: the criterion uses ``ops.fused_losses``, which computes the same values
  and gradients but keeps only logits and targets for backward (tests compare the two).
- ``batch_sigmoid_focal_loss`` / ``batch_dice_loss``: every prediction against every
  target, an N×M cost matrix — the Hungarian matcher's costs (``batch_mask_costs``: both
  from one sigmoid).

PFT's class losses score one sigmoid logit per category query against "this class is in
the image": ``binary_ce_loss`` (L_ce) and ``focal_ce_loss`` (L_focal-ce, the sigmoid focal
loss). Both are *summed* over queries and divided by ``num_masks``, the normaliser of the
mask losses (see ``binary_ce_loss`` for why).

All math runs in float32 with autocast off, whatever the caller's precision: the sigmoid
of bf16 logits saturates early, and sums over 10^5 pixels lose most of bf16's 8 bits of
mantissa. Mask ``inputs`` are logits of shape N×P (or N×H×W: flattened here); ``targets``
are 0/1 (bool or float, soft values also work) of the same shape, or M×P for the batch
forms.

Pure functions; this module imports nothing of ours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _fp32_flat(x: Tensor) -> Tensor:
    return x.float().flatten(1)


def _focal_terms(inputs: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """Element-wise focal loss (Lin et al.) of fp32 logits against fp32 0/1 targets."""
    prob = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


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
        loss = _focal_terms(_fp32_flat(inputs), _fp32_flat(targets), alpha, gamma)
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


def _pairwise_focal(inputs: Tensor, prob: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    # BCE(x, 0) = softplus(x) and BCE(x, 1) = softplus(-x) = softplus(x) - x: one softplus
    # serves both terms. In place where a temporary ends, and as one product:
    # Σ_p pos·t + neg·(1 − t) = (pos − neg)·t + Σ_p neg, with no (1 − targets) matrix.
    # The matcher runs this on every decoder layer's Q×(h·w) masks, per image.
    bce_neg = F.softplus(inputs)
    focal_neg = prob**gamma
    focal_neg.mul_(bce_neg)
    focal_pos = torch.sub(1, prob).pow_(gamma).mul_(bce_neg.sub_(inputs))
    if alpha >= 0:
        focal_pos.mul_(alpha).sub_(focal_neg, alpha=1 - alpha)
        negatives = focal_neg.sum(-1, keepdim=True).mul_(1 - alpha)
    else:
        focal_pos.sub_(focal_neg)
        negatives = focal_neg.sum(-1, keepdim=True)
    return torch.addmm(negatives, focal_pos, targets.T).div_(inputs.shape[1])


def _pairwise_dice(prob: Tensor, targets: Tensor) -> Tensor:
    numerator = 2 * (prob @ targets.T)
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Pairwise focal loss: ``out[i, j] = focal(inputs[i], targets[j])`` averaged over pixels.

    Computed as a matrix product instead of an N×M×P tensor, so the matcher's memory stays
    O((N + M)·P).
    """
    return batch_mask_costs(inputs, targets, alpha, gamma, dice=False)[0]


def batch_dice_loss(inputs: Tensor, targets: Tensor) -> Tensor:
    """Pairwise dice loss: ``out[i, j] = dice(inputs[i], targets[j])`` (N×M)."""
    return batch_mask_costs(inputs, targets, focal=False)[1]


def batch_mask_costs(
    inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, focal: bool = True, dice: bool = True
) -> tuple[Tensor | None, Tensor | None]:
    """(``batch_sigmoid_focal_loss``, ``batch_dice_loss``) sharing one sigmoid; a loss not
    asked for is None."""
    with torch.autocast(device_type=inputs.device.type, enabled=False):
        inputs = _fp32_flat(inputs)
        targets = _fp32_flat(targets)
        prob = inputs.sigmoid()
        return (
            _pairwise_focal(inputs, prob, targets, alpha, gamma) if focal else None,
            _pairwise_dice(prob, targets) if dice else None,
        )


def _check_class_targets(logits: Tensor, targets: Tensor) -> None:
    if targets.shape != logits.shape:
        raise ValueError(f"class loss: targets of shape {tuple(targets.shape)} for logits {tuple(logits.shape)}")


def binary_ce_loss(logits: Tensor, targets: Tensor, num_masks: float | Tensor) -> Tensor:
    """PFT's L_ce: binary cross-entropy of each query's class logit (B×K) against 0/1
    ``targets`` ("class i is in the image"), summed over all B×K entries, / ``num_masks``.

    Why this normalisation (Deformable DETR's for its sigmoid classification loss): a
    present class's logit then weighs what its mask's focal and dice terms weigh (each
    1/num_masks), as a matched query's softmax CE does in MaskFormer (weight ≈
    1/(2·num_masks) there, the no-object queries filling the rest of the weighted mean),
    so ``class_weight = 1`` next to ``focal 20 / dice 1`` keeps its MaskFormer meaning.
    A mean over the B×K entries would instead divide each present class's gradient by K
    (150 on ADE20K, ~10 of them present per image): ~15× weaker than its mask, and
    dependent on the number of classes.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        _check_class_targets(logits, targets)
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum")
        return loss / num_masks


def focal_ce_loss(
    logits: Tensor,
    targets: Tensor,
    num_masks: float | Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """PFT's L_focal-ce: the sigmoid focal loss of each query's class logit (B×K) against 0/1
    ``targets``, summed over all B×K entries, / ``num_masks`` (as ``binary_ce_loss``).

    Summing matters even more here than for the CE: the focal factor already drives the
    ~K easy negatives per image towards 0, so a mean over B×K would leave only the few
    positives' terms divided by K — next to nothing beside 20·focal + dice.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        _check_class_targets(logits, targets)
        return _focal_terms(logits.float(), targets.float(), alpha, gamma).sum() / num_masks
