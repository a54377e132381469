"""Winograd F(4×4, 3×3) convolution (ops/winograd_conv.py) against torch's direct kernel."""

import pytest
import torch
import torch.nn.functional as F

import ops.winograd_conv as winograd
from model.config import ModelConfig
from model.pixel_decoder import build_pixel_decoder
from ops.config import OpsConfig
from ops.winograd_conv import Conv3x3, winograd_conv3x3


@pytest.mark.parametrize("band_tiles", [128, 2])  # one band per image; several, one tile row each
@pytest.mark.parametrize("shape", [(2, 5, 9, 7), (1, 3, 4, 4), (2, 4, 13, 16), (1, 2, 1, 6)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_direct_convolution_in_fp64(monkeypatch, band_tiles, shape, with_bias):
    monkeypatch.setattr(winograd, "BAND_TILES", band_tiles)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(6, shape[1], 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True) if with_bias else None
    grad_out = torch.randn(shape[0], 6, *shape[2:], dtype=torch.float64, generator=gen)

    ours = winograd_conv3x3(x, weight, bias)
    theirs = F.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-11)
    inputs = [x, weight] + ([bias] if with_bias else [])
    ours_grads = torch.autograd.grad(ours, inputs, grad_out)
    theirs_grads = torch.autograd.grad(theirs, inputs, grad_out)
    for got, want in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_gradcheck_and_partial_gradients(monkeypatch):
    monkeypatch.setattr(winograd, "BAND_TILES", 3)
    x = torch.randn(2, 3, 10, 9, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(winograd_conv3x3, (x, weight, bias))
    # Only what is asked for is computed (a frozen layer, or an input that needs no grad).
    frozen = weight.detach()
    (grad_x,) = torch.autograd.grad(winograd_conv3x3(x, frozen).sum(), [x])
    torch.testing.assert_close(grad_x, torch.autograd.grad(F.conv2d(x, frozen, padding=1).sum(), [x])[0])
    # Only the bias: no band is transformed, and the bias gradient is still the sum.
    grad_out = torch.randn(2, 4, 10, 9, dtype=torch.float64)
    (grad_bias,) = torch.autograd.grad(winograd_conv3x3(x.detach(), frozen, bias), [bias], grad_out)
    torch.testing.assert_close(grad_bias, grad_out.sum((0, 2, 3)))


def test_fp32_error_is_a_few_ulps_of_the_output_scale():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 32, 40, generator=gen)
    weight = torch.randn(32, 64, 3, 3, generator=gen) * 0.05
    exact = F.conv2d(x.double(), weight.double(), padding=1)
    error = (winograd_conv3x3(x, weight) - exact).abs().max() / exact.abs().max()
    assert error < 5e-5, f"relative error {error:.2e}"


def test_a_fake_tensor_pass_leaves_real_runs_intact():
    """``launcher describe`` runs the model under FakeTensorMode; nothing it computes may
    leak into later real convolutions (a lazily cached transform matrix would)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = winograd_conv3x3(torch.zeros(1, 4, 32, 32), torch.zeros(4, 4, 3, 3))
    assert fake.shape == (1, 4, 32, 32)
    x, weight = torch.randn(1, 4, 32, 32), torch.randn(4, 4, 3, 3)
    torch.testing.assert_close(
        winograd_conv3x3(x, weight), F.conv2d(x, weight, padding=1), rtol=1e-4, atol=1e-4
    )


def test_rejects_what_it_does_not_compute():
    with pytest.raises(ValueError, match="K×C×3×3"):
        winograd_conv3x3(torch.randn(1, 4, 8, 8), torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="model.ops.conv3x3='fast'"):
        Conv3x3(4, 4, algorithm="fast")


def _winograd_calls(monkeypatch) -> list:
    calls = []
    real = winograd.winograd_conv3x3
    monkeypatch.setattr(winograd, "winograd_conv3x3", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


def test_auto_threshold_is_higher_without_the_fused_transforms(monkeypatch):
    monkeypatch.setattr(winograd.winograd_native, "library", lambda: None)
    assert winograd.auto_min_tiles() == winograd.MIN_TILES_PYTORCH_TRANSFORMS > winograd.MIN_TILES
    calls = _winograd_calls(monkeypatch)
    conv = Conv3x3(8, 8, algorithm="auto")
    conv(torch.randn(1, 8, 32, 32))  # 64 tiles: direct with the PyTorch transforms
    assert calls == []
    conv(torch.randn(1, 8, 64, 64))  # 256 tiles
    assert calls == [torch.Size([1, 8, 64, 64])]
    monkeypatch.setattr(winograd.winograd_native, "library", lambda: object())
    assert winograd.auto_min_tiles() == winograd.MIN_TILES


def test_auto_picks_winograd_for_fp32_cpu_maps_of_64_tiles_outside_autocast(monkeypatch):
    monkeypatch.setattr(winograd, "auto_min_tiles", lambda: winograd.MIN_TILES)  # as with the C transforms
    calls = _winograd_calls(monkeypatch)
    conv = Conv3x3(8, 8, algorithm="auto")
    conv(torch.randn(1, 8, 32, 32))  # 64 tiles
    assert len(calls) == 1
    conv(torch.randn(1, 8, 16, 16))  # 16 tiles: direct
    conv.double()(torch.randn(1, 8, 32, 32, dtype=torch.float64))  # fp64: direct unless forced
    conv.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(torch.randn(1, 8, 32, 32))
    assert len(calls) == 1
    Conv3x3(8, 8, algorithm="direct")(torch.randn(1, 8, 64, 64))
    assert len(calls) == 1
    Conv3x3(8, 8, algorithm="winograd").double()(torch.randn(1, 8, 4, 4, dtype=torch.float64))
    assert len(calls) == 2


def test_conv3x3_is_a_drop_in_conv2d(monkeypatch):
    conv = Conv3x3(8, 6, bias=False)
    reference = torch.nn.Conv2d(8, 6, 3, padding=1, bias=False)
    assert conv.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(2, 8, 40, 36)
    torch.testing.assert_close(conv(x), reference(x), rtol=1e-4, atol=1e-4)


def test_pixel_decoders_take_the_algorithm_from_model_ops(monkeypatch):
    monkeypatch.setattr(winograd, "auto_min_tiles", lambda: winograd.MIN_TILES)  # as with the C transforms
    calls = _winograd_calls(monkeypatch)
    features = [torch.randn(1, c, 128 // s, 128 // s) for c, s in [(16, 4), (32, 8), (64, 16), (64, 32)]]
    cfg = ModelConfig(num_classes=3).pixel_decoder
    cfg.conv_dim = cfg.mask_dim = 16
    decoder = build_pixel_decoder(cfg, [16, 32, 64, 64], OpsConfig())
    decoder(features)
    # Stride 4 (32×32): the output conv and mask_features; stride 8 (16×16) and coarser: direct.
    assert calls == [torch.Size([1, 16, 32, 32])] * 2
    direct = build_pixel_decoder(cfg, [16, 32, 64, 64], OpsConfig(conv3x3="direct"))
    direct.load_state_dict(decoder.state_dict())
    torch.testing.assert_close(
        direct(features).mask_features, decoder(features).mask_features, rtol=1e-4, atol=1e-4
    )
    assert len(calls) == 4


def test_flop_counting_sees_the_direct_convolution():
    """MFU counts model FLOPs: the Winograd path's 4× fewer products must not lower it."""
    from launcher.mfu import count_forward_flops

    conv = Conv3x3(16, 8)
    x = torch.randn(2, 16, 32, 32)
    with count_forward_flops() as counted:
        conv(x)
    assert counted() == 2 * 2 * 8 * 16 * 9 * 32 * 32


def test_no_double_backward_and_empty_inputs():
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(winograd_conv3x3(x, weight).sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad_x.sum().backward()
    empty = winograd_conv3x3(torch.randn(0, 2, 8, 8), torch.randn(3, 2, 3, 3))
    assert empty.shape == (0, 3, 8, 8)
