"""Semantic inference: turn (class, mask) predictions into per-pixel class scores.

Two rules, chosen by ``model.name``:

* ``"maskformer"`` (seed 002) marginalises the Q (class, mask) pairs:
  ``score_c[h, w] = sum_i p_i(c) * m_i[h, w]``, with p_i the softmax over K+1 classes with
  the "no object" column dropped (not renormalised) and m_i the sigmoid mask probability.
  Outputs: ``pred_logits`` B×Q×(K+1), ``pred_masks`` B×Q×h×w.
* ``"pft"`` (seed 000): query i *is* class i and has one logit, so
  ``score_i[h, w] = sigmoid(pred_logits[:, i]) * sigmoid(pred_masks[:, i, h, w])``.
  Outputs: ``pred_logits`` B×K, ``pred_masks`` B×K×h×w.
* ``"unept"`` (seed 001): a per-pixel classifier; scores are the softmax of the
  boundary-refined logits ``sem_logits`` B×K×H×W (already at the input size).

The semantic map is the argmax over the K scores. All computed in fp32, whatever the
caller's autocast.

Mask logits come at stride 4 of the model's input (``MASK_STRIDE``): the backbone pads an
H×W input bottom/right and its stride-4 map is ⌈H/4⌉×⌈W/4⌉, whose cell j covers input
pixels [4j, 4j+4). ``upsample_mask_logits`` therefore upsamples to 4·⌈H/4⌉×4·⌈W/4⌉ and
crops to H×W, as detectron2's ``sem_seg_postprocess`` does for MaskFormer. Resizing
⌈H/4⌉ straight to H would instead squeeze the 4·⌈H/4⌉ − H padded pixels into the image and
shift boundaries, by up to 3 pixels at the bottom/right, whenever H or W is not a multiple of 4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ops.upsample import upsample_bilinear

Rule = Literal["maskformer", "pft", "unept"]
# The pixel decoders' mask features (and so every model's ``pred_masks``) are at stride 4.
MASK_STRIDE = 4


def semantic_inference(pred_logits: Tensor, pred_masks: Tensor) -> Tensor:
    """MaskFormer: ``pred_logits`` B×Q×(K+1), ``pred_masks`` B×Q×h×w (logits) -> scores B×K×h×w."""
    if pred_logits.dim() != 3 or pred_masks.dim() != 4 or pred_masks.shape[:2] != pred_logits.shape[:2]:
        raise ValueError(
            f"the MaskFormer rule needs pred_logits B×Q×(K+1) and pred_masks B×Q×h×w, got "
            f"{tuple(pred_logits.shape)} and {tuple(pred_masks.shape)} (PFT outputs need model.name=pft)"
        )
    with torch.autocast(device_type=pred_logits.device.type, enabled=False):
        probs = pred_logits.float().softmax(-1)[..., :-1]
        masks = pred_masks.float().sigmoid()
        return torch.einsum("bqc,bqhw->bchw", probs, masks)


def pft_semantic_inference(pred_logits: Tensor, pred_masks: Tensor) -> Tensor:
    """PFT: ``pred_logits`` B×K, ``pred_masks`` B×K×h×w (logits, query i = class i)
    -> scores ``sigmoid(l_i) * sigmoid(m_i)`` B×K×h×w."""
    if pred_logits.dim() != 2 or pred_masks.dim() != 4 or pred_masks.shape[:2] != pred_logits.shape:
        raise ValueError(
            f"the PFT rule needs pred_logits B×K and pred_masks B×K×h×w (one query per class), got "
            f"{tuple(pred_logits.shape)} and {tuple(pred_masks.shape)}"
        )
    with torch.autocast(device_type=pred_logits.device.type, enabled=False):
        return pred_logits.float().sigmoid()[:, :, None, None] * pred_masks.float().sigmoid()


def unept_semantic_inference(sem_logits: Tensor) -> Tensor:
    """UN-EPT: refined per-pixel logits B×K×h×w -> class probabilities (softmax, fp32)."""
    if sem_logits.dim() != 4:
        raise ValueError(f"the UN-EPT rule needs sem_logits B×K×h×w, got {tuple(sem_logits.shape)}")
    with torch.autocast(device_type=sem_logits.device.type, enabled=False):
        return sem_logits.float().softmax(1)


_RULES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "maskformer": semantic_inference,
    "pft": pft_semantic_inference,
}
# Rules on one dense logit map (key "sem_logits") instead of (class, mask) pairs.
_DENSE_RULES: dict[str, Callable[[Tensor], Tensor]] = {"unept": unept_semantic_inference}


def upsample_mask_logits(pred_masks: Tensor, image_size: Sequence[int],
                         output_size: Sequence[int] | None = None) -> Tensor:
    """Mask logits of an ``image_size`` (H, W) input -> fp32 logits aligned to the image, at
    ``output_size`` (default: ``image_size``).

    ``pred_masks`` B×Q×h×w is either at the image size already (nothing to align) or its
    stride-4 map ⌈H/4⌉×⌈W/4⌉: upsampled (bilinear) to 4·h×4·w, cropped to H×W, then resized
    to ``output_size`` (detectron2's ``sem_seg_postprocess``). Logits, not probabilities, are
    resized, as MaskFormer does: sharper boundaries than resizing the K class scores.
    """
    height, width = int(image_size[0]), int(image_size[1])
    out = (height, width) if output_size is None else (int(output_size[0]), int(output_size[1]))
    h, w = pred_masks.shape[-2:]
    with torch.autocast(device_type=pred_masks.device.type, enabled=False):
        masks = pred_masks.float()
        if (h, w) != (height, width):
            stride = MASK_STRIDE
            if (h, w) != (-(-height // stride), -(-width // stride)):
                raise ValueError(
                    f"pred_masks are {h}×{w}, neither the {height}×{width} image size nor its stride-{stride} "
                    f"map {-(-height // stride)}×{-(-width // stride)}"
                )
            # The training losses backpropagate through this: ops.upsample's
            # backward is matrix products, several times faster than ATen's on CPU.
            masks = upsample_bilinear(masks, (h * stride, w * stride), crop=(height, width))
        if tuple(masks.shape[-2:]) != out:
            masks = F.interpolate(masks, size=out, mode="bilinear", align_corners=False)
        return masks


def semantic_scores(outputs: dict, rule: Rule = "maskformer", image_size: Sequence[int] | None = None,
                    output_size: Sequence[int] | None = None) -> Tensor:
    """Model outputs -> fp32 class scores B×K×h×w by ``rule``.

    With ``image_size`` (H, W, the model's input) the mask logits are first aligned to the
    image by :func:`upsample_mask_logits` and brought to ``output_size`` (default H×W).
    This is the one place the rule name is checked.
    """
    if rule in _DENSE_RULES:
        logits = outputs["sem_logits"]
        if image_size is not None:
            logits = upsample_mask_logits(logits, image_size, output_size)
        return _DENSE_RULES[rule](logits)
    if rule not in _RULES:
        raise ValueError(
            f"model.name must be one of {[*_RULES, *_DENSE_RULES]} to pick a semantic inference rule, got {rule!r}"
        )
    pred_masks = outputs["pred_masks"]
    if image_size is not None:
        pred_masks = upsample_mask_logits(pred_masks, image_size, output_size)
    return _RULES[rule](outputs["pred_logits"], pred_masks)


def semantic_segmentation(outputs: dict, image_size: Sequence[int], rule: Rule = "maskformer") -> Tensor:
    """Model outputs -> int64 B×H×W label map (classes 0..K-1) at ``image_size`` (H, W)."""
    return semantic_scores(outputs, rule, image_size).argmax(1)
