"""MaskFormer's light-weight FPN pixel decoder (``BasePixelDecoder`` in the official code).

Top-down over the backbone pyramid: the coarsest map goes through a 3×3 conv; every finer
map gets a 1×1 lateral conv, the coarser result is added after nearest upsampling (as in
FPN), and a 3×3 conv smooths the sum. A last 3×3 conv at the finest stride (4) gives the
per-pixel embeddings ``mask_features`` that the mask embeddings are dotted with.

Every pixel decoder returns a ``PixelDecoderOutput``: ``mask_features`` (stride 4),
``multi_scale_features`` (one ``conv_dim`` map per stride, finest first: what PFT's
per-scale decoders attend to) and ``transformer_feature`` (what MaskFormer's DETR decoder
attends to). MaskFormer feeds the *backbone's* stride-32 map (res5, not an FPN level) to
its transformer decoder, so the FPN passes that map through unchanged.
``build_pixel_decoder`` picks the FPN or the deformable-attention decoder
(``msdeform_pixel_decoder.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor, nn

from model.config import PixelDecoderConfig
from ops.config import OpsConfig
from ops.recompute import checkpointed_per_sample
from ops.upsample import add_nearest_upsampled
from ops.winograd_conv import Conv3x3

SUPPORTED_PIXEL_DECODERS = ("fpn", "msdeformattn")


class PixelDecoderOutput(NamedTuple):
    """What every pixel decoder returns (a NamedTuple, not a dataclass: DeepSpeed ZeRO-3
    finds the tensors of tuples, lists and dicts a module returns to hook its backward
    pass, and warns about any other type).

    ``mask_features``: B×mask_dim×H/4×W/4, the per-pixel embeddings mask embeddings are
    dotted with. ``multi_scale_features``: one B×conv_dim map per backbone level, finest
    first (strides 4/8/16/32 for the usual backbones). ``transformer_feature``: the
    coarsest map MaskFormer's transformer decoder attends to; its channel count is the
    decoder module's ``transformer_channels``.
    """

    mask_features: Tensor
    multi_scale_features: list[Tensor]
    transformer_feature: Tensor


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
    """detectron2's ``Conv2d(..., norm=, activation=)``: conv -> norm -> optional ReLU.
    3×3 convs are ``Conv3x3`` (``conv3x3`` names its algorithm: ``model.ops.conv3x3``)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, norm: str, relu: bool, conv3x3: str = "auto"
    ) -> None:
        bias = norm == ""  # norm has its own bias
        if kernel_size == 3:
            conv: nn.Conv2d = Conv3x3(in_channels, out_channels, bias=bias, algorithm=conv3x3)
        else:
            conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        c2_xavier_fill(conv)
        layers: list[nn.Module] = [conv, make_norm(norm, out_channels)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class BasePixelDecoder(nn.Module):
    """``forward(features) -> PixelDecoderOutput`` with ``mask_features``: B×mask_dim×H/s0×W/s0,
    ``multi_scale_features``: the top-down path's output at every level (finest first,
    ``conv_dim`` channels; the finest is the map before the ``mask_features`` conv) and
    ``transformer_feature``: the backbone's coarsest map, unchanged.

    ``in_channels`` lists the backbone's channels from the finest to the coarsest map.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        norm: str = "GN",
        conv3x3: str = "auto",
        grad_checkpointing: bool = False,
    ) -> None:
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
                self.output_convs.append(ConvNormAct(channels, conv_dim, 3, norm, relu=True, conv3x3=conv3x3))
            else:
                self.lateral_convs.append(ConvNormAct(channels, conv_dim, 1, norm, relu=False))
                self.output_convs.append(ConvNormAct(conv_dim, conv_dim, 3, norm, relu=True, conv3x3=conv3x3))
        self.mask_features = Conv3x3(conv_dim, mask_dim, algorithm=conv3x3)
        c2_xavier_fill(self.mask_features)
        self.mask_dim = mask_dim
        self.conv_dim = conv_dim
        self.transformer_channels = in_channels[-1]
        self.grad_checkpointing = grad_checkpointing

    def _top_down_step(self, level: int, x: Tensor, coarser: Tensor) -> Tensor:
        """Level ``level`` (coarse-to-fine index >= 1) of the top-down path."""
        lateral = self.lateral_convs[level](x)
        # Nearest upsampling as in FPN, to the lateral's size (odd sizes included).
        return self.output_convs[level](add_nearest_upsampled(lateral, coarser))

    def forward(self, features: Sequence[Tensor]) -> PixelDecoderOutput:
        coarse_to_fine = list(features)[::-1]
        # The coarsest level stays outside checkpointing: its map is the smallest.
        y = self.output_convs[0](coarse_to_fine[0])
        outputs = [y]
        for level, x in enumerate(coarse_to_fine[1:], start=1):
            # One image at a time in backward: GroupNorm normalises each image alone.
            parameters = [*self.lateral_convs[level].parameters(), *self.output_convs[level].parameters()]
            y = checkpointed_per_sample(self.grad_checkpointing, self._top_down_step, level, x, y,
                                        parameters=parameters)
            outputs.append(y)
        return PixelDecoderOutput(self.mask_features(y), outputs[::-1], features[-1])


def build_pixel_decoder(
    cfg: PixelDecoderConfig, in_channels: Sequence[int], ops: OpsConfig | None = None
) -> nn.Module:
    """The pixel decoder named by ``cfg.name``; it has ``mask_dim``, ``conv_dim`` and
    ``transformer_channels`` attributes and returns a ``PixelDecoderOutput``."""
    ops = ops or OpsConfig()
    if cfg.name == "fpn":
        return BasePixelDecoder(
            in_channels,
            conv_dim=cfg.conv_dim,
            mask_dim=cfg.mask_dim,
            norm=cfg.norm,
            conv3x3=ops.conv3x3,
            grad_checkpointing=cfg.grad_checkpointing,
        )
    if cfg.name == "msdeformattn":
        # Imported here: msdeform_pixel_decoder reuses this file's conv blocks and output type.
        from model.msdeform_pixel_decoder import MSDeformAttnPixelDecoder

        return MSDeformAttnPixelDecoder(
            in_channels,
            conv_dim=cfg.conv_dim,
            mask_dim=cfg.mask_dim,
            norm=cfg.norm,
            encoder_layers=cfg.encoder_layers,
            encoder_nheads=cfg.encoder_nheads,
            encoder_dim_feedforward=cfg.encoder_dim_feedforward,
            encoder_dropout=cfg.encoder_dropout,
            encoder_num_points=cfg.encoder_num_points,
            ops=ops,
            grad_checkpointing=cfg.grad_checkpointing,
        )
    supported = ", ".join(SUPPORTED_PIXEL_DECODERS)
    raise ValueError(f"model.pixel_decoder.name={cfg.name!r} is not supported; supported values: {supported}")
