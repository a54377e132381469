"""DETR's fixed sine positional encoding of a 2-D feature map (as used by MaskFormer).

MaskFormer adds it to the stride-32 feature (the keys of the decoder's cross-attention);
the queries carry their own learned positional embeddings instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """``pos[b, :, y, x] = [sin/cos(y / T^(2i/d)) ..., sin/cos(x / T^(2i/d)) ...]``.

    ``num_pos_feats`` is per axis, so the output has ``2 * num_pos_feats`` channels
    (MaskFormer uses ``hidden_dim // 2``). With ``normalize`` the coordinates are scaled to
    (0, 2*pi] so the encoding does not depend on the image size.
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        if num_pos_feats % 2:
            # sin and cos alternate over the channels of each axis.
            raise ValueError(f"PositionEmbeddingSine: num_pos_feats must be even, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x``: B×C×H×W (only its shape and device are used); ``mask``: B×H×W, True = padding.

        Returns a float32 B×(2*num_pos_feats)×H×W tensor: the encoding is computed in fp32
        whatever the autocast, because bf16 cannot resolve the high-frequency terms.
        """
        if mask is None:
            mask = torch.zeros((x.shape[0], x.shape[2], x.shape[3]), device=x.device, dtype=torch.bool)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
