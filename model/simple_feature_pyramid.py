"""ViTDet's simple feature pyramid: strides 4/8/16/32 from a plain ViT's one stride-16 map.

Plain ViTs (ViT-L, DeiT-B) keep one resolution through all their blocks, but the pixel
decoders need a pyramid. ViTDet (Li et al. 2022, ``SimpleFeaturePyramid`` in detectron2)
builds it from the last block's map alone, with no top-down or lateral connections:

- x4: ConvTranspose(2, stride 2) C -> C/2, LayerNorm, GELU, ConvTranspose C/2 -> C/4
- x2: ConvTranspose(2, stride 2) C -> C/2
- x1: the map itself
- x1/2: MaxPool(2, stride 2)

and each then goes through a 1x1 and a 3x3 conv to ``out_channels``, each followed by a
channel LayerNorm (bias-free convs, as the norm has a bias).
"""

from __future__ import annotations

import ops.torchvision_fix  # noqa: F401  (must run before timm imports torchvision)

# isort: split
from timm.layers import LayerNorm2d
from torch import Tensor, nn

# Scale factors relative to the input map (ViTDet's choice for a stride-16 input).
SCALES = (4.0, 2.0, 1.0, 0.5)


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    # detectron2's c2_msra_fill, the init ViTDet uses for these convs.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, LayerNorm2d(out_channels))


def _resample(scale: float, channels: int) -> tuple[list[nn.Module], int]:
    """The layers that change the resolution by ``scale``, and their output channels."""
    if scale == 4.0:
        half = channels // 2
        layers = [
            nn.ConvTranspose2d(channels, half, kernel_size=2, stride=2),
            LayerNorm2d(half),
            nn.GELU(),
            nn.ConvTranspose2d(half, channels // 4, kernel_size=2, stride=2),
        ]
        return layers, channels // 4
    if scale == 2.0:
        return [nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2)], channels // 2
    if scale == 1.0:
        return [], channels
    if scale == 0.5:
        return [nn.MaxPool2d(kernel_size=2, stride=2)], channels
    raise ValueError(f"SimpleFeaturePyramid: unsupported scale {scale} (supported: {SCALES})")


class SimpleFeaturePyramid(nn.Module):
    """``forward(x: B×C×h×w at stride s) -> [B×out×4h×4w, B×out×2h×2w, B×out×h×w, B×out×h/2×w/2]``.

    ``channels``/``strides`` describe the outputs, like ``Backbone``'s (s/4, s/2, s, 2s).
    ``h`` and ``w`` must be even for the x1/2 level to cover the map exactly; the
    backbone pads its input so that they are.
    """

    def __init__(self, in_channels: int, out_channels: int, in_stride: int = 16) -> None:
        super().__init__()
        if out_channels < 1:
            raise ValueError(f"model.backbone.pyramid_channels must be >= 1, got {out_channels}")
        if in_channels % 4:
            raise ValueError(f"SimpleFeaturePyramid: input channels must be a multiple of 4, got {in_channels}")
        self.levels = nn.ModuleList()
        for scale in SCALES:
            layers, channels = _resample(scale, in_channels)
            layers += [_conv_norm(channels, out_channels, 1), _conv_norm(out_channels, out_channels, 3)]
            self.levels.append(nn.Sequential(*layers))
        self.channels = [out_channels] * len(SCALES)
        self.strides = [int(in_stride / scale) for scale in SCALES]

    def forward(self, x: Tensor) -> list[Tensor]:
        return [level(x) for level in self.levels]
