"""NVIDIA apex's fused LayerNorm and Adam when they can run, torch's otherwise.

NVIDIA apex is not on any package registry (PyPI's ``apex`` is an unrelated web toolkit),
so it is never a dependency: a GPU image that built it from source gets its fused
kernels; every other machine gets ``nn.LayerNorm`` and ``torch.optim.AdamW`` with torch's fused
kernel (CUDA and, since torch 2.4, CPU: one pass over each parameter instead of the
for-loop's or foreach path's eight; 18 vs 78/84 ms per step for MaskFormer Swin-T's 42M
parameters on the 2-core CPU machine). The choice is made once per process and logged by
the caller.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterable
from functools import cache
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices


@cache
def _import_apex_part(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def apex_usable(mode: str = "auto") -> bool:
    """True when apex's fused parts should be used: mode "auto", CUDA available and
    NVIDIA apex importable (its ``normalization`` and ``optimizers`` packages and the
    CUDA extensions they load)."""
    if mode not in ("auto", "off"):
        raise ValueError(f"model.ops.apex must be 'auto' or 'off', got {mode!r}")
    if mode == "off" or not torch.cuda.is_available():
        return False
    if _import_apex_part("apex.normalization") is None or _import_apex_part("apex.optimizers") is None:
        return False
    # A Python-only build of apex imports both packages but lacks the compiled parts they
    # load on use: FusedLayerNorm would fail at its first forward, FusedAdam when built.
    missing = [name for name in _APEX_EXTENSIONS if _import_apex_part(name) is None]
    if missing:
        _warn_once(f"segscale: NVIDIA apex has no CUDA extensions here ({', '.join(missing)} missing); "
                   "using torch's LayerNorm and AdamW")
        return False
    return True


# apex's compiled extensions behind FusedLayerNorm and FusedAdam.
_APEX_EXTENSIONS = ("fused_layer_norm_cuda", "amp_C")


@cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def layer_norm(dim: int, mode: str = "auto", eps: float = 1e-5) -> nn.Module:
    """A LayerNorm over the last dimension: apex ``FusedLayerNorm`` or ``nn.LayerNorm``
    (same parameters ``weight``/``bias``, so checkpoints move between them)."""
    if apex_usable(mode):
        normalization = _import_apex_part("apex.normalization")
        return normalization.FusedLayerNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps)


def _first_parameter(params: list[Any]) -> torch.Tensor | None:
    for item in params:
        if isinstance(item, dict):
            found = _first_parameter(list(item["params"]))
            if found is not None:
                return found
        elif isinstance(item, torch.Tensor):
            return item
    return None


def adamw_choice(mode: str, device_type: str) -> str:
    """Which AdamW runs for parameters on ``device_type``: "apex" (FusedAdam, CUDA only),
    "fused" (torch's fused kernel, CUDA and CPU) or "foreach" (torch's multi-tensor path,
    for devices torch has no fused kernel for)."""
    if device_type == "cuda":
        return "apex" if apex_usable(mode) else "fused"
    # torch's own list of devices its fused optimizer kernels run on.
    return "fused" if device_type in _get_fused_kernels_supported_devices() else "foreach"


def adamw(params: Iterable[Any], mode: str = "auto", **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) over ``params`` (tensors or param-group dicts), as
    ``adamw_choice`` picks for the device of the first parameter."""
    params = list(params)
    first = _first_parameter(params)
    choice = adamw_choice(mode, first.device.type if first is not None else "cpu")
    if choice == "apex":
        optimizers = _import_apex_part("apex.optimizers")
        return optimizers.FusedAdam(params, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(params, **{choice: True}, **kwargs)
