"""Semantic inference of MaskFormer: marginalise the (class, mask) pairs into per-pixel scores.

The paper's semantic inference is ``argmax_{c in 1..K} sum_i p_i(c) * m_i[h, w]``, with
p_i the softmax over K+1 classes with the "no object" column dropped (not renormalised)
and m_i the sigmoid mask probability. All computed in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def semantic_inference(pred_logits: Tensor, pred_masks: Tensor) -> Tensor:
    """``pred_logits`` B×Q×(K+1), ``pred_masks`` B×Q×h×w (logits) -> scores B×K×h×w."""
    with torch.autocast(device_type=pred_logits.device.type, enabled=False):
        probs = pred_logits.float().softmax(-1)[..., :-1]
        masks = pred_masks.float().sigmoid()
        return torch.einsum("bqc,bqhw->bchw", probs, masks)


def semantic_segmentation(outputs: dict, image_size: Sequence[int]) -> Tensor:
    """Model outputs -> int64 B×H×W label map (classes 0..K-1) at ``image_size`` (H, W).

    As in MaskFormer, the mask *logits* are upsampled (bilinear) to the image size before
    the sigmoid and the marginalisation, which gives sharper boundaries than upsampling the
    K class scores.
    """
    pred_masks = outputs["pred_masks"]
    with torch.autocast(device_type=pred_masks.device.type, enabled=False):
        size = (int(image_size[0]), int(image_size[1]))
        masks = F.interpolate(pred_masks.float(), size=size, mode="bilinear", align_corners=False)
        return semantic_inference(outputs["pred_logits"], masks).argmax(1)
