"""MaskFormer's light-weight FPN pixel decoder (``BasePixelDecoder`` in the official code).

Top-down over the backbone pyramid: the coarsest map goes through a 3×3 conv; every finer
map gets a 1×1 lateral conv, the coarser result is added after nearest upsampling (as in
FPN), and a 3×3 conv smooths the sum. A last 3×3 conv at the finest stride (4) gives the
per-pixel embeddings ``mask_features`` that the mask embeddings are dotted with.

MaskFormer feeds the *backbone's* stride-32 map (res5, not an FPN level) to the
transformer decoder, so ``forward`` returns that map unchanged next to ``mask_features``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from model.config import PixelDecoderConfig


def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2's "XavierFill" (detectron2's init for FPN convs): kaiming-uniform with a=1, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def make_norm(norm: str, channels: int) -> nn.Module:
    """``"GN"``: GroupNorm with 32 groups, or the largest divisor of ``channels`` below
    32 for narrow test configs; ``""``: identity."""
    if norm == "":
        return nn.Identity()
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"model.pixel_decoder.norm={norm!r}: supported values are 'GN' and ''")


class ConvNormAct(nn.Sequential):
    """detectron2's ``Conv2d(..., norm=, activation=)``: conv -> norm -> optional ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: str, relu: bool) -> None:
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=norm == ""  # norm has its own bias
        )
        c2_xavier_fill(conv)
        layers: list[nn.Module] = [conv, make_norm(norm, out_channels)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class BasePixelDecoder(nn.Module):
    """``forward(features) -> (mask_features: B×mask_dim×H/s0×W/s0, features[-1])``.

    ``in_channels`` lists the backbone's channels from the finest to the coarsest map.
    """

    def __init__(self, in_channels: Sequence[int], conv_dim: int = 256, mask_dim: int = 256, norm: str = "GN") -> None:
        super().__init__()
        if len(in_channels) < 1:
            raise ValueError("BasePixelDecoder needs at least one feature map")
        # Stored coarse-to-fine, the order the top-down pass visits them. The coarsest level
        # has no lateral conv: its 3×3 output conv reads the backbone map directly.
        coarse_to_fine = list(in_channels)[::-1]
        self.output_convs = nn.ModuleList()
        self.lateral_convs = nn.ModuleList()
        for idx, channels in enumerate(coarse_to_fine):
            if idx == 0:
                self.lateral_convs.append(nn.Identity())
                self.output_convs.append(ConvNormAct(channels, conv_dim, 3, norm, relu=True))
            else:
                self.lateral_convs.append(ConvNormAct(channels, conv_dim, 1, norm, relu=False))
                self.output_convs.append(ConvNormAct(conv_dim, conv_dim, 3, norm, relu=True))
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1)
        c2_xavier_fill(self.mask_features)
        self.mask_dim = mask_dim

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        coarse_to_fine = list(features)[::-1]
        y = self.output_convs[0](coarse_to_fine[0])
        for x, lateral_conv, output_conv in zip(coarse_to_fine[1:], self.lateral_convs[1:], self.output_convs[1:]):
            lateral = lateral_conv(x)
            # Nearest upsampling as in FPN; ``size=`` (not scale 2) copes with odd sizes.
            y = output_conv(lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest"))
        return self.mask_features(y), features[-1]


def build_pixel_decoder(cfg: PixelDecoderConfig, in_channels: Sequence[int]) -> BasePixelDecoder:
    return BasePixelDecoder(in_channels, conv_dim=cfg.conv_dim, mask_dim=cfg.mask_dim, norm=cfg.norm)
