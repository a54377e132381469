"""ops.apex_optional: apex's fused parts only with CUDA and an importable apex; torch's
otherwise, and nothing breaks without apex (this machine has neither)."""

import sys
import types

import pytest
import torch
from torch import nn

from launcher.config import TrainConfig
from launcher.optim import build_optimizer
from ops import apex_optional
from ops.apex_optional import adamw, adamw_choice, apex_usable, layer_norm


class FakeFusedLayerNorm(nn.LayerNorm):
    pass


@pytest.fixture
def fake_apex(monkeypatch):
    """An importable stand-in for NVIDIA apex (which no registry serves) on a 'CUDA' machine."""
    apex = types.ModuleType("apex")
    normalization = types.ModuleType("apex.normalization")
    normalization.FusedLayerNorm = FakeFusedLayerNorm
    optimizers = types.ModuleType("apex.optimizers")
    optimizers.FusedAdam = lambda params, adam_w_mode, **kw: ("FusedAdam", adam_w_mode, kw)
    for name, module in (
        ("apex", apex),
        ("apex.normalization", normalization),
        ("apex.optimizers", optimizers),
        ("fused_layer_norm_cuda", types.ModuleType("fused_layer_norm_cuda")),
        ("amp_C", types.ModuleType("amp_C")),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    apex_optional._import_apex_part.cache_clear()
    yield
    apex_optional._import_apex_part.cache_clear()


@pytest.fixture(autouse=True)
def fresh_import_cache():
    apex_optional._import_apex_part.cache_clear()
    yield
    apex_optional._import_apex_part.cache_clear()


def test_without_apex_torch_parts_are_used():
    assert not apex_usable("auto")
    assert type(layer_norm(8)) is nn.LayerNorm
    model = nn.Linear(4, 4)
    optimizer = adamw(model.parameters(), lr=1e-3)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True  # torch's fused kernel on CPU too
    assert adamw_choice("auto", "cuda") == "fused"  # torch's fused kernel on a GPU without apex
    assert adamw_choice("auto", "meta") == "foreach"  # no fused kernel in torch for this device


def test_apex_on_cuda_is_chosen(fake_apex):
    assert apex_usable("auto")
    norm = layer_norm(8, eps=1e-6)
    assert type(norm) is FakeFusedLayerNorm and norm.eps == 1e-6
    assert adamw_choice("auto", "cuda") == "apex"
    assert adamw_choice("auto", "cpu") == "fused"  # CPU parameters never go to apex


def test_apex_off_or_without_cuda_is_not_chosen(fake_apex, monkeypatch):
    assert not apex_usable("off") and type(layer_norm(8, "off")) is nn.LayerNorm
    assert adamw_choice("off", "cuda") == "fused"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not apex_usable("auto")


def test_broken_apex_install_falls_back(monkeypatch):
    # The unrelated PyPI "apex" has no normalization/optimizers packages: torch's parts
    # are used (an apex without its CUDA extensions: the test above).
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not apex_usable("auto")


@pytest.mark.parametrize("extension", ["fused_layer_norm_cuda", "amp_C"])
def test_apex_without_its_cuda_extensions_falls_back(fake_apex, monkeypatch, extension):
    # A Python-only apex build imports apex.normalization and apex.optimizers, but
    # FusedLayerNorm fails at its first forward and FusedAdam when built.
    monkeypatch.setitem(sys.modules, extension, None)  # import raises ImportError
    apex_optional._warn_once.cache_clear()
    with pytest.warns(UserWarning, match=f"apex has no CUDA extensions here \\({extension} missing\\)"):
        assert not apex_usable("auto")
    assert type(layer_norm(8)) is nn.LayerNorm
    assert adamw_choice("auto", "cuda") == "fused"


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="model.ops.apex must be 'auto' or 'off'"):
        apex_usable("on")


def test_build_optimizer_keeps_param_groups_with_torch_adamw():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = build_optimizer(model, TrainConfig())
    assert type(optimizer) is torch.optim.AdamW
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, TrainConfig().weight_decay}
