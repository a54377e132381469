"""A Deformable DETR encoder over a backbone pyramid, returning the tokens themselves, and
Deformable DETR's decoder layer (``DeformableDecoderLayer``).

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
import torch.nn.functional as F
from torch import Tensor, nn

from model.msdeform_pixel_decoder import MSDeformAttnEncoderLayer, encoder_reference_points
from model.pixel_decoder import make_norm
from model.position_encoding import PositionEmbeddingSine
from ops.apex_optional import layer_norm
from ops.attention import MultiheadAttention
from ops.config import OpsConfig
from ops.dropout import Dropout
from ops.ms_deform_attn import MSDeformAttn


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


class DeformableDecoderLayer(nn.Module):
    """Deformable DETR's post-norm decoder layer: query self-attention (the ops entry point),
    deformable cross-attention (``MSDeformAttn``) into the encoded pyramid around each
    query's reference, ReLU FFN. UN-EPT's query decoder and Panoptic SegFormer's location
    decoder. ``forward(tgt: B×Q×C, query_pos: B×Q×C, reference_points: B×Q×L×2 (or ×4
    boxes), memory: B×S×C, spatial_shapes, level_start_index) -> B×Q×C``."""

    def __init__(
        self,
        d_model: int,
        d_ffn: int,
        dropout: float,
        n_levels: int,
        n_heads: int,
        n_points: int,
        ops: OpsConfig,
    ) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(
            d_model,
            n_heads,
            dropout,
            backend=ops.attention_backend,
            max_matrix_mib=ops.attention_max_matrix_mib,
        )
        self.dropout1 = Dropout(dropout)
        self.norm1 = layer_norm(d_model, ops.apex)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, implementation=ops.deform_attn)
        self.dropout2 = Dropout(dropout)
        self.norm2 = layer_norm(d_model, ops.apex)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = Dropout(dropout)
        self.norm3 = layer_norm(d_model, ops.apex)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
    ) -> Tensor:
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt)))
        attended = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index
        )
        tgt = self.norm2(tgt + self.dropout2(attended))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))
