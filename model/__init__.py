"""Segmentation models (MaskFormer): backbones, pixel decoders, decoders, matcher, criterion.

``from model import build_model, build_criterion`` works, but lazily: importing the
package (e.g. ``model.config`` from the launcher's CLI) must not pay for importing timm.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_criterion", "build_model", "semantic_segmentation"]


def __getattr__(name: str) -> Any:  # PEP 562: resolved on first use
    if name in ("build_model", "build_criterion"):
        from model import build

        return getattr(build, name)
    if name == "semantic_segmentation":
        from model.inference import semantic_segmentation

        return semantic_segmentation
    raise AttributeError(f"module 'model' has no attribute {name!r}")
