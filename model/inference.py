"""Semantic inference: turn (class, mask) predictions into per-pixel class scores.

Two rules, chosen by ``model.name``:

* ``"maskformer"`` (seed 002) marginalises the Q (class, mask) pairs:
  ``score_c[h, w] = sum_i p_i(c) * m_i[h, w]``, with p_i the softmax over K+1 classes with
  the "no object" column dropped (not renormalised) and m_i the sigmoid mask probability.
* ``"pft"`` (seed 000): query i *is* class i, so ``score_i[h, w] = p_i * m_i[h, w]`` with
  ``p_i = sigmoid(pred_logits[:, i, i])`` and ``m_i = sigmoid(pred_masks[:, i])``.

The semantic map is the argmax over the K scores. All computed in fp32, whatever the
caller's autocast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

Rule = Literal["maskformer", "pft"]
RULES: tuple[str, ...] = get_args(Rule)


def semantic_inference(pred_logits: Tensor, pred_masks: Tensor) -> Tensor:
    """MaskFormer: ``pred_logits`` B×Q×(K+1), ``pred_masks`` B×Q×h×w (logits) -> scores B×K×h×w."""
    with torch.autocast(device_type=pred_logits.device.type, enabled=False):
        probs = pred_logits.float().softmax(-1)[..., :-1]
        masks = pred_masks.float().sigmoid()
        return torch.einsum("bqc,bqhw->bchw", probs, masks)


def pft_semantic_inference(pred_logits: Tensor, pred_masks: Tensor) -> Tensor:
    """PFT: ``pred_logits`` B×K×(K+1), ``pred_masks`` B×K×h×w (logits, query i = class i)
    -> scores ``p_i * m_i`` B×K×h×w."""
    batch, queries, columns = pred_logits.shape
    if columns != queries + 1 or pred_masks.shape[:2] != (batch, queries):
        raise ValueError(
            f"the PFT rule needs pred_logits B×K×(K+1) and pred_masks B×K×h×w (one query per class), "
            f"got {tuple(pred_logits.shape)} and {tuple(pred_masks.shape)}"
        )
    with torch.autocast(device_type=pred_logits.device.type, enabled=False):
        # Query i's own-class logit: the diagonal of the first K columns.
        probs = pred_logits.float().diagonal(dim1=1, dim2=2).sigmoid()  # B×K
        return probs[:, :, None, None] * pred_masks.float().sigmoid()


def semantic_scores(outputs: dict, rule: Rule = "maskformer", image_size: Sequence[int] | None = None) -> Tensor:
    """Model outputs -> fp32 class scores B×K×H×W by ``rule``.

    With ``image_size`` (H, W) the mask *logits* are upsampled (bilinear) to that size
    before the sigmoid, as MaskFormer does: sharper boundaries than upsampling the K
    class scores, and cheaper when Q <= K.
    """
    if rule not in RULES:
        raise ValueError(f"model.name must be one of {list(RULES)} to pick a semantic inference rule, got {rule!r}")
    pred_masks = outputs["pred_masks"]
    with torch.autocast(device_type=pred_masks.device.type, enabled=False):
        pred_masks = pred_masks.float()
        if image_size is not None:
            size = (int(image_size[0]), int(image_size[1]))
            if tuple(pred_masks.shape[-2:]) != size:
                pred_masks = F.interpolate(pred_masks, size=size, mode="bilinear", align_corners=False)
        if rule == "pft":
            return pft_semantic_inference(outputs["pred_logits"], pred_masks)
        return semantic_inference(outputs["pred_logits"], pred_masks)


def semantic_segmentation(outputs: dict, image_size: Sequence[int], rule: Rule = "maskformer") -> Tensor:
    """Model outputs -> int64 B×H×W label map (classes 0..K-1) at ``image_size`` (H, W)."""
    return semantic_scores(outputs, rule, image_size).argmax(1)
