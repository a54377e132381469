"""The MaskFormer meta-architecture: backbone -> pixel decoder -> transformer predictor.

Only the network. Matching and losses live in ``matcher.py``/``criterion.py``,
post-processing in ``inference.py`` (Mask2Former's separation). ``NormalizedInput`` is
the input handling MaskFormer and PFT share.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from model.transformer_decoder import TransformerPredictor


class NormalizedInput(nn.Module):
    """Base of the meta-architectures (MaskFormer, PFT): backbone -> pixel decoder ->
    predictor, plus the config's pixel mean/std that turn B×3×H×W images (uint8 or float
    on a 0..255 scale) into normalised fp32 input. Subclasses write ``forward``.

    Normalising inside the model lets loaders ship uint8 (4× less to copy).
    """

    def __init__(
        self,
        backbone: nn.Module,
        pixel_decoder: nn.Module,  # returns a PixelDecoderOutput (model/pixel_decoder.py)
        predictor: nn.Module,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
    ) -> None:
        super().__init__()
        # The attribute name ``backbone`` is relied on by the optimizer (lower backbone lr).
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError("model.pixel_mean and model.pixel_std must have 3 values (RGB)")
        # Not persistent: the config, not the checkpoint, is the source of these constants.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1), False)

    def normalize(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects B×3×H×W images, got shape {tuple(images.shape)}")
        return (images.float() - self.pixel_mean) / self.pixel_std


class MaskFormer(NormalizedInput):
    """``forward(images: B×3×H×W, uint8 or float on a 0..255 scale)`` ->
    ``{"pred_logits": B×Q×(K+1), "pred_masks": B×Q×H/4×W/4 (mask logits),
    "aux_outputs": [{"pred_logits", "pred_masks"} per earlier decoder layer]}``;
    ``aux_outputs`` is filled only in training mode with deep supervision (else ``[]``).
    In training the dicts also carry ``mask_embed`` and the top level ``mask_features``
    (one-element lists), the two factors of ``pred_masks``, for the criterion
    (``TransformerPredictor``).

    ``pred_masks`` are at the finest backbone stride (4 for the usual out_indices) and
    come out in the autocast dtype; the criterion and inference cast them to fp32.
    The attribute name ``backbone`` is relied on by the optimizer (lower backbone lr).
    """

    predictor: TransformerPredictor

    def forward(self, images: Tensor) -> dict:
        features = self.backbone(self.normalize(images))
        decoded = self.pixel_decoder(features)
        return self.predictor(decoded.transformer_feature, decoded.mask_features)
