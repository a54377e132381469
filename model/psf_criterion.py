"""Panoptic SegFormer's criterion (seed 004): query decoupling, focal + dice, auxiliary boxes.

Targets are the shared ``{"labels": int64[n] (contiguous class ids), "masks": bool[n, H, W]}``
per image; a label is a thing or stuff class by the config's ``thing_classes``.

- **Query decoupling.** Thing queries are matched one-to-one to the thing targets by
  Hungarian matching (``linear_sum_assignment``) with the official costs: 2·focal class
  cost (of the final mask layer's thing logits) + 5·L1 + 2·GIoU (of the location
  decoder's final boxes against the boxes of the target masks) + 2·dice (final masks).
  Stuff query k is always assigned to stuff class k (``stuff_classes[k]``): its target
  is that class's mask when the image has it (several segments of one stuff class are
  merged), otherwise it is unmatched.
- **Losses**, for every mask-decoder layer (deep supervision, one matching shared by all
  layers as in the official head): focal class loss on the thing logits (one-hot of the
  matched class, 0 elsewhere) and on the stuff logits ("class k present"), summed and
  divided by the number of thing / stuff masks (Deformable DETR's normalisation); dice
  loss on the matched thing masks and present stuff masks only (unmatched queries weigh 0
  in L_seg), over full-resolution masks. For every location-decoder layer: focal class,
  L1 and GIoU losses of the matched thing queries' boxes.
- Mask counts are averaged over ranks and clamped to >= 1, as ``SetCriterion.num_masks``.

Keys (already weighted; the caller sums them): ``loss_thing_cls``, ``loss_thing_dice``,
``loss_stuff_cls``, ``loss_stuff_dice`` (``_0``, ``_1``, ... for the earlier mask layers),
``loss_box_cls``, ``loss_box_l1``, ``loss_giou`` (``_loc0``, ... for the earlier location
layers). All math is fp32 with autocast off.
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
    def match(self, outputs: dict, targets: list[DecoupledTargets]) -> list[tuple[Tensor, Tensor]]:
        """Per image (thing query idx, thing target idx), Hungarian on the final outputs."""
        cfg, indices = self.cfg, []
        num_things = outputs["pred_thing_logits"].shape[1]
        boxes = outputs["loc_outputs"][-1]["pred_boxes"] if outputs.get("loc_outputs") else None
        for b, tgt in enumerate(targets):
            n = tgt.thing_labels.numel()
            if n == 0:
                indices.append((torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)))
                continue
            device = outputs["pred_thing_logits"].device
            cost = cfg.class_weight * focal_class_cost(
                outputs["pred_thing_logits"][b], tgt.thing_labels.to(device), cfg.focal_alpha, cfg.focal_gamma
            )
            if boxes is not None:
                pred, gt = boxes[b].float(), tgt.thing_boxes.to(device)
                cost = cost + cfg.box_l1_weight * torch.cdist(pred, gt, p=1)
                giou = generalized_box_iou(box_cxcywh_to_xyxy(pred)[:, None], box_cxcywh_to_xyxy(gt)[None])
                cost = cost - cfg.giou_weight * giou
            masks = outputs["pred_masks"][b, :num_things].float()
            small = F.interpolate(tgt.thing_masks[:, None].to(device, torch.float32), size=masks.shape[-2:],
                                  mode="nearest")[:, 0]  # fmt: skip
            cost = (cost + cfg.dice_weight * batch_dice_loss(masks, small)).cpu()
            if not torch.isfinite(cost).all():
                raise FloatingPointError(
                    "PanopticSegFormerCriterion: non-finite matching cost (outputs diverged)"
                )
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices

    def _mask_layer(self, out: dict, targets: list[DecoupledTargets], indices, image_size, n_thing: float,
                    n_stuff: float, suffix: str) -> dict[str, Tensor]:  # fmt: skip
        cfg = self.cfg
        thing_logits, stuff_logits = out["pred_thing_logits"].float(), out["pred_stuff_logits"].float()
        device, num_things = thing_logits.device, thing_logits.shape[1]
        onehot = torch.zeros_like(thing_logits)
        thing_src, thing_tgt, stuff_src, stuff_tgt = [], [], [], []
        for b, (tgt, (rows, cols)) in enumerate(zip(targets, indices)):
            onehot[b, rows.to(device), tgt.thing_labels[cols].to(device)] = 1.0
            thing_src.append(out["pred_masks"][b, rows.to(device)])
            thing_tgt.append(tgt.thing_masks[cols.to(tgt.thing_masks.device)].to(device))
            present = tgt.stuff_present.bool().nonzero()[:, 0]
            stuff_src.append(out["pred_masks"][b, num_things + present.to(device)])
            stuff_tgt.append(tgt.stuff_masks[present.to(tgt.stuff_masks.device)].to(device))
        present = torch.stack([t.stuff_present for t in targets]).to(device)
        losses = {
            f"loss_thing_cls{suffix}": cfg.class_weight
            * focal_ce_loss(thing_logits, onehot, n_thing, cfg.focal_alpha, cfg.focal_gamma),
            f"loss_stuff_cls{suffix}": cfg.class_weight
            * focal_ce_loss(stuff_logits, present, n_stuff, cfg.focal_alpha, cfg.focal_gamma),
        }
        for kind, src, tgt, count in (
            ("thing", thing_src, thing_tgt, n_thing),
            ("stuff", stuff_src, stuff_tgt, n_stuff),
        ):
            src_all, tgt_all = torch.cat(src), torch.cat(tgt)
            if src_all.shape[0] == 0:
                dice = out["pred_masks"].float().sum() * 0.0  # keeps the graph: every rank must backward
            else:
                dice = fused_dice_loss(upsample_masks(src_all[None], image_size)[0], tgt_all, count)
            losses[f"loss_{kind}_dice{suffix}"] = cfg.dice_weight * dice
        return losses

    def _box_layer(self, out: dict, targets: list[DecoupledTargets], indices, n_thing: float,
                   suffix: str) -> dict[str, Tensor]:  # fmt: skip
        cfg = self.cfg
        logits, boxes = out["pred_box_logits"].float(), out["pred_boxes"].float()
        device = logits.device
        onehot = torch.zeros_like(logits)
        pred, gt = [], []
        for b, (tgt, (rows, cols)) in enumerate(zip(targets, indices)):
            onehot[b, rows.to(device), tgt.thing_labels[cols].to(device)] = 1.0
            pred.append(boxes[b, rows.to(device)])
            gt.append(tgt.thing_boxes[cols].to(device))
        pred_all, gt_all = torch.cat(pred), torch.cat(gt)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(pred_all), box_cxcywh_to_xyxy(gt_all))
        return {
            f"loss_box_cls{suffix}": cfg.box_class_weight
            * focal_ce_loss(logits, onehot, n_thing, cfg.focal_alpha, cfg.focal_gamma),
            f"loss_box_l1{suffix}": cfg.box_l1_weight * (pred_all - gt_all).abs().sum() / n_thing,
            f"loss_giou{suffix}": cfg.giou_weight * (1 - giou).sum() / n_thing,
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
            indices = self.match(outputs, decoupled)
            losses = self._mask_layer(outputs, decoupled, indices, image_size, n_thing, n_stuff, "")
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                losses.update(
                    self._mask_layer(aux, decoupled, indices, image_size, n_thing, n_stuff, f"_{i}")
                )
            loc = outputs.get("loc_outputs", [])
            for i, layer in enumerate(loc):
                suffix = "" if i == len(loc) - 1 else f"_loc{i}"
                losses.update(self._box_layer(layer, decoupled, indices, n_thing, suffix))
        return losses
