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


def _segment_modules():
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.GroupNorm(2, 4)


@pytest.mark.parametrize("inputs_require_grad", [True, False])
def test_per_sample_checkpointing_rebuilds_one_sample_at_a_time(inputs_require_grad):
    conv, norm = _segment_modules()
    params = [*conv.parameters(), *norm.parameters()]
    seen = []

    def segment(x, scale, shift):
        seen.append((tuple(x.shape), torch.is_grad_enabled()))
        return torch.relu(norm(conv(x) * scale) + shift)

    x = torch.randn(3, 3, 5, 5, requires_grad=inputs_require_grad)
    shift = torch.randn(3, 4, 5, 5, requires_grad=inputs_require_grad)
    weights = torch.randn(3, 4, 5, 5)
    results = []
    for per_sample in (False, True):
        accumulated = []  # one gradient accumulation per parameter and step (DeepSpeed ZeRO's hook)
        hooks = [p.register_post_accumulate_grad_hook(accumulated.append) for p in params]
        out = checkpointed_per_sample(per_sample, segment, x, 2.0, shift, parameters=params)
        (out * weights).sum().backward()
        for hook in hooks:
            hook.remove()
        assert len(accumulated) == len(params)
        results.append((out.detach(), x.grad, shift.grad, *(p.grad for p in params)))
        x.grad = shift.grad = None
        for p in params:
            p.grad = None
    # The whole batch in forward without a graph, then each sample rebuilt with one.
    assert seen == [((3, 3, 5, 5), True), ((3, 3, 5, 5), False)] + [((1, 3, 5, 5), True)] * 3
    for plain, per_sample in zip(*results):
        if plain is None:
            assert per_sample is None and not inputs_require_grad
        else:
            torch.testing.assert_close(per_sample, plain)


def test_per_sample_checkpointing_rebuilds_under_the_forward_autocast():
    conv, norm = _segment_modules()
    dtypes = []

    def segment(x):
        out = conv(x)
        dtypes.append(out.dtype)
        return norm(out)

    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = checkpointed_per_sample(True, segment, x, parameters=[*conv.parameters(), *norm.parameters()])
    out.float().sum().backward()  # outside autocast, as a training step's backward
    assert dtypes == [torch.bfloat16] * 3 and x.grad is not None and conv.weight.grad is not None


def test_per_sample_checkpointing_needs_batch_first_tensors():
    layer = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"batch sizes \[\(2,\), \(3,\)\]"):
        checkpointed_per_sample(True, lambda a, b: layer(a) + b.sum(), torch.randn(2, 4, requires_grad=True),
                                torch.randn(3, 3), parameters=list(layer.parameters()))


def test_zero3_partitioned_parameters_are_checkpointed_whole(monkeypatch):
    calls = spy_checkpoint_calls(monkeypatch)
    conv, norm = _segment_modules()
    conv.weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks the parameters it partitions
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    checkpointed_per_sample(True, lambda t: norm(conv(t)), x, parameters=[*conv.parameters(), *norm.parameters()])
    assert calls == [True]
