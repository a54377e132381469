"""The Triton multi-scale deformable attention kernels equal the pure-torch reference in
value and gradient. They run on CPU in Triton's interpreter, so the problems are tiny."""

import pytest
import torch

from ops.ms_deform_attn_reference import ms_deform_attn_reference
from ops.ms_deform_attn_triton import ms_deform_attn_triton

pytest.importorskip("triton")

SHAPES = [(5, 7), (3, 4)]  # non-square levels catch (x, y) / (H, W) swaps


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    # Only for this module's tests. The kernels are jit-decorated on first use, so setting
    # the variable here (after triton and the module were imported) is enough.
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _problem(shapes=SHAPES, batch=2, queries=5, heads=2, head_dim=3, points=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    levels = len(shapes)
    value = torch.randn(batch, int(sizes.sum()), heads, head_dim, generator=g, dtype=dtype)
    # Some points fall outside [0, 1] to exercise the zero padding.
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, levels, points, generator=g, dtype=dtype)
    return value, spatial_shapes, level_start_index, locations, weights


def _outputs_and_grads(fn, value, spatial_shapes, level_start_index, locations, weights, cotangent=None):
    value, locations, weights = (t.detach().requires_grad_() for t in (value, locations, weights))
    out = fn(value, spatial_shapes, level_start_index, locations, weights)
    if cotangent is None:
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (value, locations, weights), cotangent.to(out))
    return out, grads, cotangent


@pytest.mark.parametrize("head_dim", [3, 4])  # masked channels, and an exact power of two
def test_fp32_matches_reference(head_dim):
    value, spatial_shapes, level_start_index, locations, weights = _problem(head_dim=head_dim)
    # Wild points: far outside, all four neighbours out (zero output and gradient).
    locations[0, 0, 0, 0, 0] = torch.tensor([1e9, -1e9])
    locations[1, 2, 1, 1, 1] = torch.tensor([-3.0, 0.5])
    # Non-contiguous inputs are accepted.
    value = value.transpose(2, 3).contiguous().transpose(2, 3)
    weights = weights.transpose(0, 1).contiguous().transpose(0, 1)
    assert not value.is_contiguous() and not weights.is_contiguous()
    args = (value, spatial_shapes, level_start_index, locations, weights)

    out, grads, cotangent = _outputs_and_grads(ms_deform_attn_triton, *args)
    ref, ref_grads, _ = _outputs_and_grads(ms_deform_attn_reference, *args, cotangent=cotangent)
    assert out.shape == (2, 5, 2 * head_dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for name, grad, ref_grad in zip(("value", "locations", "weights"), grads, ref_grads):
        assert grad.dtype == torch.float32, name
        torch.testing.assert_close(
            grad, ref_grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}"
        )
    assert grads[1].abs().sum() > 0  # locations do receive gradient
    assert grads[1][0, 0, 0, 0, 0].abs().sum() == 0 and grads[1][1, 2, 1, 1, 1].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_fp32_reference(dtype):
    inputs = _problem(head_dim=4, seed=2)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    low = (value.to(dtype), spatial_shapes, level_start_index, locations.to(dtype), weights.to(dtype))
    out, grads, cotangent = _outputs_and_grads(ms_deform_attn_triton, *low)
    # Reference in fp32 on the same (rounded) inputs: only our final roundings differ.
    upcast = [t.float() if t.is_floating_point() else t for t in low]
    ref, ref_grads, _ = _outputs_and_grads(ms_deform_attn_reference, *upcast, cotangent=cotangent)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out.float(), ref, **tol)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad.float(), ref_grad, **tol)


def test_bf16_value_with_fp32_locations_under_autocast():
    """What MSDeformAttn passes under bf16 autocast: bf16 value, fp32 locations/weights."""
    value, spatial_shapes, level_start_index, locations, weights = _problem(head_dim=4, seed=3)
    value_bf16 = value.bfloat16().requires_grad_()
    locations.requires_grad_()
    weights.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn_triton(value_bf16, spatial_shapes, level_start_index, locations, weights)
    assert out.dtype == torch.bfloat16
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (value_bf16, locations, weights), cotangent.bfloat16())
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    args = (value_bf16.float(), spatial_shapes, level_start_index, locations, weights)
    ref, ref_grads, _ = _outputs_and_grads(
        ms_deform_attn_reference, *args, cotangent=cotangent.bfloat16().float()
    )
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    for grad, ref_grad in zip(grads, ref_grads):
        # Locations and weights' gradients are computed and returned in fp32.
        tol = dict(rtol=1e-2, atol=1e-2) if grad.dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad.float(), ref_grad, **tol)


def test_gradcheck_float64():
    shapes = [(3, 4), (2, 3)]
    value, spatial_shapes, level_start_index, _, weights = _problem(
        shapes, batch=1, queries=2, heads=2, head_dim=2, points=2, dtype=torch.float64, seed=4
    )
    # Bilinear interpolation has kinks where a pixel coordinate is an integer (pixel
    # centres, and the border where a neighbour drops out): there finite differences
    # disagree with the one-sided analytic gradient. So place every point at a fractional
    # pixel offset in [0.25, 0.75], from one pixel outside each border (a neighbour reads
    # zero padding) to inside.
    g = torch.Generator().manual_seed(5)
    sizes = torch.tensor(shapes, dtype=torch.float64).flip(-1)  # (W, H) per level, matches (x, y)
    cells = weights.shape + (2,)
    whole = torch.floor(torch.rand(cells, generator=g, dtype=torch.float64) * (sizes + 1)) - 1
    fraction = torch.rand(cells, generator=g, dtype=torch.float64) * 0.5 + 0.25
    locations = (whole + fraction + 0.5) / sizes[:, None]

    def fn(v, loc, w):
        return ms_deform_attn_triton(v, spatial_shapes, level_start_index, loc, w)

    inputs = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


def test_saves_only_inputs():
    value, spatial_shapes, level_start_index, locations, weights = _problem()
    inputs = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ms_deform_attn_triton(value, spatial_shapes, level_start_index, locations, weights)
    big = [tuple(t.shape) for t in saved if t.numel() > 3 * len(SHAPES)]  # beyond the level table
    assert sorted(big) == sorted(tuple(t.shape) for t in inputs)


def test_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="need a CUDA device or TRITON_INTERPRET=1"):
        ms_deform_attn_triton(*_problem())


def test_shape_errors():
    value, spatial_shapes, level_start_index, locations, weights = _problem()
    with pytest.raises(ValueError, match="spatial_shapes sum"):
        ms_deform_attn_triton(value[:, :-1], spatial_shapes, level_start_index, locations, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_triton(value, spatial_shapes, level_start_index, locations, weights[..., :1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_on_cuda(monkeypatch, dtype):
    monkeypatch.delenv("TRITON_INTERPRET")
    inputs = _problem([(13, 17), (7, 9), (4, 5)], queries=100, heads=4, head_dim=32, points=4)
    inputs = [t.cuda() for t in inputs]
    low = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    out, grads, cotangent = _outputs_and_grads(ms_deform_attn_triton, *low)
    # Reference in fp32 on the same (rounded) inputs, as in the CPU test.
    upcast = [t.float() if t.is_floating_point() else t for t in low]
    ref, ref_grads, _ = _outputs_and_grads(ms_deform_attn_reference, *upcast, cotangent=cotangent)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad.float(), ref_grad, **tol)


def test_module_forced_to_triton_matches_lean():
    # model.ops.deform_attn=triton reaches the kernels through MSDeformAttn.
    from ops.ms_deform_attn import MSDeformAttn

    torch.manual_seed(0)
    spatial_shapes = torch.tensor(SHAPES)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    query = torch.randn(2, 4, 16)
    reference_points = torch.rand(2, 4, len(SHAPES), 2)
    tokens = torch.randn(2, int(sizes.sum()), 16)
    outputs = []
    for implementation in ("triton", "lean"):
        torch.manual_seed(1)
        attn = MSDeformAttn(16, n_levels=len(SHAPES), n_heads=2, n_points=2, implementation=implementation)
        outputs.append(attn(query, reference_points, tokens, spatial_shapes, level_start_index))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
