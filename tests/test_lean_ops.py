"""ops.lean_linear and ops.window_attention compute what the plain modules compute —
values and every gradient, in fp64 and under bf16 autocast — while saving less for
backward."""

import ops.torchvision_fix  # noqa: F401  (timm imports torchvision)

# isort: split
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ops.window_attention
from ops.dropout import Dropout
from ops.lean_linear import (
    gelu_linear,
    is_plain_gelu_mlp,
    layer_norm_linear,
    norm_gelu_mlp,
    relu_dropout_linear,
)
from ops.scratch import ScratchBuffers
from ops.window_attention import window_attention


def _grads(out: torch.Tensor, tensors) -> list[torch.Tensor]:
    torch.manual_seed(5)
    return torch.autograd.grad(out, tensors, torch.randn_like(out))


def _saved_bytes(fn) -> int:
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        with torch.no_grad():  # not the identity init, so the norm's parameters matter
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def plain(self, x):
        return self.fc2(self.act(self.fc1(self.norm(x))))


def _mlp(dtype=torch.float32) -> _Mlp:
    torch.manual_seed(0)
    return _Mlp(12, 48).to(dtype)


def _lean(mlp: _Mlp, x):
    return norm_gelu_mlp(x, mlp.norm, mlp)


def test_which_mlps_are_plain_gelu_mlps():
    from timm.layers import Mlp

    assert is_plain_gelu_mlp(Mlp(8, 32))
    assert not is_plain_gelu_mlp(Mlp(8, 32, drop=0.1).train())
    assert is_plain_gelu_mlp(Mlp(8, 32, drop=0.1).eval())
    assert not is_plain_gelu_mlp(Mlp(8, 32, act_layer=lambda: nn.GELU(approximate="tanh")))
    assert not is_plain_gelu_mlp(Mlp(8, 32, norm_layer=nn.LayerNorm))
    assert not is_plain_gelu_mlp(nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)))


def test_norm_gelu_mlp_matches_the_modules_in_fp64():
    mlp = _mlp(torch.float64)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    params = [x, *mlp.parameters()]
    expected = mlp.plain(x)
    actual = _lean(mlp, x)
    torch.testing.assert_close(actual, expected)
    for got, want in zip(_grads(actual, params), _grads(expected, params)):
        torch.testing.assert_close(got, want)


def test_norm_gelu_mlp_under_bf16_autocast_and_what_it_saves():
    mlp = _mlp()
    x = torch.randn(4, 64, 12, requires_grad=True)
    params = [x, *mlp.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = mlp.plain(x)
        actual = _lean(mlp, x)
    assert actual.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected.float(), atol=2e-2, rtol=2e-2)
    for got, want in zip(_grads(actual, params), _grads(expected, params)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)
    # fp32: x (12 a token) and fc1's output (48) instead of x, norm(x), fc1's output and
    # its GELU (12 + 12 + 48 + 48), weights aside.
    weights = sum(p.numel() * 4 for p in mlp.parameters())
    lean = _saved_bytes(lambda: _lean(mlp, x)) - weights
    plain = _saved_bytes(lambda: mlp.plain(x)) - weights
    tokens = 4 * 64
    assert lean <= tokens * (12 + 48) * 4 + tokens * 8 < plain


def test_layer_norm_linear_without_bias_and_gelu_linear_alone():
    torch.manual_seed(1)
    norm, linear = nn.LayerNorm(6).double(), nn.Linear(6, 9, bias=False).double()
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: layer_norm_linear(v, norm, linear.weight), (x,))
    fc = nn.Linear(9, 4).double()
    hidden = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: gelu_linear(h, fc), (hidden,))


@pytest.mark.parametrize("training", [True, False])
def test_relu_dropout_linear_matches_the_modules_with_the_same_dropout_mask(training):
    torch.manual_seed(2)
    dropout, linear = Dropout(0.3).train(training), nn.Linear(16, 5).double()
    hidden = torch.randn(4, 10, 16, dtype=torch.float64, requires_grad=True)
    params = [hidden, *linear.parameters()]
    torch.manual_seed(3)
    expected = linear(dropout(F.relu(hidden)))
    torch.manual_seed(3)  # the same random mask: both draw it with ops.dropout over relu(h)
    actual = relu_dropout_linear(hidden, dropout, linear)
    torch.testing.assert_close(actual, expected)
    for got, want in zip(_grads(actual, params), _grads(expected, params)):
        torch.testing.assert_close(got, want)
    # Saved: the dropout's output only (plus the weight), not relu(h) and the mask too.
    assert (
        _saved_bytes(lambda: relu_dropout_linear(hidden, dropout, linear)) == hidden.numel() * 8 + 16 * 5 * 8
    )


def _windows(images=2, windows=4, heads=3, tokens=9, dim=8, dtype=torch.float64, shifted=True):
    torch.manual_seed(4)
    q, k, v = (
        torch.randn(images * windows, heads, tokens, dim, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    bias = torch.randn(heads, tokens, tokens, dtype=dtype, requires_grad=True)
    mask = (torch.rand(windows, tokens, tokens) > 0.7).to(dtype) * -100 if shifted else None
    return q, k, v, bias, mask


def _plain_windows(q, k, v, scale, bias, mask):
    scores = (q * scale) @ k.transpose(-2, -1) + bias
    if mask is not None:
        heads, tokens = q.shape[1], q.shape[2]
        scores = scores.view(-1, mask.shape[0], heads, tokens, tokens) + mask[None, :, None]
        scores = scores.view(-1, heads, tokens, tokens)
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("shifted", [True, False])
@pytest.mark.parametrize("max_block_bytes", [2**23, 3000])  # one block; a few windows of one image per block
def test_window_attention_matches_plain_attention_in_fp64(shifted, max_block_bytes, monkeypatch):
    monkeypatch.setattr(ops.window_attention, "MAX_BLOCK_BYTES", max_block_bytes)
    q, k, v, bias, mask = _windows(shifted=shifted)
    expected = _plain_windows(q, k, v, 0.35, bias, mask)
    actual = window_attention(q, k, v, 0.35, bias, mask)
    torch.testing.assert_close(actual, expected)
    for got, want in zip(_grads(actual, [q, k, v, bias]), _grads(expected, [q, k, v, bias])):
        torch.testing.assert_close(got, want)


def test_window_attention_bf16_autocast_and_what_it_saves():
    q, k, v, bias, mask = _windows(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _plain_windows(q, k, v, 0.35, bias, mask)
        actual = window_attention(q, k, v, 0.35, bias, mask)
    assert actual.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected.float(), atol=3e-2, rtol=3e-2)
    for got, want in zip(_grads(actual, [q, k, v, bias]), _grads(expected, [q, k, v, bias])):
        torch.testing.assert_close(got.float(), want.float(), atol=6e-2, rtol=6e-2)
    # fp32: q, k, v, the bias and the mask; no windows x heads x T x T matrix.
    lean = _saved_bytes(lambda: window_attention(q, k, v, 0.35, bias, mask))
    assert lean == 3 * q.numel() * 4 + bias.numel() * 4 + mask.numel() * 4
    # Autograd's path: q·scale, k, v and the 8 x 3 x 9 x 9 attention weights.
    assert (
        _saved_bytes(lambda: _plain_windows(q, k, v, 0.35, bias, mask))
        == 3 * q.numel() * 4 + 8 * 3 * 9 * 9 * 4
    )


def test_window_attention_rejects_shapes_that_do_not_fit():
    q, k, v, bias, mask = _windows()
    with pytest.raises(ValueError, match="window attention"):
        window_attention(q, k, v, 0.35, bias, mask[:3])


def test_window_attention_softmax_runs_in_fp32_for_bf16_inputs():
    q, k, v, bias, mask = _windows(dtype=torch.float32)
    q, k = q.detach().bfloat16(), k.detach().bfloat16()
    images, windows, heads, tokens, dim = 2, 4, 3, 9, 8
    scratch, scratch_fp32 = ScratchBuffers(q), ScratchBuffers(bias)
    weights, weights_low = ops.window_attention._scores(
        scratch,
        scratch_fp32,
        q.view(images, windows, heads, tokens, dim),
        k.view(images, windows, heads, tokens, dim),
        bias.detach(),
        mask.unsqueeze(1),
        0.35,
        images,
        windows,
    )
    assert weights.dtype == torch.float32 and weights_low.dtype == torch.bfloat16
    expected = (
        ((q.float() @ k.float().transpose(-2, -1)).bfloat16().float() * 0.35 + bias).view(
            images, windows, heads, tokens, tokens
        )
        + mask[None, :, None]
    ).softmax(-1)
    torch.testing.assert_close(weights.view_as(expected), expected, atol=1e-6, rtol=1e-5)
