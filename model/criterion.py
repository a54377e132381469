"""The set criterion of MaskFormer and PFT: match, then classification + mask losses, with deep supervision.

For each output set (the final layer, then every ``aux_outputs`` entry, re-matched
independently as in DETR), with a class-loss flavour fixed at construction
(``build_criterion`` picks it from ``model.name``):

- ``class_loss="softmax"`` (MaskFormer; ``pred_logits`` B×Q×(K+1)): ``loss_ce`` is the
  cross-entropy over K+1 classes for *every* query; unmatched queries target "no object"
  (index K), whose weight is ``no_object_weight`` (``empty_weight``).
- ``class_loss="sigmoid"`` (PFT; ``pred_logits`` B×Q, one logit per query): a matched
  query's target is 1, an unmatched one's 0 — under PFT's fixed assignment, "class i is
  in the image". ``loss_ce`` is their binary cross-entropy and ``loss_focal_ce`` (only
  when ``focal_ce_weight > 0``) their sigmoid focal loss, each summed over queries and
  divided by the number of masks (``ops.losses.binary_ce_loss`` says why). There is no
  "no object" column, so ``no_object_weight`` does not apply.
- ``loss_focal`` / ``loss_dice``: on matched pairs only, each normalised by the number of
  ground-truth masks across all ranks. With ``num_points == 0`` the predictions are
  upsampled (bilinear) to the target size, i.e. the input image size — MaskFormer's
  full-resolution mask loss. With ``num_points > 0`` both are compared at ``num_points``
  points per mask chosen by importance sampling (Mask2Former), which costs O(P) instead
  of O(HW) per mask.

The matcher decides which query answers which target: Hungarian matching (MaskFormer)
or PFT's fixed class-to-query assignment; nothing below depends on which.

Returned losses are already multiplied by their weights; auxiliary ones are suffixed
``_0``, ``_1``, ... (``_0`` = first decoder layer). The caller sums them. All math is
float32 with autocast off, whatever precision produced the outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from model.inference import upsample_mask_logits
from model.matcher import FixedMatcher, HungarianMatcher, Indices
from ops.fused_losses import fused_dice_loss, fused_mask_losses, fused_sigmoid_focal_loss
from ops.losses import binary_ce_loss, focal_ce_loss
from ops.mask_product import matched_mask_logits
from ops.point_sampling import calculate_uncertainty, get_uncertain_point_coords_with_randomness, point_sample

ClassLoss = Literal["softmax", "sigmoid"]


class SetCriterion(nn.Module):
    """``forward(outputs, targets) -> {"loss_ce", ["loss_focal_ce",] "loss_focal", "loss_dice", "loss_ce_0", ...}``.

    ``targets``: one ``{"labels": int64[n] in [0, K), "masks": bool[n, H, W]}`` per image,
    H×W the input image size (ignored pixels simply belong to no mask; n may be 0).
    ``outputs["pred_logits"]``: B×Q×(K+1) for ``class_loss="softmax"``, B×Q for "sigmoid".
    Optional: ``outputs["mask_features"]`` and, per layer, ``"mask_embed"``, the factors of
    ``pred_masks`` as lists, one element per scale (``pred_masks = average_over_scales`` of
    their products; MaskFormer in training: one scale, PFT: its four): the mask losses then
    take the matched rows of those products again (``loss_masks``), and ``pred_masks`` may
    be absent (PFT in training, whose fixed matcher reads no mask).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | FixedMatcher,
        *,
        class_loss: ClassLoss = "softmax",
        class_weight: float = 1.0,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        no_object_weight: float = 0.1,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        focal_ce_weight: float = 0.0,
        num_points: int = 0,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        if class_loss not in get_args(ClassLoss):
            raise ValueError(f"SetCriterion: class_loss must be one of {get_args(ClassLoss)}, got {class_loss!r}")
        if class_loss == "softmax" and focal_ce_weight:
            # Focal-CE is PFT's loss on its per-class sigmoid logits; a softmax head has none.
            raise ValueError(
                f"model.loss.focal_ce_weight={focal_ce_weight} applies to PFT's sigmoid class logits only; "
                "set it to 0 for model.name=maskformer"
            )
        if num_points < 0:
            raise ValueError(f"model.loss.num_points must be >= 0 (0 = full-resolution masks), got {num_points}")
        if num_points and oversample_ratio < 1:
            raise ValueError(f"model.loss.oversample_ratio must be >= 1, got {oversample_ratio}")
        if num_points and not 0 <= importance_sample_ratio <= 1:
            raise ValueError(f"model.loss.importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_loss = class_loss
        self.class_weight = class_weight
        self.focal_ce_weight = focal_ce_weight
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight)

    def num_masks(self, targets: list[dict], device: torch.device) -> float:
        """Ground-truth masks per rank, averaged over ranks and clamped to >= 1 (DETR).

        Every rank divides by the same number, so the gradient all-reduce averages
        correctly weighted per-mask losses even when ranks hold different mask counts.
        """
        count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return max(float(count.item()), 1.0)

    def target_classes(self, logits: Tensor, targets: list[dict], indices: Indices) -> Tensor:
        """B×Q int64: the matched target's class per query, K ("no object") if unmatched."""
        device = logits.device
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=device)
        for b, (target, (src, tgt)) in enumerate(zip(targets, indices)):
            target_classes[b, src.to(device)] = target["labels"].to(device)[tgt.to(device)]
        return target_classes

    @staticmethod
    def matched_queries(logits: Tensor, indices: Indices) -> Tensor:
        """B×Q float32: 1 for a query matched to a target, else 0 (the sigmoid class target)."""
        matched = torch.zeros(logits.shape[:2], dtype=torch.float32, device=logits.device)
        for b, (src, _) in enumerate(indices):
            matched[b, src.to(logits.device)] = 1.0
        return matched

    def loss_labels(self, logits: Tensor, target_classes: Tensor) -> Tensor:
        # Weighted mean: divides by the summed weights of the targets, as DETR does.
        weight = self.empty_weight.to(device=logits.device, dtype=torch.float32)
        return F.cross_entropy(logits.float().transpose(1, 2), target_classes, weight)

    def class_losses(
        self, logits: Tensor, targets: list[dict], indices: Indices, num_masks: float, suffix: str
    ) -> dict[str, Tensor]:
        """``loss_ce`` (+ ``loss_focal_ce``) of one output set, weighted, in the configured flavour."""
        expected_dims = 3 if self.class_loss == "softmax" else 2
        if logits.dim() != expected_dims:
            shape = "B×Q×(K+1)" if self.class_loss == "softmax" else "B×Q (one logit per query)"
            raise ValueError(
                f"SetCriterion(class_loss={self.class_loss!r}) expects pred_logits {shape}, got {tuple(logits.shape)}"
            )
        if self.class_loss == "softmax":
            target_classes = self.target_classes(logits, targets, indices)
            return {f"loss_ce{suffix}": self.class_weight * self.loss_labels(logits, target_classes)}
        present = self.matched_queries(logits, indices)
        losses = {f"loss_ce{suffix}": self.class_weight * binary_ce_loss(logits, present, num_masks)}
        if self.focal_ce_weight:
            focal_ce = focal_ce_loss(logits, present, num_masks, self.focal_alpha, self.focal_gamma)
            losses[f"loss_focal_ce{suffix}"] = self.focal_ce_weight * focal_ce
        return losses

    def loss_masks(
        self, pred_masks: Tensor | None, targets: list[dict], indices: Indices, num_masks: float,
        mask_embed: Sequence[Tensor] | None = None, mask_features: Sequence[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """With ``mask_embed`` and ``mask_features`` (the per-scale factors of ``pred_masks``),
        the matched masks are the matched rows of their products, taken again
        (``matched_mask_logits`` says why), in ``pred_masks``' dtype or, where the model
        formed no ``pred_masks`` (PFT in training), the embeddings'; else gathered from
        ``pred_masks``."""
        if mask_embed is not None and mask_features is not None:
            dtype = (pred_masks if pred_masks is not None else mask_embed[0]).dtype
            src = matched_mask_logits(mask_embed, mask_features, [i for i, _ in indices], dtype)
            device = src.device
        elif pred_masks is None:
            raise ValueError("SetCriterion: outputs need pred_masks, or mask_embed with mask_features (their factors)")
        else:
            device = pred_masks.device
            # One gather from the B·Q masks: its backward scatters into one zero-filled tensor,
            # where a per-image pred_masks[b, i] costs two full-size zero fills and a sum per image.
            queries = pred_masks.shape[1]
            flat = torch.cat([b * queries + i.to(device) for b, (i, _) in enumerate(indices)])
            src = pred_masks.flatten(0, 1)[flat]
        if src.shape[0] == 0:
            zero = src.float().sum() * 0.0  # keeps the graph: every rank must backward
            return zero, zero.clone()
        sizes = {tuple(t["masks"].shape[-2:]) for t in targets}
        if len(sizes) != 1:
            # One batched image tensor means one size; MaskFormer's padding is the loader's job.
            raise ValueError(f"SetCriterion: target masks of one batch must share one size, got {sorted(sizes)}")
        height, width = sizes.pop()
        tgt = torch.cat([t["masks"].to(device)[j.to(device)] for t, (_, j) in zip(targets, indices)])
        src = src.float()
        # The fused losses keep only logits and (boolean) targets for backward: over 6
        # deep-supervision layers of full-resolution masks that is most of the loss memory.
        if not self.num_points:
            # Aligned exactly as inference aligns masks (stride-4 map -> image, cropped);
            # the upsampled logits are recomputed in backward rather than saved.
            def upsample(logits: Tensor) -> Tensor:
                # squeeze(1), not [:, 0]: its backward is a view, not a zero-filled copy.
                return upsample_mask_logits(logits[:, None], (height, width)).squeeze(1)

            return fused_mask_losses(src, tgt, num_masks, upsample, alpha=self.focal_alpha, gamma=self.focal_gamma)
        src, tgt = self._sample_points(src[:, None], tgt[:, None].float())
        focal = fused_sigmoid_focal_loss(src, tgt, num_masks, alpha=self.focal_alpha, gamma=self.focal_gamma)
        dice = fused_dice_loss(src, tgt, num_masks)
        return focal, dice

    def _sample_points(self, src: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor]:
        """N×1×h×w logits and N×1×H×W targets -> N×P values at the same (uncertain) points.

        Normalised coordinates make the two resolutions line up without upsampling.
        """
        with torch.no_grad():
            points = get_uncertain_point_coords_with_randomness(
                src, calculate_uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio
            )
            point_labels = point_sample(tgt, points)[:, 0]
        return point_sample(src, points)[:, 0], point_labels

    def _losses(self, outputs: dict, targets: list[dict], num_masks: float, suffix: str,
                mask_features: Sequence[Tensor] | None) -> dict[str, Tensor]:
        indices = self.matcher(outputs, targets)
        losses = self.class_losses(outputs["pred_logits"].float(), targets, indices, num_masks, suffix)
        focal, dice = self.loss_masks(outputs.get("pred_masks"), targets, indices, num_masks,
                                      outputs.get("mask_embed"), mask_features)
        losses[f"loss_focal{suffix}"] = self.focal_weight * focal
        losses[f"loss_dice{suffix}"] = self.dice_weight * dice
        return losses

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        device = outputs["pred_logits"].device
        with torch.autocast(device_type=device.type, enabled=False):
            num_masks = self.num_masks(targets, device)
            # Shared by every layer's masks: only at the top level of ``outputs``.
            mask_features = outputs.get("mask_features")
            losses = self._losses(outputs, targets, num_masks, "", mask_features)
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                losses.update(self._losses(aux, targets, num_masks, f"_{i}", mask_features))
        return losses
