import pytest
import torch
import torch.nn.functional as F

from ops.mask_product import average_over_scales, mask_logits, matched_mask_logits


def test_values_and_gradients_match_einsum():
    torch.manual_seed(0)
    embed = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    features = torch.randn(2, 4, 3, 6, dtype=torch.float64, requires_grad=True)
    out = mask_logits(embed, features)
    ref = torch.einsum("bqc,bchw->bqhw", embed, features)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    grad = torch.randn_like(ref)
    mine = torch.autograd.grad(out, (embed, features), grad)
    theirs = torch.autograd.grad(ref, (embed, features), grad)
    for a, b in zip(mine, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradcheck(mask_logits, (embed[:, :2, :3].detach().requires_grad_(),
                                                  features[:, :3, :2, :2].detach().requires_grad_()))


def test_only_the_needed_gradient_is_computed():
    embed = torch.randn(1, 3, 4)
    features = torch.randn(1, 4, 2, 2, requires_grad=True)
    (grad,) = torch.autograd.grad(mask_logits(embed, features).sum(), features)
    torch.testing.assert_close(grad, embed.sum(1)[:, :, None, None].expand(1, 4, 2, 2))


def test_bf16_autocast_computes_in_bf16_and_returns_fp32_gradients():
    embed = torch.randn(2, 3, 4, requires_grad=True)
    features = torch.randn(2, 4, 2, 2, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mask_logits(embed, features)
        assert out.dtype == torch.einsum("bqc,bchw->bqhw", embed, features).dtype == torch.bfloat16
    out.float().sum().backward()
    assert embed.grad.dtype == torch.float32 and features.grad.dtype == torch.float32


def test_mismatched_channels_are_rejected():
    with pytest.raises(ValueError, match="B×Q×C embeddings"):
        mask_logits(torch.randn(2, 3, 4), torch.randn(2, 5, 2, 2))


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_sparse_gradient_rows_give_the_dense_gradients(needs):
    # As in training: only a few queries' masks get a gradient (image 1: none at all).
    torch.manual_seed(1)
    embed = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=needs[0])
    features = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=needs[1])
    grad = torch.zeros(2, 6, 3, 5, dtype=torch.float64)
    grad[0, 1] = torch.randn(3, 5, dtype=torch.float64)
    grad[0, 4, 2, 3] = -2.0
    inputs = [t for t in (embed, features) if t.requires_grad]
    mine = torch.autograd.grad(mask_logits(embed, features), inputs, grad)
    theirs = torch.autograd.grad(torch.einsum("bqc,bchw->bqhw", embed, features), inputs, grad)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    if needs[1]:
        assert mine[-1][1].abs().max() == 0  # the image without live rows: zeros, not garbage


def test_a_nan_gradient_row_still_propagates():
    embed = torch.randn(1, 4, 3, requires_grad=True)
    features = torch.randn(1, 3, 2, 2, requires_grad=True)
    grad = torch.zeros(1, 4, 2, 2)
    grad[0, 2, 0, 0] = float("nan")
    grad_embed, grad_features = torch.autograd.grad(mask_logits(embed, features), (embed, features), grad)
    assert grad_embed[0, 2].isnan().all() and grad_features.isnan().any()
    assert not grad_embed[0, [0, 1, 3]].isnan().any()


@pytest.mark.parametrize("rows", [[[3, 0], [4]], [[], [1, 2, 0]], [[], []]])
def test_matched_rows_are_the_gathered_rows_of_the_product(rows):
    torch.manual_seed(0)
    embed = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    features = torch.randn(2, 4, 3, 6, dtype=torch.float64, requires_grad=True)
    queries = [torch.tensor(r, dtype=torch.long) for r in rows]
    picked = matched_mask_logits([embed], [features], queries, torch.float64)
    full = torch.einsum("bqc,bchw->bqhw", embed, features)
    ref = torch.cat([full[b, q] for b, q in enumerate(queries)])
    assert picked.shape == ref.shape == (sum(map(len, rows)), 3, 6)
    torch.testing.assert_close(picked, ref, rtol=1e-13, atol=1e-13)
    if picked.numel():
        grad = torch.randn_like(ref)
        mine = torch.autograd.grad(picked, (embed, features), grad)
        theirs = torch.autograd.grad(ref, (embed, features), grad)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_matched_rows_take_the_dtype_of_the_full_product():
    embed, features = torch.randn(1, 3, 4), torch.randn(1, 4, 2, 2)
    picked = matched_mask_logits([embed], [features], [torch.tensor([2])], torch.bfloat16)
    assert picked.dtype == torch.bfloat16
    torch.testing.assert_close(picked, mask_logits(embed.bfloat16(), features.bfloat16())[0, 2:])


def test_average_over_scales_upsamples_to_the_first_scale_and_averages_logits():
    torch.manual_seed(0)
    fine, coarse = torch.randn(2, 3, 8, 12, dtype=torch.float64), torch.randn(2, 3, 4, 6, dtype=torch.float64)
    expected = (fine + F.interpolate(coarse, size=(8, 12), mode="bilinear", align_corners=False)) / 2
    torch.testing.assert_close(average_over_scales([fine, coarse], (8, 12)), expected, rtol=1e-14, atol=1e-14)
    assert average_over_scales([fine], (8, 12)) is fine  # one scale: MaskFormer's product itself
    with pytest.raises(ValueError, match="at least one scale"):
        average_over_scales([], (8, 12))


@pytest.mark.parametrize("rows", [[[3, 0], [4]], [[], [2]], [[], []]])
def test_matched_rows_over_scales_are_the_gathered_rows_of_the_averaged_product(rows):
    """PFT: per-scale products of different sizes and widths, averaged after upsampling."""
    torch.manual_seed(0)
    shapes = [(4, 8, 12), (6, 4, 6), (5, 2, 3)]  # channels, height, width per scale
    embeds = [torch.randn(2, 5, c, dtype=torch.float64, requires_grad=True) for c, _, _ in shapes]
    features = [torch.randn(2, c, h, w, dtype=torch.float64, requires_grad=True) for c, h, w in shapes]
    queries = [torch.tensor(r, dtype=torch.long) for r in rows]
    picked = matched_mask_logits(embeds, features, queries, torch.float64)
    full = average_over_scales(
        [torch.einsum("bqc,bchw->bqhw", e, f) for e, f in zip(embeds, features)], (8, 12))
    ref = torch.cat([full[b, q] for b, q in enumerate(queries)])
    assert picked.shape == ref.shape == (sum(map(len, rows)), 8, 12)
    torch.testing.assert_close(picked, ref, rtol=1e-13, atol=1e-13)
    grad = torch.randn_like(ref)
    leaves = (*embeds, *features)
    for mine, theirs in zip(torch.autograd.grad(picked, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


def test_matched_rows_need_one_embedding_per_feature_map():
    with pytest.raises(ValueError, match="one embedding per feature map"):
        matched_mask_logits([torch.randn(1, 3, 4)], [], [torch.tensor([0])], torch.float32)
