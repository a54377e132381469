"""The memory-lean focal/dice losses equal the plain formulas, in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

import ops.fused_losses
from ops.fused_losses import (
    _DiceLoss,
    _SigmoidFocalLoss,
    fused_dice_loss,
    fused_mask_losses,
    fused_sigmoid_focal_loss,
)
from ops.losses import dice_loss, sigmoid_focal_loss


def make(n=5, pixels=97, seed=0, soft=False):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, pixels, generator=g) * 3).requires_grad_()
    targets = torch.rand(n, pixels, generator=g) if soft else torch.rand(n, pixels, generator=g) > 0.6
    return logits, targets


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1.0, 0.0), (0.5, 1.0), (0.25, 3.0)])
def test_focal_matches_reference(alpha, gamma):
    logits, targets = make()
    ours = fused_sigmoid_focal_loss(logits, targets, num_masks=3.0, alpha=alpha, gamma=gamma)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    ref = sigmoid_focal_loss(logits, targets.float(), num_masks=3.0, alpha=alpha, gamma=gamma)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-7)


def test_dice_matches_reference():
    logits, targets = make()
    ours = fused_dice_loss(logits, targets, num_masks=2.0)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    ref = dice_loss(logits, targets.float(), num_masks=2.0)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-7)


def test_gradcheck_float64_soft_targets():
    logits, targets = make(n=3, pixels=7, soft=True)
    x = logits.detach().double().requires_grad_()
    t = targets.double()
    assert torch.autograd.gradcheck(lambda v: _SigmoidFocalLoss.apply(v, t, 0.25, 2.0), (x,))
    assert torch.autograd.gradcheck(lambda v: _DiceLoss.apply(v, t), (x,))


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1.0, 0.0), (0.4, 1.5)])
def test_gradcheck_float64_boolean_targets(alpha, gamma):
    # Boolean targets take their own (wrong-label logit) path in forward and backward.
    logits, targets = make(n=5, pixels=9, seed=3)
    x = logits.detach().double().requires_grad_()
    with torch.no_grad():
        x[0, :3] = torch.tensor([25.0, -25.0, 0.0], dtype=torch.float64)  # saturated and zero
    assert targets.dtype == torch.bool and targets.any() and not targets.all()
    assert torch.autograd.gradcheck(lambda v: _SigmoidFocalLoss.apply(v, targets, alpha, gamma), (x,))
    assert torch.autograd.gradcheck(lambda v: _DiceLoss.apply(v, targets), (x,))
    both = ops.fused_losses._UpsampledMaskLosses.apply(x, targets, lambda v: v, alpha, gamma)  # fp64 throughout
    t, prob = targets.double(), x.sigmoid()  # the plain formulas, in fp64 (ops.losses' run in fp32)
    p_t = prob * t + (1 - prob) * (1 - t)
    focal = F.binary_cross_entropy_with_logits(x, t, reduction="none") * (1 - p_t) ** gamma
    if alpha >= 0:
        focal = focal * (alpha * t + (1 - alpha) * (1 - t))
    dice = 1 - (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)
    reference = (focal.mean(1).sum(), dice.sum())
    for ours, ref in zip(both, reference):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        (grad_ours,) = torch.autograd.grad(ours, x, retain_graph=True)
        (grad_ref,) = torch.autograd.grad(ref, x, retain_graph=True)
        torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-10, atol=1e-12)


def test_fp32_under_bf16_autocast():
    logits, targets = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        focal = fused_sigmoid_focal_loss(logits.bfloat16(), targets, 1.0)
        dice = fused_dice_loss(logits.bfloat16(), targets, 1.0)
    assert focal.dtype == torch.float32 and dice.dtype == torch.float32


def test_saves_only_inputs():
    """The point of the fused version: autograd keeps logits + targets, not the terms."""
    logits, targets = make(n=4, pixels=1000)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        fused_sigmoid_focal_loss(logits, targets, 1.0)
    fused_bytes = sum(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        sigmoid_focal_loss(logits, targets.float(), 1.0)
    assert fused_bytes <= 4000 * 4 + 4000  # fp32 logits + bool targets
    assert sum(saved) > 3 * fused_bytes


def _upsample(logits):
    return F.interpolate(logits[:, None], scale_factor=4, mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("chunk_elements", [2**18, 40])  # one chunk; a chunk per mask and less
def test_upsampled_mask_losses_match_the_plain_formulas(soft, chunk_elements, monkeypatch):
    monkeypatch.setattr(ops.fused_losses, "CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(1)
    low = (torch.randn(5, 6, 7, generator=g) * 3).requires_grad_()
    targets = torch.rand(5, 24, 28, generator=g)
    targets = targets if soft else targets > 0.6
    focal, dice = fused_mask_losses(low, targets, 3.0, _upsample, alpha=0.25, gamma=2.0)
    (grad,) = torch.autograd.grad(focal + 0.5 * dice, low)
    full = _upsample(low)
    ref_focal = sigmoid_focal_loss(full.flatten(1), targets.flatten(1).float(), 3.0)
    ref_dice = dice_loss(full.flatten(1), targets.flatten(1).float(), 3.0)
    (ref_grad,) = torch.autograd.grad(ref_focal + 0.5 * ref_dice, low)
    assert focal.item() == pytest.approx(ref_focal.item(), rel=1e-5)
    assert dice.item() == pytest.approx(ref_dice.item(), rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_upsampled_mask_losses_gradcheck_and_save_the_low_resolution_logits():
    low = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.rand(2, 12, 12, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: ops.fused_losses._UpsampledMaskLosses.apply(x, targets.flatten(1), _upsample, 0.25, 2.0), (low,)
    )
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t,
                                                  lambda t: t):
        fused_mask_losses(low.float(), targets > 0.5, 1.0, _upsample)
    # The low-resolution logits, the boolean targets and two per-mask sums; no
    # full-resolution float tensor.
    assert sorted(saved, key=str) == sorted(
        [((2, 3, 3), torch.float32), ((2, 144), torch.bool), ((2,), torch.float32), ((2,), torch.float32)], key=str
    )
