"""The fused C tile transforms of ops/winograd_cpu.c against the PyTorch path of
ops.winograd_conv (and both against fp64 direct convolution), and their build/fallback."""

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ops import cpu_native, winograd_conv, winograd_native

# Built once at collection. On CI a missing build fails (test_ci_builds_the_kernels)
# rather than skipping the comparisons.
BUILT = winograd_native.library() is not None
native = pytest.mark.skipif(not BUILT, reason="ops/winograd_cpu.c did not build here (no C compiler?)")


@pytest.mark.skipif(not os.environ.get("CI"), reason="a C compiler is required on CI machines only")
def test_ci_builds_the_kernels():
    assert BUILT, "ops/winograd_cpu.c did not build on the CI machine (a C compiler is part of the setup)"


def _run(x, weight, bias, grad, fused: bool, monkeypatch):
    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(winograd_native, "usable", lambda *tensors: False)
        inputs = [t.detach().requires_grad_() for t in (x, weight, bias) if t is not None]
        out = winograd_conv.winograd_conv3x3(*inputs[:2], inputs[2] if bias is not None else None)
        return (out, *torch.autograd.grad(out, inputs, grad))


@pytest.mark.parametrize(
    "shape",  # n, c, k, h, w: whole and partial tiles, channel counts off the 16-lane blocks, one pixel
    [(2, 32, 48, 16, 16), (1, 3, 5, 7, 9), (2, 17, 33, 13, 30), (1, 40, 24, 70, 19), (3, 16, 16, 4, 4), (1, 8, 8, 1, 1)],
)
@pytest.mark.parametrize("band_tiles", [128, 5])  # one band per image, and many (rows shared between bands)
@pytest.mark.parametrize("with_bias", [True, False])
@native
def test_fused_transforms_match_the_pytorch_path(monkeypatch, shape, band_tiles, with_bias):
    monkeypatch.setattr(winograd_conv, "BAND_TILES", band_tiles)
    n, c, k, h, w = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, c, h, w, generator=gen)
    weight = torch.randn(k, c, 3, 3, generator=gen) / (3 * c**0.5)
    bias = torch.randn(k, generator=gen) if with_bias else None
    grad = torch.randn(n, k, h, w, generator=gen)
    fused = _run(x, weight, bias, grad, True, monkeypatch)
    reference = _run(x, weight, bias, grad, False, monkeypatch)
    exact = _run(x.double(), weight.double(), None if bias is None else bias.double(), grad.double(), False, monkeypatch)
    direct = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    torch.testing.assert_close(exact[0], direct, rtol=1e-12, atol=1e-12)
    for mine, theirs, truth in zip(fused, reference, exact):
        assert mine.shape == theirs.shape == truth.shape
        scale = truth.abs().max().item()
        # Same maps, different rounding: both within fp32 Winograd's few ulps of the scale.
        assert (mine.double() - truth).abs().max().item() <= 2e-5 * scale
        assert (mine - theirs).abs().max().item() <= 2e-5 * scale


@native
def test_only_the_requested_gradients():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 20, 18, 22, generator=gen, requires_grad=True)
    weight = torch.randn(12, 20, 3, 3, generator=gen)
    (grad_x,) = torch.autograd.grad(winograd_conv.winograd_conv3x3(x, weight).sum(), [x])
    expected = torch.autograd.grad(F.conv2d(x, weight, padding=1).sum(), [x])[0]
    torch.testing.assert_close(grad_x, expected, rtol=1e-4, atol=1e-4)
    weight.requires_grad_()
    (grad_w,) = torch.autograd.grad(winograd_conv.winograd_conv3x3(x.detach(), weight).sum(), [weight])
    expected = torch.autograd.grad(F.conv2d(x.detach(), weight, padding=1).sum(), [weight])[0]
    torch.testing.assert_close(grad_w, expected, rtol=1e-4, atol=1e-3)


@native
def test_wrong_layouts_are_rejected_before_any_pointer_is_used():
    x = torch.randn(16, 8, 8)
    with pytest.raises(ValueError, match="expected \\(36, 4, 16\\)"):
        winograd_native.input_tiles(x, 0, 2, 2, torch.empty(36, 4, 8))
    with pytest.raises(ValueError, match="tile rows 1..3"):
        winograd_native.input_tiles(x, 1, 3, 2, torch.empty(36, 4, 16))
    with pytest.raises(ValueError, match="contiguous fp32"):
        winograd_native.grad_output_tiles(x.double(), 0, 1, 2, torch.empty(36, 2, 16))
    with pytest.raises(ValueError, match="bias \\(3,\\)"):
        winograd_native.output_tiles(torch.empty(36, 2, 16), torch.zeros(3), 0, 1, 2, x)


@native
def test_the_kernels_share_torchs_openmp_runtime():
    # A second OpenMP runtime would keep its own threads spinning beside torch's.
    runtimes = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line}
    assert len(runtimes) == 1, runtimes


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    monkeypatch.setenv("SEGSCALE_NATIVE_DIR", str(tmp_path))
    cpu_native.load.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    cpu_native.load.cache_clear()


@native
def test_a_build_lands_whole_in_the_cache_and_is_reused(fresh_build):
    assert cpu_native.load("winograd_cpu") is not None
    built = sorted(p.name for p in fresh_build.iterdir())
    assert len(built) == 1 and built[0].startswith("winograd_cpu-") and built[0].endswith(".so"), built
    mtime = (fresh_build / built[0]).stat().st_mtime_ns
    cpu_native.load.cache_clear()
    assert cpu_native.load("winograd_cpu") is not None
    assert (fresh_build / built[0]).stat().st_mtime_ns == mtime  # not rebuilt


def test_a_failed_build_warns_once_and_the_pytorch_path_runs(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="building ops/winograd_cpu.c with .*false failed"):
        assert winograd_native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning per call
        x, weight = torch.randn(1, 4, 20, 20), torch.randn(4, 4, 3, 3)
        torch.testing.assert_close(
            winograd_conv.winograd_conv3x3(x, weight), F.conv2d(x, weight, padding=1), rtol=1e-4, atol=1e-4
        )
    assert list(fresh_build.iterdir()) == []  # no half-written library left behind


def test_switched_off_by_environment(fresh_build, monkeypatch):
    monkeypatch.setenv("SEGSCALE_NATIVE_OPS", "0")
    assert cpu_native.load("winograd_cpu") is None and not winograd_native.usable(torch.zeros(1))


@pytest.mark.parametrize("setting", ["off", "false", "2", "yes"])
def test_an_unknown_switch_value_is_refused(fresh_build, monkeypatch, setting):
    # Read as "on" before: the kernels ran while the user meant them off.
    monkeypatch.setenv("SEGSCALE_NATIVE_OPS", setting)
    with pytest.raises(ValueError, match=rf"SEGSCALE_NATIVE_OPS must be 0 .* or 1 .*got '{setting}'"):
        cpu_native.load("winograd_cpu")


def test_the_reason_a_library_is_missing_is_kept(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(UserWarning, match=r"no C compiler \(/nonexistent/cc\)"):
        assert cpu_native.load("winograd_cpu") is None
    assert cpu_native.why_unavailable("winograd_cpu") == "no C compiler (/nonexistent/cc) for ops/winograd_cpu.c"
    cpu_native.load.cache_clear()
    monkeypatch.setenv("SEGSCALE_NATIVE_OPS", "0")
    assert cpu_native.load("winograd_cpu") is None
    assert cpu_native.why_unavailable("winograd_cpu") == "switched off by SEGSCALE_NATIVE_OPS=0"
