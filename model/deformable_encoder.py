"""A Deformable DETR encoder over a backbone pyramid, returning the tokens themselves.

Each level is projected to ``dim`` channels (1×1 conv + GroupNorm), optionally a coarser
level is added (``extra_level``: a 3×3 stride-2 conv + GroupNorm on the last map, mmdet's
``ChannelMapper`` with ``num_outs`` = maps + 1), each is flattened, and the
concatenated token sequence is refined by ``MSDeformAttnEncoderLayer`` (the layer of our
Mask2Former pixel decoder) with sine + level positional embeddings. Unlike the pixel
decoder it keeps the flat token sequence and its layout, for decoders that attend to it
(Panoptic SegFormer's location and mask decoders). Inputs are assumed unpadded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from model.msdeform_pixel_decoder import MSDeformAttnEncoderLayer, encoder_reference_points
from model.pixel_decoder import make_norm
from model.position_encoding import PositionEmbeddingSine
from ops.config import OpsConfig


class DeformableEncoder(nn.Module):
    """``forward(features: [B×C_i×H_i×W_i], fine to coarse)`` -> (tokens B×S×C, positions
    B×S×C (sine + level embedding), level shapes coarse to fine, spatial_shapes L×2,
    level_start_index L). Levels are ordered coarse to fine, as in Mask2Former; with
    ``extra_level`` the first is the added stride-2× coarser one."""

    def __init__(self, in_channels: Sequence[int], dim: int, nheads: int, dim_feedforward: int, dropout: float,
                 layers: int, num_points: int, ops: OpsConfig, extra_level: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.input_proj = nn.ModuleList()
        for channels in list(in_channels)[::-1]:
            proj = nn.Sequential(nn.Conv2d(channels, dim, kernel_size=1), make_norm("GN", dim))
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)
        self.extra_proj = None
        if extra_level:
            self.extra_proj = nn.Sequential(
                nn.Conv2d(in_channels[-1], dim, kernel_size=3, stride=2, padding=1), make_norm("GN", dim)
            )
            nn.init.xavier_uniform_(self.extra_proj[0].weight)
            nn.init.zeros_(self.extra_proj[0].bias)
        self.num_levels = len(in_channels) + int(extra_level)
        self.level_embed = nn.Parameter(torch.empty(self.num_levels, dim))
        nn.init.normal_(self.level_embed)
        self.pe_layer = PositionEmbeddingSine(dim // 2, normalize=True)
        self.layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(dim, dim_feedforward, dropout, self.num_levels, nheads, num_points, ops)
            for _ in range(layers)
        )

    def forward(
        self, features: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, list[tuple[int, int]], Tensor, Tensor]:
        coarse_to_fine, projections = list(features)[::-1], list(self.input_proj)
        if self.extra_proj is not None:
            # The projection takes the raw backbone map (ChannelMapper's extra conv does).
            coarse_to_fine.insert(0, coarse_to_fine[0])
            projections.insert(0, self.extra_proj)
        tokens, positions, shapes = [], [], []
        for level, (x, proj) in enumerate(zip(coarse_to_fine, projections)):
            x = proj(x)
            shapes.append((x.shape[-2], x.shape[-1]))
            tokens.append(x.flatten(2).transpose(1, 2))
            positions.append(self.pe_layer(x).flatten(2).transpose(1, 2) + self.level_embed[level])
        src, pos = torch.cat(tokens, 1), torch.cat(positions, 1)
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=src.device)
        sizes = [h * w for h, w in shapes]
        level_start_index = torch.tensor([0, *sizes[:-1]], device=src.device).cumsum(0)
        reference = encoder_reference_points(shapes, src.device)[:, :, None].expand(
            src.shape[0], -1, len(shapes), -1
        )
        for layer in self.layers:
            src = layer(src, pos, reference, spatial_shapes, level_start_index)
        return src, pos, shapes, spatial_shapes, level_start_index
