import torch

from ops.recompute import checkpointed


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
