import ops.torchvision_fix  # noqa: F401  (before timm)

# isort: split
import pytest
import torch

import ops.weight_recast as weight_recast
from model.build import build_model
from ops.weight_recast import recast_saved_weights
from tests.test_maskformer import tiny_cfg


def test_casts_of_parameters_and_their_views_are_replaced_and_restored_exactly():
    weight = torch.nn.Parameter(torch.randn(6, 4))
    cast = weight.to(torch.bfloat16)
    for view in (cast, cast.t(), cast[2:4], cast[:, 1:3].t()):
        saved = weight_recast._pack(view)
        assert isinstance(saved, weight_recast._ParameterCast) and saved.parameter is weight
        restored = weight_recast._unpack(saved)
        assert restored.dtype == torch.bfloat16 and restored.stride() == view.stride()
        assert torch.equal(restored, view)


@pytest.mark.parametrize(
    "make",
    [
        lambda w: w,  # the fp32 parameter itself: nothing to save
        lambda w: (w * 2).to(torch.bfloat16),  # a cast of an activation, not of a parameter
        lambda w: w.detach().to(torch.bfloat16),  # no autograd history
    ],
)
def test_other_tensors_are_saved_as_they_are(make):
    tensor = make(torch.nn.Parameter(torch.randn(6, 4)))
    assert weight_recast._pack(tensor) is tensor


def test_bf16_training_gradients_are_bitwise_the_same(monkeypatch):
    """A tiny MaskFormer under bf16 autocast: every linear and conv weight is recast in
    backward rather than saved, and no gradient changes by a bit."""
    recast = set()
    original = weight_recast._pack

    def spy(tensor):
        saved = original(tensor)
        if isinstance(saved, weight_recast._ParameterCast):
            recast.add(id(saved.parameter))
        return saved

    monkeypatch.setattr(weight_recast, "_pack", spy)
    torch.manual_seed(0)
    model = build_model(tiny_cfg(dropout=0.0)).eval()  # eval: no drop path, same forward twice
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    grads = {}
    saved_casts = set()  # parameters whose bf16 copies autograd saves without recasting

    def record(tensor):
        source = weight_recast.parameter_cast_source(tensor)
        if source is not None:
            saved_casts.add(id(source))
        return tensor

    for enabled in (False, True):
        model.zero_grad(set_to_none=True)
        hooks = torch.autograd.graph.saved_tensors_hooks(record, lambda t: t)
        with hooks if not enabled else recast_saved_weights(), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model(pixels)
        (
            outputs["pred_masks"].float().square().mean()
            + outputs["pred_logits"].float().logsumexp(-1).mean()
        ).backward()
        grads[enabled] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    # Every such copy is recast instead; that is all the linear and conv weights but the
    # first decoder layer's value projection, whose input (the zero queries) needs no
    # gradient, so autograd does not save its weight at all.
    assert recast == saved_casts
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert saved_casts <= matrices and len(saved_casts) == len(matrices) - 1
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        assert torch.equal(grads[True][name], grad), name
