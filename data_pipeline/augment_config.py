"""Typed configuration of ``data.augment``: the MaskFormer/Mask2Former ADE20K training recipe.

Defaults follow MaskFormer's ``maskformer_R50_bs16_160k.yaml`` (detectron2):
``INPUT.MIN_SIZE_TRAIN = [int(x * 0.1 * 512) for x in range(5, 21)]`` (short side 0.5x-2.0x
the crop), ``MAX_SIZE_TRAIN = 2048`` (4x the crop), ``CROP.SINGLE_CATEGORY_MAX_AREA = 1.0``
-> 0.75 in the semantic mapper's ``RandomCrop_CategoryAreaConstraint``, ``RandomFlip``
(p=0.5) and ``ColorAugSSDTransform`` -- equivalently mmseg's ``RandomResize(ratio_range=
(0.5, 2.0))``, ``RandomCrop(cat_max_ratio=0.75)``, ``RandomFlip(0.5)``,
``PhotoMetricDistortion``. See :func:`data_pipeline.transforms.augment_sample`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class AugmentConfig:
    # Random resize: the short side becomes crop_size * U(min_scale, max_scale) (continuous
    # uniform, the mmseg ratio_range form of detectron2's 16 discrete choices 0.5..2.0).
    min_scale: float = 0.5
    max_scale: float = 2.0
    # Cap on the long side after the resize; 0 = 4 * crop_size (2048 at crop 512).
    max_size: int = 0
    # Random crop retries (up to 10) until no single category covers >= this fraction of
    # the labelled (non-ignore) pixels of the crop; 1.0 = plain random crop.
    cat_max_ratio: float = 0.75
    # Random horizontal flip (p=0.5).
    hflip: bool = True
    # Random brightness/contrast/saturation/hue (ColorAugSSDTransform), image only.
    photometric: bool = True

    def validate(self, prefix: str = "data.augment") -> None:
        """Raise ``ValueError`` with a one-line message naming the first bad key."""
        p = prefix
        for key in ("min_scale", "max_scale", "cat_max_ratio"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{p}.{key} must be a number, got {value!r}")
        for key in ("hflip", "photometric"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{p}.{key} must be true or false, got {getattr(self, key)!r}")
        if not (self.min_scale > 0 and self.min_scale <= self.max_scale and math.isfinite(self.max_scale)):
            raise ValueError(
                f"{p}.min_scale must be > 0 and <= max_scale (finite), got {self.min_scale} "
                f"(max_scale {self.max_scale})"
            )
        if isinstance(self.max_size, bool) or not isinstance(self.max_size, int) or self.max_size < 0:
            raise ValueError(
                f"{p}.max_size must be an integer >= 0 (0 = 4 * crop_size), got {self.max_size!r}"
            )
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"{p}.cat_max_ratio must be in (0, 1] (1 = off), got {self.cat_max_ratio}")

    def resolved_max_size(self, crop_size: int) -> int:
        """The long-side cap in pixels: ``max_size``, or ``4 * crop_size`` when it is 0."""
        return self.max_size if self.max_size > 0 else 4 * crop_size
