import pytest
import torch

from ops.recompute import checkpointed, checkpointed_per_sample


def spy_checkpoint_calls(monkeypatch) -> list:
    """Records ``use_reentrant`` of every torch checkpoint call from here on."""
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint,
        "checkpoint",
        lambda fn, *a, **kw: calls.append(kw.get("use_reentrant")) or original(fn, *a, **kw),
    )
    return calls


def test_checkpoints_reentrantly_and_keeps_gradients(monkeypatch):
    calls = spy_checkpoint_calls(monkeypatch)
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)
    checkpointed(True, layer, x).square().sum().backward()
    recomputed = (x.grad.clone(), layer.weight.grad.clone())
    x.grad = layer.weight.grad = None
    checkpointed(False, layer, x).square().sum().backward()
    assert calls == [True]
    torch.testing.assert_close(recomputed, (x.grad, layer.weight.grad))


def test_runs_plainly_when_no_input_requires_grad_or_autograd_is_off(monkeypatch):
    """Reentrant checkpointing would give a segment fed only by frozen inputs no parameter
    gradients; and there is nothing to save under no_grad."""
    calls = spy_checkpoint_calls(monkeypatch)
    layer = torch.nn.Linear(4, 3)
    checkpointed(True, layer, torch.randn(2, 4)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        checkpointed(True, layer, torch.randn(2, 4, requires_grad=True))
    assert calls == []


def test_per_sample_checkpointing_rebuilds_one_sample_at_a_time(monkeypatch):
    calls = spy_checkpoint_calls(monkeypatch)
    torch.manual_seed(0)
    conv, norm = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.GroupNorm(2, 4)
    seen = []

    def segment(x, scale, shift):
        seen.append(tuple(x.shape))
        return norm(conv(x) * scale) + shift

    x = torch.randn(3, 3, 5, 5, requires_grad=True)
    shift = torch.randn(3, 4, 5, 5, requires_grad=True)
    weights = torch.randn(3, 4, 5, 5)
    results = []
    for per_sample in (False, True):
        out = (checkpointed_per_sample if per_sample else checkpointed)(per_sample, segment, x, 2.0, shift)
        (out * weights).sum().backward()
        results.append((out.detach(), x.grad, shift.grad, conv.weight.grad, norm.weight.grad))
        x.grad = shift.grad = None
        conv.zero_grad(set_to_none=True)
        norm.zero_grad(set_to_none=True)
    assert calls == [True] * 3
    # Forward once per sample, and backward rebuilds each sample alone.
    assert seen == [(3, 3, 5, 5)] + [(1, 3, 5, 5)] * 6
    for plain, per_sample in zip(*results):
        torch.testing.assert_close(per_sample, plain)


def test_per_sample_checkpointing_needs_batch_first_tensors():
    layer = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"batch sizes \[\(2,\), \(3,\)\]"):
        checkpointed_per_sample(True, lambda a, b: layer(a) + b.sum(), torch.randn(2, 4, requires_grad=True),
                                torch.randn(3, 3))
    # Off, or one sample: plain checkpointing rules (no split).
    out = checkpointed_per_sample(False, layer, torch.randn(2, 4, requires_grad=True))
    assert out.shape == (2, 3)
