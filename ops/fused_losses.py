"""Memory-lean sigmoid focal and dice losses: autograd saves only logits and targets.

Written with plain tensor ops, the focal loss keeps a dozen full-size intermediates
(sigmoid, BCE, p_t, its power, alpha weights...) alive until backward, for every matched
mask of every deep-supervision layer: at 256x256 with 6 decoder layers that is hundreds
of MB, more than the backbone's activations. These functions save only the fp32 logits
and the (boolean) targets and recompute the rest in backward with the closed-form
gradient, so a mask loss costs two mask-sized tensors of memory however many terms it has.
``fused_mask_losses`` goes one step further for masks predicted at a lower resolution
than their targets: it saves the logits before upsampling. The terms are computed a
chunk of masks at a time, so the temporaries stay small too.

Both reduce as MaskFormer does: focal = mean over pixels, summed over masks; dice =
1 - (2|p.t| + 1) / (|p| + |t| + 1) summed over masks; the caller divides by num_masks.
Always fp32, whatever the autocast.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows (masks) per chunk: the elementwise terms of one chunk (~a dozen temporaries) stay
# a few MiB however many full-resolution masks a batch matches; the loss's backward runs
# at the step's memory peak (every activation still saved).
CHUNK_ELEMENTS = 2**18


def _row_chunks(rows: int, row_length: int):
    step = max(1, CHUNK_ELEMENTS // max(1, row_length))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _focal_parts(logits: Tensor, targets: Tensor, alpha: float, gamma: float):
    """sigmoid, BCE, p_t and alpha_t: the pieces both the loss and its gradient need."""
    prob = torch.sigmoid(logits)
    # BCE with logits, numerically stable: max(x, 0) - x*t + log(1 + exp(-|x|))
    ce = torch.nn.functional.softplus(-logits.abs()) + logits.clamp(min=0) - logits * targets
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets) if alpha >= 0 else torch.ones_like(targets)
    return prob, ce, p_t, alpha_t


def _label_signs(targets: Tensor) -> Tensor:
    """For 0/1 targets (as floats): s = 1 - 2t, -1 where the target is set and +1 elsewhere.
    ``logits · s`` is the logit of the label a pixel does *not* have, so 1 - p_t =
    sigmoid(x·s) and BCE = softplus(x·s): the focal loss and its gradient need two
    elementwise functions of one tensor instead of the soft-target form's dozen passes,
    and alpha_t = 1/2 + (1/2 - alpha)·s is linear in s. Float arithmetic throughout:
    ``torch.where`` on a boolean mask runs ~15x slower than a multiply on this CPU."""
    return targets.mul(-2).add_(1)


def _loss_rows(
    logits: Tensor, targets: Tensor, alpha: float, gamma: float, focal: bool, dice: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Per-mask terms of N×P logits and targets, in one pass over each chunk of masks (one
    sigmoid however many losses): the focal loss (mean over pixels) if ``focal``, and the
    dice numerator 2|p·t| + 1 and denominator |p| + |t| + 1 if ``dice``; None otherwise."""
    focal_rows, numerator, denominator = (
        logits.new_empty(logits.shape[0]) if wanted else None for wanted in (focal, dice, dice)
    )
    binary = targets.dtype == torch.bool
    for rows in _row_chunks(*logits.shape):
        targets_f = targets[rows].to(logits.dtype)
        if focal and binary:
            signs = _label_signs(targets_f)
            wrong = logits[rows] * signs
            terms = torch.nn.functional.softplus(wrong).mul_(torch.sigmoid(wrong).pow_(gamma))
            if alpha >= 0:
                terms.mul_(signs.mul_(0.5 - alpha).add_(0.5))  # alpha_t
            focal_rows[rows] = terms.mean(dim=1)
        elif focal:
            prob, ce, p_t, alpha_t = _focal_parts(logits[rows], targets_f, alpha, gamma)
            focal_rows[rows] = (alpha_t * ce * (1 - p_t).pow(gamma)).mean(dim=1)
        if dice:
            if binary or not focal:
                prob = torch.sigmoid(logits[rows])
            numerator[rows] = 2 * (prob * targets_f).sum(1) + 1
            denominator[rows] = prob.sum(1) + targets_f.sum(1) + 1
    return focal_rows, numerator, denominator


def _loss_grad(
    logits: Tensor,
    targets: Tensor,
    alpha: float,
    gamma: float,
    grad_focal: Tensor | None,
    grad_dice: Tensor | None,
    numerator: Tensor | None = None,
    denominator: Tensor | None = None,
) -> Tensor:
    """∂/∂logits of ``grad_focal`` × Σ per-mask focal loss + ``grad_dice`` × Σ per-mask
    dice loss (either scale None: that loss is left out), a chunk of masks at a time."""
    binary = targets.dtype == torch.bool
    grad = torch.empty_like(logits) if binary else torch.zeros_like(logits)
    for rows in _row_chunks(*logits.shape):
        if binary:
            _binary_chunk_grad(logits, targets, alpha, gamma, (grad_focal, grad_dice), (numerator, denominator), rows, grad)
            continue
        targets_f = targets[rows].float()
        if grad_focal is not None:
            prob, ce, p_t, alpha_t = _focal_parts(logits[rows], targets_f, alpha, gamma)
            one_minus_pt = 1 - p_t
            # d/dx [alpha_t * ce * (1 - p_t)^gamma], with d ce/dx = p - t and
            # d (1 - p_t)/dx = -(2t - 1) p (1 - p).
            focal = (prob - targets_f) * one_minus_pt.pow(gamma)
            if gamma != 0:
                focal -= ce * gamma * one_minus_pt.pow(gamma - 1) * (2 * targets_f - 1) * prob * (1 - prob)
            grad[rows] += focal * alpha_t * (grad_focal / logits.shape[1])
        else:
            prob = torch.sigmoid(logits[rows])
        if grad_dice is not None:
            num, den = numerator[rows, None], denominator[rows, None]
            # loss_i = 1 - N_i / D_i;  dN/dp = 2t, dD/dp = 1  ->  dloss/dp = (N - 2t D) / D^2
            grad_prob = (num - 2 * targets_f * den) / den.pow(2)
            grad[rows] += grad_dice * grad_prob * prob * (1 - prob)
    return grad


def _binary_chunk_grad(logits: Tensor, targets: Tensor, alpha: float, gamma: float, scales: tuple,
                       dice_terms: tuple, rows: slice, grad: Tensor) -> None:
    """``_loss_grad`` of one chunk of rows for boolean targets, written into ``grad[rows]``
    (``scales`` = (grad_focal, grad_dice), ``dice_terms`` = (numerator, denominator)).
    With s = 1 - 2t (``_label_signs``), w = x·s and q = sigmoid(w) = 1 - p_t, a pixel's
    focal term is alpha_t·softplus(w)·q^γ and its derivative in x is
    alpha_t·s·q^γ·(q + γ·softplus(w)·(1 - q)), where alpha_t·s = s/2 + 1/2 - alpha
    (s² = 1); the dice gradient needs p(1 - p), which is q(1 - q) for either label."""
    (grad_focal, grad_dice), (numerator, denominator) = scales, dice_terms
    targets, out = targets[rows].to(logits.dtype), grad[rows]
    signs = _label_signs(targets)
    wrong = logits[rows] * signs
    q = torch.sigmoid(wrong)
    one_minus_q = 1 - q
    if grad_focal is None:
        out.zero_()
    else:
        torch.addcmul(q, torch.nn.functional.softplus(wrong), one_minus_q, value=gamma, out=out)
        if gamma != 0:
            out.mul_(q.pow(gamma))
        out.mul_(signs.mul_(0.5).add_(0.5 - alpha) if alpha >= 0 else signs).mul_(grad_focal / logits.shape[1])
    if grad_dice is not None:
        num, den = numerator[rows, None], denominator[rows, None]
        # loss_i = 1 - N_i / D_i;  dN/dp = 2t, dD/dp = 1  ->  dloss/dp = (N - 2t D) / D^2
        grad_prob = torch.addcmul(num / den.pow(2), targets, -2 / den)
        out.addcmul_(grad_prob.mul_(q).mul_(one_minus_q), grad_dice)


class _SigmoidFocalLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
        ctx.save_for_backward(logits, targets)
        ctx.alpha, ctx.gamma = alpha, gamma
        return _loss_rows(logits, targets, alpha, gamma, focal=True, dice=False)[0].sum()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        logits, targets = ctx.saved_tensors
        return _loss_grad(logits, targets, ctx.alpha, ctx.gamma, grad_output, None), None, None, None


class _DiceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        _, numerator, denominator = _loss_rows(logits, targets, 0.0, 0.0, focal=False, dice=True)
        ctx.save_for_backward(logits, targets, numerator, denominator)
        return (1 - numerator / denominator).sum()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        logits, targets, numerator, denominator = ctx.saved_tensors
        return _loss_grad(logits, targets, 0.0, 0.0, None, grad_output, numerator, denominator), None


class _UpsampledMaskLosses(torch.autograd.Function):
    """Focal and dice losses of ``upsample(logits)``, saving the logits before upsampling:
    the full-resolution logits are recomputed in backward, and their gradient taken back
    through the upsampling by autograd."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, upsample, alpha: float, gamma: float):
        full = upsample(logits).flatten(1)
        targets = targets.flatten(1)
        focal_rows, numerator, denominator = _loss_rows(full, targets, alpha, gamma, focal=True, dice=True)
        ctx.save_for_backward(logits, targets, numerator, denominator)
        ctx.upsample, ctx.alpha, ctx.gamma = upsample, alpha, gamma
        return focal_rows.sum(), (1 - numerator / denominator).sum()

    @staticmethod
    def backward(ctx, grad_focal: Tensor, grad_dice: Tensor):
        logits, targets, numerator, denominator = ctx.saved_tensors
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_()
            full = ctx.upsample(leaf)
        grad = _loss_grad(
            full.detach().flatten(1), targets, ctx.alpha, ctx.gamma, grad_focal, grad_dice, numerator, denominator
        )
        (grad_logits,) = torch.autograd.grad(full, leaf, grad.view_as(full))
        return grad_logits, None, None, None, None


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


def fused_mask_losses(logits: Tensor, targets: Tensor, num_masks: float, upsample, alpha: float = 0.25,
                      gamma: float = 2.0) -> tuple[Tensor, Tensor]:
    """(focal, dice) of N masks ``upsample(logits)`` (N x H x W fp32, a differentiable
    function) against ``targets`` N x H x W, each / num_masks. Saves only the logits before
    upsampling and the targets: over MaskFormer's 6 supervised decoder layers at a 256
    crop that is 16 fewer MiB at the step's memory peak than saving the upsampled logits."""
    with torch.autocast(logits.device.type, enabled=False):
        if targets.is_floating_point():
            targets = targets.float()
        focal, dice = _UpsampledMaskLosses.apply(logits.float(), targets, upsample, alpha, gamma)
        return focal / num_masks, dice / num_masks


def fused_dice_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Dice loss of N masks (N x ...), summed over masks, / num_masks."""
    with torch.autocast(logits.device.type, enabled=False):
        logits, targets = _as_fp32_flat(logits, targets)
        return _DiceLoss.apply(logits, targets) / num_masks
