"""A Deformable DETR encoder over a backbone pyramid, returning the tokens themselves.

Each level is projected to ``dim`` channels (1×1 conv + GroupNorm), flattened, and the
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
    level_start_index L). Levels are ordered coarse to fine, as in Mask2Former."""

    def __init__(self, in_channels: Sequence[int], dim: int, nheads: int, dim_feedforward: int, dropout: float,
                 layers: int, num_points: int, ops: OpsConfig) -> None:  # fmt: skip
        super().__init__()
        self.input_proj = nn.ModuleList()
        for channels in list(in_channels)[::-1]:
            proj = nn.Sequential(nn.Conv2d(channels, dim, kernel_size=1), make_norm("GN", dim))
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)
        self.level_embed = nn.Parameter(torch.empty(len(in_channels), dim))
        nn.init.normal_(self.level_embed)
        self.pe_layer = PositionEmbeddingSine(dim // 2, normalize=True)
        self.layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(dim, dim_feedforward, dropout, len(in_channels), nheads, num_points, ops)
            for _ in range(layers)
        )

    def forward(
        self, features: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, list[tuple[int, int]], Tensor, Tensor]:
        tokens, positions, shapes = [], [], []
        for level, (x, proj) in enumerate(zip(list(features)[::-1], self.input_proj)):
            shapes.append((x.shape[-2], x.shape[-1]))
            tokens.append(proj(x).flatten(2).transpose(1, 2))
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
