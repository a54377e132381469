"""Panoptic inference: turn one image's (class, mask) predictions into a panoptic id map.

Two rules, both pure functions of one image's outputs, computed in fp32 (whatever the
caller's autocast), with tensor ops over whole masks (the only Python loops run over
queries, never pixels):

* :func:`maskformer_panoptic`: MaskFormer / Mask2Former's ``panoptic_inference`` (seed 002).
  Softmax over the K+1 classes; keep queries whose top class is not "no object" and whose
  score is > ``object_mask_threshold``; each pixel goes to the kept query with the largest
  ``score * sigmoid(mask)``; a query's segment is its argmax pixels where its own mask is
  >= 0.5, kept if ``argmax area / (sigmoid(mask) >= 0.5 area) >= overlap_threshold``
  (a query mostly hidden by stronger ones is dropped). Queries of one stuff class merge
  into one segment; each thing query is its own segment. Mask2Former's ADE20K and COCO
  panoptic configs use 0.8 / 0.8 (detectron2's code defaults are 0.0 / 0.0). The segment
  is Mask2Former's ``(argmax == k) & (mask >= 0.5)``; MaskFormer's first release used
  ``argmax == k`` alone.
* :func:`mask_wise_merge`: Panoptic SegFormer's mask-wise merging (seed 004). Score of
  mask i = ``p_i^alpha * q_i^beta``, with p_i its top sigmoid class probability and q_i the
  mean mask probability over its pixels > ``mask_threshold``; masks are painted in
  descending score order; a mask scoring below the confidence threshold is dropped, and so
  is one whose fraction of pixels already painted by higher-scored masks is
  > ``thing_overlap`` (things) or > ``stuff_overlap`` (stuff); otherwise its unpainted
  pixels are painted. Stuff masks of one class merge into one segment. Defaults are the
  official code's (``PanformerHead``): alpha 1, beta 2 (``scores *= seg_scores ** 2``),
  confidence 0.25 for things and stuff, overlap 0.4 (things) / 0.2 (stuff), binary masks
  at > 0.5, and q_i = sum(m·[m > 0.5]) / (area + 1): the ``+ 1`` (``mask_area_offset``)
  keeps empty masks finite and lowers the score of tiny masks; 0 gives the plain mean.

Both return ``(id_map, segments)``: ``id_map`` int32 H×W with 0 = void and segment ids
1, 2, ... in the order segments were created; ``segments`` one dict per id, with ``id``,
``category_id`` (0-based class index), ``isthing``, ``score`` (the query's class score,
or merging score; the first query's for merged stuff) and ``area`` (pixels in ``id_map``).
``is_thing[c]`` says whether class c is a thing class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from model.config import PanopticInferenceConfig
from model.inference import upsample_mask_logits

Segments = list[dict]


def _check_inputs(
    scores: Tensor, masks: Tensor, num_classes: int, is_thing: Sequence[bool], what: str
) -> None:
    if scores.dim() != 2 or masks.dim() != 3 or masks.shape[0] != scores.shape[0]:
        raise ValueError(
            f"{what} needs class scores Q×C and masks Q×H×W, got {tuple(scores.shape)} and {tuple(masks.shape)}"
        )
    if len(is_thing) != num_classes:
        raise ValueError(f"is_thing has {len(is_thing)} entries for {num_classes} classes")


class _Painter:
    """Builds ``id_map`` and ``segments``; stuff classes get one segment each."""

    def __init__(self, height: int, width: int, device: torch.device):
        self.id_map = torch.zeros((height, width), dtype=torch.int32, device=device)
        self.segments: Segments = []
        self._stuff_ids: dict[int, int] = {}

    def paint(self, pixels: Tensor, category: int, isthing: bool, score: float, area: int) -> None:
        if not isthing and category in self._stuff_ids:
            seg_id = self._stuff_ids[category]
            self.id_map[pixels] = seg_id
            self.segments[seg_id - 1]["area"] += area
            return
        seg_id = len(self.segments) + 1
        if not isthing:
            self._stuff_ids[category] = seg_id
        self.id_map[pixels] = seg_id
        self.segments.append(
            {"id": seg_id, "category_id": category, "isthing": isthing, "score": score, "area": area}
        )


def maskformer_panoptic(
    class_logits: Tensor,
    mask_logits: Tensor,
    is_thing: Sequence[bool],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> tuple[Tensor, Segments]:
    """MaskFormer/Mask2Former panoptic inference: ``class_logits`` Q×(K+1) (last column =
    no object), ``mask_logits`` Q×H×W -> ``(id_map, segments)`` (see the module docstring)."""
    num_classes = class_logits.shape[-1] - 1
    _check_inputs(class_logits, mask_logits, num_classes, is_thing, "maskformer_panoptic")
    height, width = mask_logits.shape[-2:]
    painter = _Painter(height, width, mask_logits.device)
    with torch.autocast(device_type=class_logits.device.type, enabled=False):
        scores, labels = class_logits.float().softmax(-1).max(-1)
        keep = labels.ne(num_classes) & (scores > object_mask_threshold)
        if not bool(keep.any()):
            return painter.id_map, painter.segments
        scores, labels = scores[keep], labels[keep]
        masks = mask_logits[keep].float().sigmoid()
        kept = masks.shape[0]
        owner = (scores[:, None, None] * masks).argmax(0)  # first query wins ties
        owned = owner[None] == torch.arange(kept, device=owner.device)[:, None, None]
        foreground = masks >= 0.5
        segment_masks = owned & foreground
        owned_area = owned.sum((1, 2)).tolist()
        original_area = foreground.sum((1, 2)).tolist()
        segment_area = segment_masks.sum((1, 2)).tolist()
        for k, (category, score) in enumerate(zip(labels.tolist(), scores.tolist())):
            if owned_area[k] == 0 or original_area[k] == 0 or segment_area[k] == 0:
                continue
            if owned_area[k] / original_area[k] < overlap_threshold:
                continue
            painter.paint(segment_masks[k], category, bool(is_thing[category]), score, segment_area[k])
    return painter.id_map, painter.segments


def mask_wise_scores(
    class_probs: Tensor,
    mask_probs: Tensor,
    alpha: float = 1.0,
    beta: float = 2.0,
    mask_threshold: float = 0.5,
    mask_area_offset: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Panoptic SegFormer's confidence: ``class_probs`` Q×K (sigmoid), ``mask_probs`` Q×H×W
    -> (score Q, label Q, binary masks Q×H×W) with
    ``score = max_c p^alpha * (sum(m·[m > t]) / (area + offset))^beta``."""
    if alpha < 0 or beta < 0 or mask_area_offset < 0:
        raise ValueError(
            f"alpha, beta and mask_area_offset must be >= 0, got {alpha}, {beta}, {mask_area_offset}"
        )
    with torch.autocast(device_type=class_probs.device.type, enabled=False):
        probs, labels = class_probs.float().max(-1)
        masks = mask_probs.float()
        binary = masks > mask_threshold
        area = binary.sum((1, 2)).float()
        # clamp: area + offset < 1 only for an empty mask (numerator 0) when offset < 1.
        quality = (masks * binary).sum((1, 2)) / (area + mask_area_offset).clamp_min(1.0)
        return probs.pow(alpha) * quality.pow(beta), labels, binary


def mask_wise_merge(
    class_probs: Tensor,
    mask_probs: Tensor,
    is_thing: Sequence[bool],
    alpha: float = 1.0,
    beta: float = 2.0,
    confidence_threshold: float = 0.25,
    thing_overlap: float = 0.4,
    stuff_overlap: float = 0.2,
    mask_threshold: float = 0.5,
    stuff_confidence_threshold: float | None = None,
    mask_area_offset: float = 1.0,
) -> tuple[Tensor, Segments]:
    """Panoptic SegFormer mask-wise merging: ``class_probs`` Q×K sigmoid probabilities,
    ``mask_probs`` Q×H×W probabilities -> ``(id_map, segments)``.

    A mask is kept if its score is >= the confidence threshold (``stuff_confidence_threshold``
    for stuff, default the same) and at most ``thing_overlap`` / ``stuff_overlap`` of its
    pixels are already painted; equal scores keep query order (stable sort). A kept mask
    with no unpainted pixel left (possible only with an overlap limit >= 1) adds nothing.
    """
    _check_inputs(class_probs, mask_probs, class_probs.shape[-1], is_thing, "mask_wise_merge")
    stuff_threshold = (
        confidence_threshold if stuff_confidence_threshold is None else stuff_confidence_threshold
    )
    scores, labels, binary = mask_wise_scores(
        class_probs, mask_probs, alpha, beta, mask_threshold, mask_area_offset
    )
    height, width = mask_probs.shape[-2:]
    painter = _Painter(height, width, mask_probs.device)
    painted = torch.zeros((height, width), dtype=torch.bool, device=mask_probs.device)
    areas = binary.sum((1, 2)).tolist()
    scores_list, labels_list = scores.tolist(), labels.tolist()
    for q in torch.sort(scores, descending=True, stable=True).indices.tolist():
        category, score, area = labels_list[q], scores_list[q], areas[q]
        isthing = bool(is_thing[category])
        if score < (confidence_threshold if isthing else stuff_threshold) or area == 0:
            continue
        overlap = int((binary[q] & painted).sum())
        if overlap / area > (thing_overlap if isthing else stuff_overlap):
            continue
        if area == overlap:
            continue
        pixels = binary[q] & ~painted
        painted |= pixels
        painter.paint(pixels, category, isthing, score, area - overlap)
    return painter.id_map, painter.segments


def maskformer_panoptic_from_config(
    class_logits: Tensor, mask_logits: Tensor, is_thing: Sequence[bool], cfg: PanopticInferenceConfig
) -> tuple[Tensor, Segments]:
    """:func:`maskformer_panoptic` with ``model.panoptic``'s thresholds."""
    return maskformer_panoptic(
        class_logits, mask_logits, is_thing, cfg.object_mask_threshold, cfg.overlap_threshold
    )


def mask_wise_merge_from_config(
    class_probs: Tensor, mask_probs: Tensor, is_thing: Sequence[bool], cfg: PanopticInferenceConfig
) -> tuple[Tensor, Segments]:
    """:func:`mask_wise_merge` with ``model.panoptic``'s merging knobs."""
    return mask_wise_merge(
        class_probs,
        mask_probs,
        is_thing,
        alpha=cfg.class_exponent,
        beta=cfg.mask_exponent,
        confidence_threshold=cfg.confidence_threshold,
        thing_overlap=cfg.thing_overlap,
        stuff_overlap=cfg.stuff_overlap,
        mask_threshold=cfg.mask_threshold,
        stuff_confidence_threshold=cfg.stuff_confidence_threshold,
        mask_area_offset=cfg.mask_area_offset,
    )


def panoptic_from_outputs(
    outputs: dict,
    image_size: Sequence[int],
    is_thing: Sequence[bool],
    cfg: PanopticInferenceConfig | None = None,
    output_size: Sequence[int] | None = None,
) -> list[tuple[Tensor, Segments]]:
    """MaskFormer-family model outputs (``pred_logits`` B×Q×(K+1), ``pred_masks`` B×Q×h×w
    logits at stride 4 or at the image size) -> one ``(id_map, segments)`` per image.

    Mask logits are aligned to the ``image_size`` (H, W) input and resized to ``output_size``
    (default H×W) by :func:`model.inference.upsample_mask_logits`, as semantic inference
    does, before the MaskFormer rule runs on each image.
    """
    cfg = cfg or PanopticInferenceConfig()
    pred_logits = outputs["pred_logits"]
    if pred_logits.dim() != 3:
        raise ValueError(
            f"panoptic inference needs MaskFormer outputs (pred_logits B×Q×(K+1)), got {tuple(pred_logits.shape)}"
        )
    masks = upsample_mask_logits(outputs["pred_masks"], image_size, output_size)
    return [
        maskformer_panoptic_from_config(pred_logits[b], masks[b], is_thing, cfg)
        for b in range(masks.shape[0])
    ]
