"""Mask2Former's multi-scale deformable-attention pixel decoder (``MSDeformAttnPixelDecoder``).

The backbone maps at strides 8/16/32 are projected to ``conv_dim`` (1×1 conv + GroupNorm),
flattened into one token sequence and refined by a Deformable DETR encoder: each token
attends to a few sampled points on every level around its own position, so information
flows across scales at a cost linear in the number of tokens. An FPN step then adds the
stride-4 backbone map to the upsampled stride-8 encoder output, and a 1×1 conv gives the
``mask_features``.

Differences to the official code: it runs the encoder in fp32 with autocast disabled
(its CUDA kernel had no half-precision path); here the pure-torch attention works under
bf16 autocast, with sampling locations and attention weights kept in fp32. Inputs are
assumed unpadded (no padding mask, valid ratios 1), as in Mask2Former's training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.pixel_decoder import ConvNormAct, PixelDecoderOutput, c2_xavier_fill, make_norm
from model.position_encoding import PositionEmbeddingSine
from ops.apex_optional import layer_norm
from ops.config import OpsConfig
from ops.dropout import Dropout
from ops.ms_deform_attn import MSDeformAttn
from ops.recompute import checkpointed, checkpointed_per_sample


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then a ReLU FFN."""

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
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, implementation=ops.deform_attn)
        self.dropout1 = Dropout(dropout)
        self.norm1 = layer_norm(d_model, ops.apex)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = Dropout(dropout)
        self.norm2 = layer_norm(d_model, ops.apex)
        # Mask2Former xavier-initialises every matrix of the encoder (biases keep torch's
        # default); MSDeformAttn re-applies its own scheme afterwards.
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
    ) -> Tensor:
        # Position (and level) embeddings go into the query only; values are the bare tokens.
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


def encoder_reference_points(shapes: Sequence[tuple[int, int]], device: torch.device) -> Tensor:
    """1×S×2: the (x, y) centre of every token, normalised to [0, 1] of its level."""
    points = []
    for height, width in shapes:
        ys, xs = torch.meshgrid(
            torch.linspace(0.5, height - 0.5, height, dtype=torch.float32, device=device) / height,
            torch.linspace(0.5, width - 0.5, width, dtype=torch.float32, device=device) / width,
            indexing="ij",
        )
        points.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), -1))
    return torch.cat(points, 0)[None]


class MSDeformAttnPixelDecoder(nn.Module):
    """``forward(features: [B×C_i×H/s_i×W/s_i], finest first) -> PixelDecoderOutput``.

    The encoder runs on every level but the finest (strides 8/16/32 for the usual
    backbones); the finest (stride 4) joins through one FPN step. Outputs:
    ``mask_features`` B×mask_dim at the finest stride; ``multi_scale_features`` the FPN
    output followed by the encoder outputs, finest first, all ``conv_dim`` channels;
    ``transformer_feature`` the encoder's coarsest (stride-32) output.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        norm: str = "GN",
        encoder_layers: int = 6,
        encoder_nheads: int = 8,
        encoder_dim_feedforward: int = 1024,
        encoder_dropout: float = 0.0,
        encoder_num_points: int = 4,
        ops: OpsConfig | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        ops = ops or OpsConfig()
        if len(in_channels) < 2:
            raise ValueError(
                f"model.backbone.out_indices: the msdeformattn pixel decoder needs at least 2 feature maps "
                f"(strides 4/8/16/32), got {len(in_channels)}"
            )
        if conv_dim % 4:
            # The sine encoding splits the channels into y and x halves of sin/cos pairs.
            raise ValueError(f"model.pixel_decoder.conv_dim must be a multiple of 4, got {conv_dim}")
        if encoder_nheads < 1 or conv_dim % encoder_nheads:
            raise ValueError(
                f"model.pixel_decoder.encoder_nheads={encoder_nheads} must divide "
                f"model.pixel_decoder.conv_dim={conv_dim}"
            )
        for key, value in (("encoder_layers", encoder_layers), ("encoder_num_points", encoder_num_points)):
            if value < 1:
                raise ValueError(f"model.pixel_decoder.{key} must be >= 1, got {value}")
        self.mask_dim = mask_dim
        self.conv_dim = conv_dim
        self.transformer_channels = conv_dim
        self.num_levels = len(in_channels) - 1

        # Encoder levels are ordered coarse to fine, as in Mask2Former (level 0 = stride 32).
        self.input_proj = nn.ModuleList()
        for channels in list(in_channels[1:])[::-1]:
            proj = nn.Sequential(nn.Conv2d(channels, conv_dim, kernel_size=1), make_norm("GN", conv_dim))
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)
        # Tells the encoder which level a token comes from; the sine encoding alone is
        # identical on every level (it is normalised to the map size).
        self.level_embed = nn.Parameter(torch.empty(self.num_levels, conv_dim))
        nn.init.normal_(self.level_embed)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.encoder = nn.ModuleList(
            MSDeformAttnEncoderLayer(
                conv_dim,
                encoder_dim_feedforward,
                encoder_dropout,
                self.num_levels,
                encoder_nheads,
                encoder_num_points,
                ops,
            )
            for _ in range(encoder_layers)
        )

        self.lateral_conv = ConvNormAct(in_channels[0], conv_dim, 1, norm, relu=False)
        self.output_conv = ConvNormAct(conv_dim, conv_dim, 3, norm, relu=True, conv3x3=ops.conv3x3)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)
        self.grad_checkpointing = grad_checkpointing

    def _fpn_step(self, finest_input: Tensor, encoded_finest: Tensor) -> Tensor:
        """The stride-4 output: lateral conv of the backbone's finest map + the encoder's
        finest level upsampled, through the 3×3 output conv."""
        lateral = self.lateral_conv(finest_input)
        # Bilinear, as the official code (its comment says nearest, its call is bilinear).
        upsampled = F.interpolate(encoded_finest, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        return self.output_conv(lateral + upsampled)

    def forward(self, features: Sequence[Tensor]) -> PixelDecoderOutput:
        if len(features) != self.num_levels + 1:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: expected {self.num_levels + 1} feature maps, got {len(features)}"
            )
        tokens, positions, shapes = [], [], []
        for level, (x, proj) in enumerate(zip(list(features[1:])[::-1], self.input_proj)):
            shapes.append((x.shape[-2], x.shape[-1]))
            tokens.append(proj(x).flatten(2).transpose(1, 2))
            pos = self.pe_layer(x).flatten(2).transpose(1, 2)  # fp32 whatever the autocast
            positions.append(pos + self.level_embed[level])
        src = torch.cat(tokens, 1)
        pos = torch.cat(positions, 1)
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=src.device)
        sizes = [h * w for h, w in shapes]
        level_start_index = torch.tensor([0, *sizes[:-1]], device=src.device).cumsum(0)
        # Every token's reference point is its own centre, the same on every level
        # (valid ratios are 1 without padding).
        reference_points = encoder_reference_points(shapes, src.device)[:, :, None].expand(
            src.shape[0], -1, self.num_levels, -1
        )
        for layer in self.encoder:
            src = checkpointed(self.grad_checkpointing, layer, src, pos, reference_points, spatial_shapes,
                               level_start_index)

        batch = src.shape[0]
        encoded = [
            z.transpose(1, 2).reshape(batch, self.conv_dim, h, w)
            for z, (h, w) in zip(src.split(sizes, 1), shapes)
        ]  # coarse to fine
        # One image at a time in backward: GroupNorm normalises each image alone.
        parameters = [*self.lateral_conv.parameters(), *self.output_conv.parameters()]
        finest = checkpointed_per_sample(self.grad_checkpointing, self._fpn_step, features[0], encoded[-1],
                                         parameters=parameters)
        return PixelDecoderOutput(
            mask_features=self.mask_features(finest),
            multi_scale_features=[finest, *encoded[::-1]],
            transformer_feature=encoded[0],
        )
