import pytest
import torch
import torch.nn.functional as F

from ops.dropout import Dropout, dropout


def test_drops_a_fraction_p_and_rescales_the_rest():
    torch.manual_seed(0)
    x = torch.ones(400_000)
    out = dropout(x, 0.1)
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - 0.1) < 3e-3  # 6 sigma of a binomial at n=4e5
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.9))
    assert abs(out.mean().item() - 1.0) < 5e-3  # unbiased in expectation


def test_backward_uses_the_forward_mask_and_scale():
    torch.manual_seed(1)
    x = torch.randn(3, 50, requires_grad=True)
    out = dropout(x, 0.3)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad)
    keep = (out != 0).float()  # x has no exact zeros
    torch.testing.assert_close(got, grad * keep / 0.7)


def test_seeded_runs_repeat_and_no_grad_draws_the_same_mask():
    x = torch.randn(64, 64, requires_grad=True)
    torch.manual_seed(5)
    first = dropout(x, 0.5)
    torch.manual_seed(5)
    second = dropout(x, 0.5)
    torch.manual_seed(5)
    with torch.no_grad():
        third = dropout(x, 0.5)
    assert torch.equal(first, second) and torch.equal(first.detach(), third)


def test_bf16_input_keeps_its_dtype_and_p_is_not_quantised():
    torch.manual_seed(2)
    x = torch.ones(200_000, dtype=torch.bfloat16)
    out = dropout(x, 0.37)
    assert out.dtype == torch.bfloat16
    assert abs((out == 0).float().mean().item() - 0.37) < 5e-3


def test_module_is_identity_in_eval_and_edge_probabilities():
    x = torch.randn(10)
    module = Dropout(0.4).eval()
    assert module(x) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), F.dropout(x, 1.0))
    with pytest.raises(ValueError, match="dropout probability must be in"):
        dropout(x, 1.5)
