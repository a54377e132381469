"""The PFT meta-architecture: backbone -> pixel decoder pyramid -> per-scale PFT decoders.

Like MaskFormer (same backbone, same FPN pixel decoder, same normalisation inside the
model, shared through ``NormalizedInput``), but the decoder reads the whole pyramid
instead of one map:

- pixel tokens P_s = ``multi_scale_features`` (strides 4, 8, 16, 32);
- mask features M_s = the pixel decoder's ``mask_features`` at stride 4 (its per-pixel
  embedding, as in MaskFormer) and ``multi_scale_features`` at the coarser strides,
  where the pixel decoder has no separate mask projection. Using ``mask_features`` also
  keeps every pixel-decoder weight in the graph (unused parameters upset ZeRO).

Only the network; the fixed class-to-query assignment is the criterion's (``FixedMatcher``)
and PFT's semantic rule ``argmax_i sigmoid(pred_logits_i)·sigmoid(pred_masks_i)`` is
inference's.
"""

from __future__ import annotations

from torch import Tensor

from model.maskformer import NormalizedInput
from model.pft_decoder import PFTPredictor


class PFT(NormalizedInput):
    """``forward(images: B×3×H×W, uint8 or float on a 0..255 scale)`` ->
    ``{"pred_logits": B×K, "pred_masks": B×K×H/4×W/4, "aux_outputs": []}`` in evaluation.

    Query i is class i: ``pred_logits[:, i]`` is the (scale-averaged) logit of "class i is
    in the image" and ``pred_masks[:, i]`` class i's mask logits. In training the masks
    come as their factors (``mask_embed`` per layer, ``mask_features``; ``pft_mask_logits``
    forms them) and ``aux_outputs`` holds the earlier decoder layers with deep supervision
    (``PFTPredictor`` says why).

    ``pixel_decoder(features)`` must return an object with ``mask_features`` (B×D×H/4×W/4)
    and ``multi_scale_features`` (one map per scale, strides 4/8/16/32, finest first).
    The attribute name ``backbone`` is relied on by the optimizer (lower backbone lr).
    """

    predictor: PFTPredictor

    def forward(self, images: Tensor) -> dict:
        decoded = self.pixel_decoder(self.backbone(self.normalize(images)))
        pyramid = list(decoded.multi_scale_features)
        return self.predictor(pyramid, [decoded.mask_features, *pyramid[1:]])
