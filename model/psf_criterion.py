"""Panoptic SegFormer's criterion (seed 004): query decoupling, focal + dice, location boxes.

Targets are the shared ``{"labels": int64[n] (contiguous class ids), "masks": bool[n, H, W]}``
per image; a label is a thing or stuff class by the config's ``thing_classes``.

- **Query decoupling.** Thing queries are matched one-to-one to the thing targets by
  Hungarian matching (``linear_sum_assignment``) with the official costs (its
  ``HungarianAssigner_multi_info``): 2·focal class cost (of the location decoder's last
  class logits) + 5·L1 + 2·GIoU (of its last boxes against the boxes of the target
  masks) + 2·dice (the thing mask decoder's last masks). Stuff query k is always
  assigned to stuff class k (``stuff_classes[k]``): its target is that class's mask when
  the image has it (several segments of one stuff class are merged), else it is unmatched.
- **Losses** (the official ``loss_single_panoptic``). For every mask of the thing mask
  decoder (each layer's and the final one; one matching shared by all of them): dice on
  the matched masks; for every stuff mask: dice on the present classes' masks, and for
  every stuff class head the focal class loss ("class k present", weight
  ``stuff_class_weight`` = the official 2 × 2). Every location-decoder
  layer: focal class loss on the thing logits (one-hot of the matched class, 0
  elsewhere) and L1 + GIoU on the matched boxes; its last layer uses the shared
  matching, each earlier one is matched on its own (class + L1 + GIoU costs, the
  official ``loss_single``). Focal and box losses are divided by the number of thing /
  stuff masks (Deformable DETR's normalisation); unmatched queries weigh 0 in L_seg;
  masks are compared at full resolution. Then, as the official head, every thing term
  is scaled by n_thing / (n_thing + n_stuff) and every stuff term by n_stuff / (n_thing
  + n_stuff), so an image's loss balances its things against its stuff.
- Mask counts are averaged over ranks and clamped to >= 1, as ``SetCriterion.num_masks``.

Keys (already weighted; the caller sums them): ``loss_thing_dice``, ``loss_stuff_cls``,
``loss_stuff_dice`` (the final masks; ``_0``, ``_1``, ... for each layer's own), ``loss_thing_cls``,
``loss_box_l1``, ``loss_giou`` (``_loc0``, ... for the earlier location layers). All
math is fp32 with autocast off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from model.config import PanopticSegFormerConfig
from model.panoptic_segformer import split_classes
from model.psf_decoders import upsample_masks
from ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou, masks_to_boxes
from ops.fused_losses import fused_dice_loss
from ops.losses import batch_dice_loss, focal_ce_loss


@dataclass
class DecoupledTargets:
    """One image's targets split by query kind."""

    thing_labels: Tensor  # int64[n_t], index into thing_classes
    thing_masks: Tensor  # bool[n_t, H, W]
    thing_boxes: Tensor  # float32[n_t, 4], cxcywh in [0, 1]
    stuff_present: Tensor  # float32[K_stuff], 1 where the image has that stuff class
    stuff_masks: Tensor  # bool[K_stuff, H, W], all-False for absent classes


def decouple_targets(
    target: dict, thing_classes: Sequence[int], stuff_classes: Sequence[int]
) -> DecoupledTargets:
    labels, masks = target["labels"].to("cpu", torch.int64), target["masks"]
    lookup = torch.full((len(thing_classes) + len(stuff_classes),), -1, dtype=torch.int64)
    lookup[list(thing_classes)] = torch.arange(len(thing_classes))
    stuff_lookup = torch.full_like(lookup, -1)
    stuff_lookup[list(stuff_classes)] = torch.arange(len(stuff_classes))
    if labels.numel() and (labels.min() < 0 or labels.max() >= lookup.numel()):
        raise ValueError(f"PanopticSegFormerCriterion: label out of range [0, {lookup.numel()})")
    is_thing = lookup[labels] >= 0
    thing_masks = masks[is_thing.to(masks.device)]
    stuff_masks = masks.new_zeros(len(stuff_classes), *masks.shape[-2:])
    stuff_present = torch.zeros(len(stuff_classes))
    for i in (~is_thing).nonzero()[:, 0].tolist():
        k = int(stuff_lookup[labels[i]])
        stuff_masks[k] |= masks[i]
        stuff_present[k] = 1.0
    return DecoupledTargets(lookup[labels[is_thing]], thing_masks, masks_to_boxes(thing_masks), stuff_present,
                            stuff_masks)  # fmt: skip


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """Q×n: Deformable DETR's focal classification cost of predicting ``labels[j]`` with query i."""
    prob = logits.float().sigmoid()
    neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    return (pos - neg)[:, labels]


class PanopticSegFormerCriterion(nn.Module):
    def __init__(self, num_classes: int, cfg: PanopticSegFormerConfig) -> None:
        super().__init__()
        self.thing_classes, self.stuff_classes = split_classes(cfg.thing_classes, num_classes)
        self.cfg = cfg

    @staticmethod
    def _count(count: float, device: torch.device) -> float:
        total = torch.tensor([count], dtype=torch.float32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            total = total / dist.get_world_size()
        return max(float(total.item()), 1.0)

    @torch.no_grad()
    def match(self, thing_logits: Tensor, boxes: Tensor | None, masks: Tensor | None,
              targets: list[DecoupledTargets]) -> list[tuple[Tensor, Tensor]]:  # fmt: skip
        """Per image (thing query idx, thing target idx): Hungarian matching on the focal
        class cost of ``thing_logits`` (B×N×K_thing) plus, when given, the L1 + GIoU cost of
        ``boxes`` (B×N×4) and the dice cost of ``masks`` (B×N×h×w logits)."""
        cfg, indices, device = self.cfg, [], thing_logits.device
        for b, tgt in enumerate(targets):
            if tgt.thing_labels.numel() == 0:
                indices.append((torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)))
                continue
            labels = tgt.thing_labels.to(device)
            cost = cfg.class_weight * focal_class_cost(
                thing_logits[b], labels, cfg.focal_alpha, cfg.focal_gamma
            )
            if boxes is not None:
                pred, gt = boxes[b].float(), tgt.thing_boxes.to(device)
                cost = cost + cfg.box_l1_weight * torch.cdist(pred, gt, p=1)
                giou = generalized_box_iou(box_cxcywh_to_xyxy(pred)[:, None], box_cxcywh_to_xyxy(gt)[None])
                cost = cost - cfg.giou_weight * giou
            if masks is not None:
                pred_masks = masks[b].float()
                small = F.interpolate(tgt.thing_masks[:, None].to(device, torch.float32), size=pred_masks.shape[-2:],
                                      mode="nearest")[:, 0]  # fmt: skip
                cost = cost + cfg.dice_weight * batch_dice_loss(pred_masks, small)
            cost = cost.cpu()
            if not torch.isfinite(cost).all():
                raise FloatingPointError(
                    "PanopticSegFormerCriterion: non-finite matching cost (outputs diverged)"
                )
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices

    def _dice(self, masks: Tensor, targets: list[Tensor], image_size, count: float) -> Tensor:
        """Dice of the selected B-concatenated mask logits against their full-size targets."""
        src, tgt = torch.cat(masks), torch.cat(targets)
        if src.shape[0] == 0:
            return sum(m.float().sum() for m in masks) * 0.0  # keeps the graph: every rank must backward
        return fused_dice_loss(upsample_masks(src[None], image_size)[0], tgt, count)

    def _box_terms(self, boxes: Tensor, targets: list[DecoupledTargets], indices, n_thing: float
                   ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(L1, GIoU) losses of the matched ``boxes`` (B×N×4), each summed / ``n_thing``."""
        pred, gt = [], []
        for b, (tgt, (rows, cols)) in enumerate(zip(targets, indices)):
            pred.append(boxes[b, rows.to(boxes.device)].float())
            gt.append(tgt.thing_boxes[cols].to(boxes.device))
        pred_all, gt_all = torch.cat(pred), torch.cat(gt)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(pred_all), box_cxcywh_to_xyxy(gt_all))
        return (pred_all - gt_all).abs().sum() / n_thing, (1 - giou).sum() / n_thing

    def _thing_class(
        self, logits: Tensor, targets: list[DecoupledTargets], indices, n_thing: float
    ) -> Tensor:
        logits = logits.float()
        onehot = torch.zeros_like(logits)
        for b, (tgt, (rows, cols)) in enumerate(zip(targets, indices)):
            onehot[b, rows.to(logits.device), tgt.thing_labels[cols].to(logits.device)] = 1.0
        return focal_ce_loss(logits, onehot, n_thing, self.cfg.focal_alpha, self.cfg.focal_gamma)

    def _thing_layer(self, layer: dict, targets: list[DecoupledTargets], indices, image_size, n_thing: float,
                     suffix: str) -> dict[str, Tensor]:  # fmt: skip
        masks = layer["masks"]
        selected = [masks[b, rows.to(masks.device)] for b, (rows, _) in enumerate(indices)]
        matched = [t.thing_masks[cols.to(t.thing_masks.device)].to(masks.device) for t, (_, cols) in
                   zip(targets, indices)]  # fmt: skip
        return {
            f"loss_thing_dice{suffix}": self.cfg.dice_weight
            * self._dice(selected, matched, image_size, n_thing)
        }

    def _stuff_layer(self, layer: dict, targets: list[DecoupledTargets], image_size, n_stuff: float,
                     suffix: str) -> dict[str, Tensor]:  # fmt: skip
        """Dice of the present classes' masks, and the focal class loss when the layer has
        class logits (the last layer's are the final output's)."""
        cfg, masks = self.cfg, layer["masks"]
        present = [t.stuff_present.bool().nonzero()[:, 0] for t in targets]
        selected = [masks[b, p.to(masks.device)] for b, p in enumerate(present)]
        wanted = [
            t.stuff_masks[p.to(t.stuff_masks.device)].to(masks.device) for t, p in zip(targets, present)
        ]
        losses = {
            f"loss_stuff_dice{suffix}": cfg.dice_weight * self._dice(selected, wanted, image_size, n_stuff)
        }
        if "logits" in layer:
            logits = layer["logits"].float()[..., 0]
            presence = torch.stack([t.stuff_present for t in targets]).to(logits.device)
            losses[f"loss_stuff_cls{suffix}"] = cfg.stuff_class_weight * focal_ce_loss(
                logits, presence, n_stuff, cfg.focal_alpha, cfg.focal_gamma
            )
        return losses

    def _location_layer(self, layer: dict, targets: list[DecoupledTargets], indices, n_thing: float,
                        suffix: str) -> dict[str, Tensor]:  # fmt: skip
        cfg = self.cfg
        l1, giou = self._box_terms(layer["pred_boxes"], targets, indices, n_thing)
        return {
            f"loss_thing_cls{suffix}": cfg.class_weight
            * self._thing_class(layer["pred_box_logits"], targets, indices, n_thing),
            f"loss_box_l1{suffix}": cfg.box_l1_weight * l1,
            f"loss_giou{suffix}": cfg.giou_weight * giou,
        }

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        device = outputs["pred_thing_logits"].device
        if len(targets) != outputs["pred_thing_logits"].shape[0]:
            raise ValueError(f"PanopticSegFormerCriterion: {outputs['pred_thing_logits'].shape[0]} images but "
                             f"{len(targets)} targets")  # fmt: skip
        sizes = {tuple(t["masks"].shape[-2:]) for t in targets}
        if len(sizes) != 1:
            raise ValueError(
                f"PanopticSegFormerCriterion: target masks of one batch must share one size, got {sizes}"
            )
        image_size = sizes.pop()
        with torch.autocast(device_type=device.type, enabled=False):
            decoupled = [decouple_targets(t, self.thing_classes, self.stuff_classes) for t in targets]
            n_thing = self._count(sum(t.thing_labels.numel() for t in decoupled), device)
            n_stuff = self._count(sum(float(t.stuff_present.sum()) for t in decoupled), device)
            loc = outputs.get("loc_outputs", [])
            final = loc[-1] if loc else {}
            indices = self.match(final.get("pred_box_logits", outputs["pred_thing_logits"]), final.get("pred_boxes"),
                                 outputs["pred_masks"][:, : outputs["pred_thing_logits"].shape[1]], decoupled)  # fmt: skip
            num_things = outputs["pred_thing_logits"].shape[1]
            last_things = {"masks": outputs["pred_masks"][:, :num_things]}
            last_stuff = {"logits": outputs["pred_stuff_logits"][..., None],
                          "masks": outputs["pred_masks"][:, num_things:]}  # fmt: skip
            losses = self._thing_layer(last_things, decoupled, indices, image_size, n_thing, "")
            losses.update(self._stuff_layer(last_stuff, decoupled, image_size, n_stuff, ""))
            for i, layer in enumerate(outputs.get("thing_aux_outputs", [])):
                losses.update(self._thing_layer(layer, decoupled, indices, image_size, n_thing, f"_{i}"))
            for i, layer in enumerate(outputs.get("stuff_aux_outputs", [])):
                losses.update(self._stuff_layer(layer, decoupled, image_size, n_stuff, f"_{i}"))
            for i, layer in enumerate(loc):
                if i == len(loc) - 1:
                    losses.update(self._location_layer(layer, decoupled, indices, n_thing, ""))
                else:
                    own = self.match(layer["pred_box_logits"], layer["pred_boxes"], None, decoupled)
                    losses.update(self._location_layer(layer, decoupled, own, n_thing, f"_loc{i}"))
            thing_ratio = n_thing / (n_thing + n_stuff)
        return {
            k: v * ((1 - thing_ratio) if k.startswith("loss_stuff") else thing_ratio)
            for k, v in losses.items()
        }
