"""ops.attention: backend choice, every CPU backend against an fp64 reference (masks,
fully-masked rows, bf16), the chunked and blocked paths' memory bounds, the chunked
path's dropout in backward, and the module's equivalence with nn.MultiheadAttention."""

import pytest
import torch
from dispatch_spy import LargestTensor  # tests/ is on sys.path under pytest
from torch import nn

import ops.blocked_attention as blocked_module
from ops.attention import (
    MultiheadAttention,
    choose_backends,
    scaled_dot_product_attention,
    xavier_init_like_detr,
)
from ops.blocked_attention import blocked_attention

CPU_BACKENDS = ["auto", "flash", "math", "chunked"]


def reference(q, k, v, mask=None):
    """fp64 softmax attention; rows with no allowed key attend to every key."""
    scores = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = mask | ~mask.any(-1, keepdim=True)
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            blocked = torch.isinf(mask).all(-1, keepdim=True)
            scores = scores + mask.double().masked_fill(blocked, 0.0)
    return scores.softmax(-1) @ v.double()


def _qkv(dtype=torch.float32, batch=2, heads=3, queries=5, keys=7, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, heads, n, dim, generator=g).to(dtype).requires_grad_(True)
        for n in (queries, keys, keys)
    ]


def _bool_mask(seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.5
    mask[0, 0, 2] = False  # a query that may attend to nothing
    return mask


def _grads(out, inputs, seed=2):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad((out.double() * g).sum(), inputs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_cpu_backends_match_reference(backend, mask_kind):
    q, k, v = _qkv()
    mask = None
    if mask_kind != "none":
        mask = _bool_mask()
        if mask_kind == "additive":
            mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    # A budget of a few bytes forces chunks of one query on the chunked path.
    out = scaled_dot_product_attention(q, k, v, mask, backend=backend, max_matrix_mib=1e-6)
    expected = reference(q, k, v, mask)
    assert out.dtype == torch.float32 and not out.isnan().any()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(out, (q, k, v)), _grads(expected, (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fully_masked_row_attends_to_every_key():
    q, k, v = _qkv()
    mask = _bool_mask()
    out = scaled_dot_product_attention(q, k, v, mask)
    unmasked = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out[0, :, 2], unmasked[0, :, 2])
    assert not torch.allclose(out[1], unmasked[1])  # the other rows are masked


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_inputs_stay_close_to_fp64(backend):
    q, k, v = _qkv(torch.bfloat16)
    out = scaled_dot_product_attention(q, k, v, _bool_mask(), backend=backend, max_matrix_mib=1e-6)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(q, k, v, _bool_mask()), rtol=0.02, atol=0.02)
    grads = _grads(out, (q, k, v))
    assert all(gr.dtype == torch.bfloat16 and torch.isfinite(gr).all() for gr in grads)


def test_math_path_accumulates_in_fp32_under_autocast():
    q, k, v = _qkv(torch.bfloat16, keys=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scaled_dot_product_attention(q, k, v, backend="math")
    bf16_matmuls = torch.softmax((q @ k.transpose(-1, -2)) * 8**-0.5, -1) @ v  # bf16 throughout
    error = (out.double() - reference(q, k, v)).abs().max()
    assert error <= (bf16_matmuls.double() - reference(q, k, v)).abs().max()


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_chunked_path_never_materialises_the_matrix(dropout):
    q, k, v = _qkv(queries=64, keys=512, heads=2)
    full = 2 * 2 * 64 * 512
    per_entry = 12 if dropout else 8  # fp32 scores and softmax, plus the dropout mask
    budget_mib = full * per_entry / 8 / 2**20  # an eighth of the whole matrix
    with LargestTensor() as spy:
        out = scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, backend="chunked", max_matrix_mib=budget_mib
        )
        out.sum().backward()
    assert spy.largest <= full // 8


def test_auto_chunks_with_dropout_when_the_matrix_exceeds_the_budget():
    q, k, v = _qkv(queries=64, keys=512, heads=2)
    full = 2 * 2 * 64 * 512
    with LargestTensor() as spy:
        scaled_dot_product_attention(
            q, k, v, dropout_p=0.1, max_matrix_mib=full * 12 / 4 / 2**20
        ).sum().backward()
    assert spy.largest <= full // 4
    with LargestTensor() as spy:  # a generous budget: the math path, whole matrix at once
        scaled_dot_product_attention(q, k, v, dropout_p=0.1).sum().backward()
    assert spy.largest >= full


def test_chunked_dropout_backward_uses_the_forward_masks():
    # With v = identity, the output *is* the dropped-out attention matrix P, and the
    # gradient of sum(out * g) with respect to v is P^T g: it matches only if backward
    # recomputes each chunk with the same dropout mask as forward.
    torch.manual_seed(0)
    keys = 16
    q, k, _ = _qkv(queries=12, keys=keys, dim=keys, heads=1, batch=1)
    v = torch.eye(keys)[None, None].requires_grad_(True)
    out = scaled_dot_product_attention(
        q, k, v, dropout_p=0.5, backend="chunked", max_matrix_mib=keys * 12 * 3 / 2**20
    )
    assert (out == 0).any()  # dropout happened
    g = torch.randn(out.shape)
    (grad_v,) = torch.autograd.grad((out * g).sum(), v)
    torch.testing.assert_close(grad_v[0, 0], out.detach()[0, 0].T @ g[0, 0])


def test_backend_rules():
    size, budget = 10, 100
    cpu = dict(has_mask=False, dropout_p=0.0, matrix_size=size, max_matrix_bytes=budget)
    assert choose_backends("cpu", torch.float32, **cpu) == ["flash"]
    assert choose_backends("cpu", torch.bfloat16, **cpu) == ["blocked"]
    assert choose_backends("cpu", torch.bfloat16, **{**cpu, "has_mask": True}) == ["flash"]
    assert choose_backends("cpu", torch.float16, **cpu) == ["flash"]
    assert choose_backends("cpu", torch.bfloat16, **{**cpu, "dropout_p": 0.1}) == ["math"]
    assert choose_backends("cpu", torch.float32, **{**cpu, "dropout_p": 0.1}) == ["math"]
    assert choose_backends("cpu", torch.float32, **{**cpu, "dropout_p": 0.1, "matrix_size": 1000}) == [
        "chunked"
    ]
    assert choose_backends("cpu", torch.float64, **cpu) == ["math"]
    h100, a100 = (9, 0), (8, 0)
    assert choose_backends("cuda", torch.bfloat16, **cpu, cuda_capability=h100) == [
        "cudnn",
        "flash",
        "efficient",
    ]
    assert choose_backends("cuda", torch.float16, **cpu, cuda_capability=a100) == ["flash", "efficient"]
    assert choose_backends("cuda", torch.bfloat16, **{**cpu, "has_mask": True}, cuda_capability=h100) == [
        "efficient"
    ]
    assert choose_backends("cuda", torch.float32, **cpu, cuda_capability=h100) == ["efficient"]
    assert choose_backends("cpu", torch.float32, **cpu, requested="chunked") == ["chunked"]
    with pytest.raises(ValueError, match="model.ops.attention_backend: attention backend 'efficient' does not run on cpu"):
        choose_backends("cpu", torch.float32, **cpu, requested="efficient")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        choose_backends("cpu", torch.float32, **cpu, requested="fastest")


def test_module_matches_nn_multihead_attention():
    torch.manual_seed(0)
    ours = MultiheadAttention(16, 4).eval()
    torch_mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in torch_mha.parameters())
    with torch.no_grad():
        torch_mha.in_proj_weight.copy_(
            torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight])
        )
        torch_mha.in_proj_bias.copy_(torch.randn(48))
        ours.q_proj.bias.copy_(torch_mha.in_proj_bias[:16])
        ours.k_proj.bias.copy_(torch_mha.in_proj_bias[16:32])
        ours.v_proj.bias.copy_(torch_mha.in_proj_bias[32:])
        torch_mha.out_proj.load_state_dict(ours.out_proj.state_dict())
    query, memory = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    mask = torch.rand(2, 5, 9) > 0.3
    mask[:, :, 0] = True
    expected = torch_mha(query, memory, memory, attn_mask=~mask.repeat_interleave(4, 0), need_weights=False)[
        0
    ]
    torch.testing.assert_close(ours(query, memory, memory, attn_mask=mask), expected, rtol=1e-5, atol=1e-5)


def test_module_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="attention backend must be one of"):
        MultiheadAttention(16, 4, backend="fast")


def test_detr_initialisation_draws_qkv_as_one_packed_matrix():
    torch.manual_seed(0)
    layer = nn.ModuleDict({"attn": MultiheadAttention(64, 4), "ffn": nn.Linear(64, 256)})
    xavier_init_like_detr(layer)
    packed_bound = (6 / (64 + 3 * 64)) ** 0.5  # nn.MultiheadAttention's 192x64 in_proj_weight
    qkv = torch.cat([layer["attn"].q_proj.weight, layer["attn"].k_proj.weight, layer["attn"].v_proj.weight])
    assert qkv.abs().max() <= packed_bound and qkv.abs().max() > 0.9 * packed_bound
    out_bound = (6 / (64 + 64)) ** 0.5
    assert packed_bound < layer["attn"].out_proj.weight.abs().max() <= out_bound
    assert layer["ffn"].weight.abs().max() <= (6 / (64 + 256)) ** 0.5
    assert all(p.abs().sum() == 0 for n, p in layer["attn"].named_parameters() if n.endswith("bias"))


# Budgets for 5 queries × 7 keys: all heads in one block, one head per block (fp32),
# blocks of 2 query rows (2, 2 and a partial 1; fp64 gets these at the one-head budget),
# one row per block.
@pytest.mark.parametrize("block_bytes", [2**30, 5 * 7 * 4, 2 * 7 * 4, 1])
def test_blocked_matches_reference(block_bytes):
    q, k, v = _qkv()
    out = blocked_attention(q, k, v, 8**-0.5, max_block_bytes=block_bytes)
    expected = reference(q, k, v)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(out, (q, k, v)), _grads(expected, (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # fp64 and a head dim of v unlike q's: exact gradients, across query-row blocks too.
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 3, n, 4, generator=g, dtype=torch.float64, requires_grad=True) for n in (5, 7))
    v = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: blocked_attention(*t, 0.3, max_block_bytes=block_bytes), (q, k, v)
    )


def test_blocked_partial_head_groups(monkeypatch):
    # 7 heads of 5 × 7 fp64 scores in groups of 3 (3, 3 and a partial 1).
    monkeypatch.setattr(blocked_module, "GROUP_BYTES", 3 * 5 * 7 * 8)
    assert blocked_module._blocks(7, 5, 7, 8, 2**20) == (3, 5)
    g = torch.Generator().manual_seed(4)
    q, k, v = (
        torch.randn(1, 7, n, 4, generator=g, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7)
    )
    assert torch.autograd.gradcheck(lambda *t: blocked_attention(*t, 0.3), (q, k, v))


def test_blocked_blocks_stay_within_a_budget_below_the_group_size():
    q, k, v = _qkv(batch=4, heads=16, queries=32, keys=64)  # the scores outsize q, k and v
    one_head = 32 * 64  # elements of one head's scores
    with LargestTensor() as spy:
        blocked_attention(q, k, v, 8**-0.5, max_block_bytes=one_head * 4).sum().backward()
    assert spy.largest <= max(one_head, q.numel(), k.numel())  # blocks, or the inputs' own size


def test_blocked_bf16_row_blocks_accumulate_in_fp32():
    # k's and v's gradients summed over 64 one-row blocks: in fp32 they stay as close to
    # exact as the single-block product (which rounds once); summed in bf16 they drift.
    q, k, v = _qkv(torch.bfloat16, queries=64, keys=16, heads=2)
    expected = _grads(reference(q, k, v), (q, k, v))
    errors = {}
    for name, budget in (("one block", 2**30), ("row blocks", 1)):
        grads = _grads(blocked_attention(q, k, v, 8**-0.5, max_block_bytes=budget), (q, k, v))
        errors[name] = [
            ((g.double() - w.double()).abs().max() / w.double().abs().max()).item()
            for g, w in zip(grads, expected)
        ]
    assert all(rows <= 2 * one + 4e-3 for rows, one in zip(errors["row blocks"], errors["one block"])), errors


def test_blocked_backward_inside_autocast_stays_fp32():
    q, k, v = _qkv(queries=6, keys=9)
    out = blocked_attention(q, k, v, 8**-0.5, max_block_bytes=1)  # fp32 row blocks, autocast off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = torch.autograd.grad(reference(q, k, v).sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


def test_auto_under_autocast_takes_mixed_dtypes_and_runs_blocked():
    q, k, v = _qkv(keys=40)
    k16 = k.detach().bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scaled_dot_product_attention(q, k16, v)  # fp32, bf16, fp32: autocast lowers all
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out, blocked_attention(q.bfloat16(), k16, v.bfloat16(), 8**-0.5), rtol=0, atol=0
    )


def test_multihead_attention_in_bf16_runs_blocked_on_transposed_heads():
    torch.manual_seed(0)
    attention = MultiheadAttention(64, 8).bfloat16()  # heads are transposed views of the projections
    flash = MultiheadAttention(64, 8, backend="flash").bfloat16()
    flash.load_state_dict(attention.state_dict())
    query, memory = torch.randn(2, 30, 64).bfloat16(), torch.randn(2, 50, 64).bfloat16()
    torch.testing.assert_close(
        attention(query, memory, memory), flash(query, memory, memory), rtol=0.03, atol=0.03
    )


@pytest.mark.parametrize("queries,keys", [(0, 7), (5, 0)])
def test_blocked_takes_empty_queries_and_keys(queries, keys):
    q, k, v = _qkv(queries=queries, keys=keys)
    out = blocked_attention(q, k, v, 8**-0.5)
    assert out.shape == (2, 3, queries, 8) and not out.any()  # no keys: a sum over nothing
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(g.shape == t.shape for g, t in zip(grads, (q, k, v)))
    # Sums over no rows (no queries) or of no elements (no keys): zeros, not stale memory.
    assert all(not g.any() for g in grads)


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "blocked"])
def test_no_queries_give_empty_output_and_zero_key_gradients(backend):
    q, k, v = _qkv(queries=0)
    out = scaled_dot_product_attention(q, k, v, backend=backend, max_matrix_mib=1e-6)
    assert out.shape == (2, 3, 0, 8)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, (q, k, v)))


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "blocked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nan_query_row_gives_a_nan_output_row(backend, dtype):
    q, k, v = (t.detach() for t in _qkv(dtype=dtype))
    q[1, 2, 3, 0] = float("nan")
    out = scaled_dot_product_attention(q, k, v, backend=backend)
    assert out[1, 2, 3].isnan().all()  # torch's CPU flash kernel alone returns zeros here
    out[1, 2, 3] = 0.0
    assert torch.isfinite(out).all()


def test_blocked_broadcasts_leading_dims():
    q, k, v = _qkv()
    k1, v1 = (t.detach()[:1].requires_grad_(True) for t in (k, v))  # one batch entry for both
    out = blocked_attention(q, k1, v1, 8**-0.5, max_block_bytes=1)
    expected = reference(q, k1.expand_as(k), v1.expand_as(v))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(out, (k1, v1)), _grads(expected, (k1, v1))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bf16_without_mask_runs_blocked_and_stays_close_to_fp64():
    q, k, v = _qkv(torch.bfloat16, keys=300)
    out = scaled_dot_product_attention(q, k, v)  # auto on CPU
    assert out.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # off inside: no fp32 detour
        assert scaled_dot_product_attention(q, k, v, backend="blocked").dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(q, k, v), rtol=0.02, atol=0.02)
    torch.testing.assert_close(out, blocked_attention(q, k, v, 8**-0.5), rtol=0, atol=0)  # the path auto took
    expected = _grads(reference(q, k, v), (q, k, v))
    for got, want in zip(_grads(out, (q, k, v)), expected):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want.double(), rtol=0.05, atol=0.05)


def test_blocked_path_never_materialises_the_matrix():
    q, k, v = _qkv(queries=64, keys=512, heads=2)
    full = 2 * 2 * 64 * 512
    with LargestTensor() as spy:
        out = blocked_attention(q, k, v, 8**-0.5, max_block_bytes=full * 4 // 8)  # an eighth
        out.sum().backward()
    assert spy.largest <= full // 8


def test_blocked_refuses_masks_and_dropout():
    q, k, v = _qkv()
    for kwargs in ({"attn_mask": _bool_mask()}, {"dropout_p": 0.1}):
        with pytest.raises(ValueError, match="'blocked' takes no mask and no dropout"):
            scaled_dot_product_attention(q, k, v, backend="blocked", **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_softmax_and_its_backward_match_out_of_place(dtype):
    # The blocked path runs both in place (ops/blocked_attention.py): valid only while
    # torch's kernels read a whole row before writing it.
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(2, 150, 3000, generator=g) * 4).to(dtype)
    grad = torch.randn(scores.shape, generator=g).to(dtype)
    weights = torch.softmax(scores, -1)
    expected = torch._softmax_backward_data(grad, weights, -1, dtype)
    buffer = scores.clone()
    torch.ops.aten._softmax.out(buffer, -1, False, out=buffer)
    assert torch.equal(buffer, weights)
    torch.ops.aten._softmax_backward_data.out(grad, weights, -1, dtype, grad_input=grad)
    assert torch.equal(grad, expected)
