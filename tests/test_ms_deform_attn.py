import importlib.util
import math

import pytest
import torch
from dispatch_spy import LargestTensor  # tests/ is on sys.path under pytest

from ops.ms_deform_attn import MSDeformAttn, ms_deform_attn, resolve_implementation
from ops.ms_deform_attn_lean import ms_deform_attn_lean

SHAPES = [(5, 7), (3, 4)]  # non-square levels catch (x, y) / (H, W) swaps


def _level_index(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1])), int(sizes.sum())


def _problem(shapes=SHAPES, batch=2, queries=3, heads=2, head_dim=3, points=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index, tokens = _level_index(shapes)
    levels = len(shapes)
    value = torch.randn(batch, tokens, heads, head_dim, generator=g, dtype=dtype)
    # Some points fall outside [0, 1] to exercise the zero padding.
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=g, dtype=dtype) * 1.3 - 0.15
    weights = torch.rand(batch, queries, heads, levels, points, generator=g, dtype=dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return value, spatial_shapes, level_start_index, locations, weights


def naive_ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights):
    """Explicit bilinear interpolation of every point (pixel centres at (i + 0.5) / size,
    zeros outside the map), looped in Python. Differentiable in all three tensors."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    rows = []
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                acc = value.new_zeros(head_dim)
                for lvl in range(levels):
                    height, width = spatial_shapes[lvl].tolist()
                    start = int(level_start_index[lvl])
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0] * width - 0.5
                        y = locations[b, q, m, lvl, p, 1] * height - 0.5
                        x0, y0 = math.floor(x.item()), math.floor(y.item())
                        for yi in (y0, y0 + 1):
                            for xi in (x0, x0 + 1):
                                if 0 <= xi < width and 0 <= yi < height:
                                    corner = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
                                    acc = (
                                        acc
                                        + weights[b, q, m, lvl, p]
                                        * corner
                                        * value[b, start + yi * width + xi, m]
                                    )
                rows.append(acc)
    return torch.stack(rows).view(batch, queries, heads * head_dim)


# The torch implementations; the Triton one is tested in test_ms_deform_attn_triton.py.
IMPLEMENTATIONS = ["lean", "reference"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_naive_bilinear_loop_values_and_gradients(implementation):
    inputs = [t.requires_grad_() if t.is_floating_point() else t for t in _problem()]
    value, spatial_shapes, level_start_index, locations, weights = inputs
    out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, implementation)
    ref = naive_ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
    assert out.shape == (2, 3, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad((out * cotangent).sum(), (value, locations, weights))
    ref_grads = torch.autograd.grad((ref * cotangent).sum(), (value, locations, weights))
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
    assert grads[1].abs().sum() > 0  # locations do receive gradient


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shapes", [[(1, 1)], [(1, 5), (3, 1)]])
def test_one_pixel_and_one_row_levels_match_the_naive_loop(implementation, shapes):
    inputs = _problem(shapes=shapes, batch=1, queries=4, heads=3, head_dim=5, points=3, dtype=torch.float64)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    leaves = [t.requires_grad_() for t in (value, locations, weights)]
    out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, implementation)
    ref = naive_ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
    torch.testing.assert_close(out, ref)
    for grad, ref_grad in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(ref.sum(), leaves)):
        torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_queries_give_an_empty_output_and_a_zero_value_gradient(implementation):
    value, spatial_shapes, level_start_index, locations, weights = _problem(queries=0)
    value.requires_grad_()
    out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, implementation)
    assert out.shape == (2, 0, 6)
    (grad,) = torch.autograd.grad(out.sum(), value)
    assert grad.shape == value.shape and not grad.any()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_level_start_index_must_tile_the_tokens(implementation):
    value, spatial_shapes, _, locations, weights = _problem()
    with pytest.raises(ValueError, match=r"level_start_index must be \[0, 35\].*got \[0, 0\]"):
        ms_deform_attn(value, spatial_shapes, torch.zeros(2, dtype=torch.long), locations, weights, implementation)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradcheck_float64(implementation):
    value, spatial_shapes, level_start_index, locations, weights = _problem(
        shapes=[(3, 4), (2, 2)],
        batch=1,
        queries=2,
        heads=2,
        head_dim=2,
        points=2,
        dtype=torch.float64,
        seed=1,
    )
    # Interior points: bilinear interpolation has kinks on pixel centres and at the border,
    # where finite differences disagree with the one-sided analytic gradient.
    locations = locations.clamp(0.05, 0.95)

    def fn(v, loc, w):
        return ms_deform_attn(v, spatial_shapes, level_start_index, loc, w, implementation)

    assert torch.autograd.gradcheck(
        fn,
        (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_()),
        eps=1e-6,
        atol=1e-5,
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bf16_inputs_and_autocast_stay_close_to_fp32(implementation):
    value, spatial_shapes, level_start_index, locations, weights = _problem(queries=16, head_dim=8)
    ref = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, "reference")
    # Plain bf16 tensors: computed and returned in bf16.
    out = ms_deform_attn(
        value.bfloat16(),
        spatial_shapes,
        level_start_index,
        locations.bfloat16(),
        weights.bfloat16(),
        implementation,
    )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
    # Under autocast a bf16 value with fp32 locations (what MSDeformAttn passes) works and
    # keeps the value's dtype; gradients come back in each input's dtype.
    bf16_value = value.bfloat16().requires_grad_()
    fp32_locations = locations.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(
            bf16_value, spatial_shapes, level_start_index, fp32_locations, weights, implementation
        )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert bf16_value.grad.dtype == torch.bfloat16 and fp32_locations.grad.dtype == torch.float32


def test_lean_in_query_blocks_equals_reference_and_saves_only_inputs():
    value, spatial_shapes, level_start_index, locations, weights = _problem(queries=9)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    # A budget of a few bytes: one query per block.
    out = ms_deform_attn_lean(
        inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2], block_mib=1e-6
    )
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 3 and all(any(s is t for t in inputs) for s in saved)
    ref = ms_deform_attn(inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2], "reference")
    torch.testing.assert_close(out, ref)
    cotangent = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, inputs, cotangent), torch.autograd.grad(ref, inputs, cotangent)
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_lean_never_holds_a_whole_level_of_samples():
    # A wide head (D=64) and 8 points, so one level's samples dwarf the inputs and are
    # 8x the output: with blocks of an eighth, nothing larger than the output is made.
    value, spatial_shapes, level_start_index, locations, weights = _problem(
        queries=64, heads=2, head_dim=64, points=8
    )
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    one_level_samples = 2 * 2 * 64 * 64 * 8  # (B·M)×D×Q×P
    block_mib = one_level_samples * 4 / 8 / 2**20
    with LargestTensor() as spy:
        out = ms_deform_attn_lean(
            inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2], block_mib
        )
        out.sum().backward()
    assert spy.largest <= out.numel() == one_level_samples // 8
    with LargestTensor() as spy:
        ms_deform_attn(
            inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2], "reference"
        ).sum().backward()
    assert spy.largest >= one_level_samples


def test_implementation_choice():
    assert resolve_implementation("auto", "cpu") == "lean"
    assert resolve_implementation("reference", "cpu") == "reference"
    triton_installed = importlib.util.find_spec("triton") is not None
    assert resolve_implementation("auto", "cuda") == ("triton" if triton_installed else "lean")
    with pytest.raises(ValueError, match="model.ops.deform_attn must be one of"):
        resolve_implementation("cuda_kernel", "cpu")
    with pytest.raises(ValueError, match="model.ops.deform_attn must be one of"):
        MSDeformAttn(16, n_heads=4, implementation="fast")


def _module_inputs(d_model=16, queries=6, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index, tokens = _level_index(SHAPES)
    query = torch.randn(batch, queries, d_model, generator=g)
    reference_points = torch.rand(batch, queries, len(SHAPES), 2, generator=g)
    input_flatten = torch.randn(batch, tokens, d_model, generator=g)
    return query, reference_points, input_flatten, spatial_shapes, level_start_index


def _randomised_module(d_model=16, heads=4, points=3, seed=0):
    torch.manual_seed(seed)
    attn = MSDeformAttn(d_model, n_levels=len(SHAPES), n_heads=heads, n_points=points)
    with torch.no_grad():  # leave the init (uniform weights, fixed offsets) for a generic state
        attn.attention_weights.weight.normal_(std=0.5)
        attn.sampling_offsets.weight.normal_(std=0.5)
    return attn


def test_module_under_bf16_autocast():
    attn = _randomised_module()
    inputs = _module_inputs()
    ref = attn(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(*inputs)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape == (2, 6, 16)
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


def test_padding_mask_zeroes_contributions():
    attn = _randomised_module()
    query, reference_points, input_flatten, spatial_shapes, level_start_index = _module_inputs()
    padding_mask = torch.zeros(input_flatten.shape[:2], dtype=torch.bool)
    padding_mask[0, :20] = True  # most of the first level of image 0
    padding_mask[1, 35:] = True  # the coarse level of image 1
    out = attn(query, reference_points, input_flatten, spatial_shapes, level_start_index, padding_mask)
    # Whatever the padded tokens hold, the output is the same ...
    perturbed = input_flatten.masked_fill(padding_mask[..., None], 1e3)
    torch.testing.assert_close(
        attn(query, reference_points, perturbed, spatial_shapes, level_start_index, padding_mask), out
    )
    # ... while without the mask they do contribute.
    unmasked = attn(query, reference_points, perturbed, spatial_shapes, level_start_index)
    assert (unmasked - out).abs().amax() > 1.0


def test_initialisation_is_deformable_detrs():
    heads, levels, points = 8, 2, 3
    attn = MSDeformAttn(32, n_levels=levels, n_heads=heads, n_points=points)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0
    assert attn.value_proj.bias.abs().sum() == 0 and attn.output_proj.bias.abs().sum() == 0
    grid = attn.sampling_offsets.bias.view(heads, levels, points, 2)
    distance = torch.arange(1, points + 1, dtype=torch.float32)
    # Head h looks along angle 2*pi*h/8, scaled so the larger coordinate is 1; point p at p + 1.
    torch.testing.assert_close(grid[0, 1, :, 0], distance)  # 0 degrees: +x
    torch.testing.assert_close(grid[1, 0], torch.stack([distance, distance], -1))  # 45 degrees
    torch.testing.assert_close(grid[6, 1, :, 1], -distance)  # 270 degrees: -y
    assert grid[6, 1, :, 0].abs().max() < 1e-6


def test_box_reference_points_and_errors():
    attn = _randomised_module()
    query, reference_points, input_flatten, spatial_shapes, level_start_index = _module_inputs()
    boxes = torch.cat([reference_points, torch.full_like(reference_points, 0.2)], -1)
    assert attn(query, boxes, input_flatten, spatial_shapes, level_start_index).shape == (2, 6, 16)
    with pytest.raises(ValueError, match="reference_points"):
        attn(query, reference_points[..., :1], input_flatten, spatial_shapes, level_start_index)
    with pytest.raises(ValueError, match="spatial_shapes sum"):
        attn(query, reference_points, input_flatten[:, :-1], spatial_shapes, level_start_index)
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(30, n_heads=8)
