"""The PFT meta-architecture: backbone -> pixel decoder pyramid -> per-scale PFT decoders.

Like MaskFormer (same backbone, same FPN pixel decoder, same normalisation inside the
model), but the decoder reads the whole pyramid instead of one map:

- pixel tokens P_s = ``multi_scale_features`` (strides 4, 8, 16, 32);
- mask features M_s = the pixel decoder's ``mask_features`` at stride 4 (its per-pixel
  embedding, as in MaskFormer) and ``multi_scale_features`` at the coarser strides,
  where the pixel decoder has no separate mask projection. Using ``mask_features`` also
  keeps every pixel-decoder weight in the graph (unused parameters upset ZeRO).

Only the network; the fixed class-to-query assignment is the criterion's (``FixedMatcher``)
and PFT's semantic rule ``argmax_i sigmoid(l_ii)·sigmoid(m_i)`` is inference's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from model.pft_decoder import PFTPredictor


class PFT(nn.Module):
    """``forward(images: B×3×H×W, uint8 or float on a 0..255 scale)`` ->
    ``{"pred_logits": B×K×(K+1), "pred_masks": B×K×H/4×W/4, "aux_outputs": [...]}``.

    ``pixel_decoder(features)`` must return an object with ``mask_features`` (B×D×H/4×W/4)
    and ``multi_scale_features`` (one map per scale, strides 4/8/16/32, finest first).
    The attribute name ``backbone`` is relied on by the optimizer (lower backbone lr).
    """

    def __init__(
        self,
        backbone: nn.Module,
        pixel_decoder: nn.Module,
        predictor: PFTPredictor,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
    ) -> None:
        super().__init__()
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError("model.pixel_mean and model.pixel_std must have 3 values (RGB)")
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        # Not persistent: the config, not the checkpoint, is the source of these constants.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1), False)

    def forward(self, images: Tensor) -> dict:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"PFT expects B×3×H×W images, got shape {tuple(images.shape)}")
        x = (images.float() - self.pixel_mean) / self.pixel_std
        decoded = self.pixel_decoder(self.backbone(x))
        pyramid = list(decoded.multi_scale_features)
        return self.predictor(pyramid, [decoded.mask_features, *pyramid[1:]])
