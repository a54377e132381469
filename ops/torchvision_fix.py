"""Make ``import torchvision`` (and therefore ``import timm``) work on CPU-only torch.

The registry's torchvision wheel is a CUDA build. On a CPU build of torch its compiled
extension ``_C.so`` cannot load, and torchvision's import then dies registering fake
kernels for ``torchvision::nms`` with ``RuntimeError: operator torchvision::nms does not
exist``. Defining the op *schemas* (no kernels) before the first import lets the pure
Python parts import: timm, transforms and the model zoo work; ``torchvision.ops.nms``
and ``torchvision.io`` decoding do not (we decode with PIL). See DESIGN.md section 4.

Every entry point imports this module first (``launcher``, ``data_pipeline``,
``model``, the tests). It does nothing when the extension loads, when torchvision is
not installed, or when torchvision was already imported.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch

# Schemas copied from torchvision/csrc/ops/nms.cpp (the only ops whose Python-side
# registration runs at import time).
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the torch.library.Library alive for the life of the process
applied = False  # True when this module had to define the schemas


def _extension_loads(package_dir: str) -> bool:
    candidates = glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(
        os.path.join(package_dir, "_C*.pyd")
    )
    if not candidates:
        return False
    try:
        torch.ops.load_library(candidates[0])
    except (OSError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> bool:
    """Define the missing op schemas if torchvision's extension can't load.

    Returns True when the workaround was applied.
    """
    global _library, applied
    if applied or "torchvision" in sys.modules:
        return applied
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    if _extension_loads(os.path.dirname(spec.origin)):
        return False
    if hasattr(torch.ops.torchvision, "nms"):  # someone else defined them already
        return False
    _library = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
    for schema in _SCHEMAS.values():
        _library.define(schema)
    applied = True
    return True


ensure_torchvision_importable()
