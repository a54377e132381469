import pytest
import torch
import torch.nn.functional as F

from ops.upsample import add_nearest_upsampled, interpolation_matrix, upsample_bilinear


def _reference(x, size, crop):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[..., : crop[0], : crop[1]]


@pytest.mark.parametrize(
    "in_size, size, crop",
    [((16, 16), (64, 64), (64, 64)), ((5, 7), (20, 28), (17, 26)), ((6, 4), (13, 9), (13, 9))],
)
def test_values_and_gradients_match_interpolate(in_size, size, crop):
    torch.manual_seed(0)
    x = torch.randn(3, 2, *in_size, dtype=torch.float64, requires_grad=True)
    out = upsample_bilinear(x, size, crop)
    ref = _reference(x, size, crop)
    assert out.shape == ref.shape and torch.equal(out, ref)  # the forward is F.interpolate itself
    grad = torch.randn_like(ref)
    (mine,) = torch.autograd.grad(out, x, grad)
    (theirs,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


def test_fp32_gradient_is_close_and_gradcheck_passes():
    torch.manual_seed(1)
    x = torch.randn(4, 1, 16, 16, requires_grad=True)
    grad = torch.randn(4, 1, 62, 64)
    (mine,) = torch.autograd.grad(upsample_bilinear(x, (64, 64), (62, 64)), x, grad)
    (theirs,) = torch.autograd.grad(_reference(x, (64, 64), (62, 64)), x, grad)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    small = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: upsample_bilinear(t, (12, 16), (10, 15)), (small,))


def test_interpolation_matrix_rows_sum_to_one():
    a = interpolation_matrix(7, 28, torch.float32, torch.device("cpu"))
    assert a.shape == (28, 7)
    torch.testing.assert_close(a.sum(1), torch.ones(28))


def test_without_grad_it_returns_the_interpolation():
    x = torch.randn(1, 1, 4, 4)
    assert torch.equal(upsample_bilinear(x, (16, 16), (15, 13)), _reference(x, (16, 16), (15, 13)))


@pytest.mark.parametrize("crop", [(17, 16), (0, 16)])
def test_bad_crop_is_rejected(crop):
    with pytest.raises(ValueError, match="crop"):
        upsample_bilinear(torch.randn(1, 1, 4, 4), (16, 16), crop)


@pytest.mark.parametrize("coarse_size, fine_size", [((4, 6), (8, 12)), ((5, 5), (9, 10))])
def test_add_nearest_upsampled_matches_interpolate(coarse_size, fine_size):
    torch.manual_seed(3)
    fine = torch.randn(2, 3, *fine_size, dtype=torch.float64, requires_grad=True)
    coarse = torch.randn(2, 3, *coarse_size, dtype=torch.float64, requires_grad=True)
    out = add_nearest_upsampled(fine, coarse)
    ref = fine + F.interpolate(coarse, size=fine_size, mode="nearest")
    assert torch.equal(out, ref)  # 2x: the broadcast path; (9, 10): F.interpolate itself
    grad = torch.randn_like(ref)
    for mine, theirs in zip(torch.autograd.grad(out, (fine, coarse), grad), torch.autograd.grad(ref, (fine, coarse), grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradcheck(add_nearest_upsampled, (fine[:1, :2, :4, :4], coarse[:1, :2, :2, :2]))


def test_add_nearest_upsampled_takes_the_broadcast_path_at_exactly_twice_the_size():
    fine, coarse = torch.randn(1, 2, 8, 8, requires_grad=True), torch.randn(1, 2, 4, 4, requires_grad=True)
    assert type(add_nearest_upsampled(fine, coarse).grad_fn).__name__ == "_AddNearestUpsampled2xBackward"
    assert type(add_nearest_upsampled(fine, coarse[..., :3]).grad_fn).__name__ == "AddBackward0"
