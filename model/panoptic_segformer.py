"""Panoptic SegFormer (seed 004, the official panformer head): backbone -> deformable
encoder -> location decoder -> thing and stuff mask decoders.

The backbone's stride-8/16/32 maps are projected to ``hidden_dim`` (1×1 conv +
GroupNorm), plus a stride-64 level (``extra_level``, the official ChannelMapper's extra
3×3 stride-2 conv), flattened into one token sequence and refined by a Deformable DETR
encoder (``MSDeformAttnEncoderLayer``, the layer of our Mask2Former pixel decoder). The
location decoder turns N learned thing queries into location-aware ones (box refinement;
its last class head scores the things); the thing mask decoder takes
those, the stuff mask decoder one fixed query per stuff class, and both predict masks
from their attention maps over strides 8/16/32 (``model/psf_decoders.py``). Matching and
losses: ``model/psf_criterion.py``; panoptic merging:
``model.panoptic_inference.mask_wise_merge`` on ``query_class_probs`` and the sigmoid masks.

Left out of the official head (its attention-only last mask layer, ``AttentionTail``, is
kept: ``MaskDecoder``'s tail): the thing mask decoder's class and box heads (trained with weight 0 there, and unused in
inference), and the pre-filtering of thing queries by a one-to-many location matching
(up to 3 queries per object) before the mask decoder, a memory saving; here every thing
query is decoded and one Hungarian matching (with the dice cost) serves the last
location layer and the mask layers. Inputs are assumed unpadded (no padding mask), as in
our other models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from model.config import PanopticInferenceConfig, PanopticSegFormerConfig
from model.deformable_encoder import DeformableEncoder
from model.maskformer import NormalizedInput
from model.panoptic_inference import Segments, mask_wise_merge_from_config
from model.psf_decoders import MASK_STRIDE, LocationDecoder, MaskDecoder, upsample_masks
from ops.config import OpsConfig


def split_classes(thing_classes: Sequence[int], num_classes: int) -> tuple[list[int], list[int]]:
    """(sorted thing classes, sorted stuff classes = every other class of ``num_classes``)."""
    things = sorted({int(c) for c in thing_classes})
    if len(things) != len(thing_classes) or (things and (things[0] < 0 or things[-1] >= num_classes)):
        raise ValueError(
            f"model.panoptic_segformer.thing_classes must be distinct ids in [0, {num_classes}), got {list(thing_classes)}"
        )
    stuff = [c for c in range(num_classes) if c not in set(things)]
    if not things or not stuff:
        raise ValueError("Panoptic SegFormer needs at least one thing class and one stuff class")
    return things, stuff


class PanopticSegFormerHead(nn.Module):
    """The official ``PanformerHead`` after the encoder: location decoder, thing and stuff
    mask decoders, the stuff queries. ``forward(memory, pos, shapes, spatial_shapes,
    level_start_index)`` -> the model's output dict (see ``PanopticSegFormer``)."""

    def __init__(self, cfg: PanopticSegFormerConfig, levels: int, num_things: int, num_stuff: int,
                 ops: OpsConfig) -> None:  # fmt: skip
        super().__init__()
        d = cfg.hidden_dim
        self.skip_levels = int(cfg.extra_level)  # the mask decoders skip the stride-64 level
        mask_levels = levels - self.skip_levels
        self.location_decoder = LocationDecoder(cfg.num_queries, d, cfg.nheads, cfg.dim_feedforward, cfg.dropout,
                                                cfg.location_layers, levels, cfg.num_points, num_things, ops)  # fmt: skip
        self.thing_decoder = MaskDecoder(d, cfg.nheads, cfg.dim_feedforward, cfg.thing_mask_layers, mask_levels,
                                         None, self_attention=False, ops=ops)  # fmt: skip
        self.stuff_decoder = MaskDecoder(d, cfg.nheads, cfg.dim_feedforward, cfg.stuff_mask_layers, mask_levels, 1,
                                         self_attention=True, ops=ops)  # fmt: skip
        self.stuff_queries = nn.Embedding(num_stuff, 2 * d)  # content half, positional half

    def forward(self, memory: Tensor, shapes: list[tuple[int, int]], spatial_shapes: Tensor,
                level_start_index: Tensor) -> dict:  # fmt: skip
        batch = memory.shape[0]
        things, loc_outputs = self.location_decoder(memory, spatial_shapes, level_start_index)
        start = sum(h * w for h, w in shapes[: self.skip_levels])  # from the shapes: no device sync
        mask_memory, mask_shapes = memory[:, start:], shapes[self.skip_levels :]
        # As the official heads: no positions on the memory or the thing queries (their
        # location is in their content now); the stuff queries have learned ones.
        thing_layers = self.thing_decoder(things, None, mask_memory, mask_shapes)
        stuff, stuff_pos = self.stuff_queries.weight[None].expand(batch, -1, -1).to(memory.dtype).chunk(2, -1)
        stuff_layers = self.stuff_decoder(stuff, stuff_pos, mask_memory, mask_shapes)
        out = {
            "pred_thing_logits": loc_outputs[-1]["pred_box_logits"],
            "pred_stuff_logits": stuff_layers[-1]["logits"][..., 0],
            "pred_masks": torch.cat((thing_layers[-1]["masks"], stuff_layers[-1]["masks"]), 1),
        }
        if self.training:
            out["thing_aux_outputs"] = thing_layers[:-1]
            out["stuff_aux_outputs"] = stuff_layers[:-1]
            out["loc_outputs"] = loc_outputs
        return out


class PanopticSegFormer(NormalizedInput):
    """``forward(images: B×3×H×W, 0..255)`` -> ``{"pred_thing_logits": B×N×K_thing (the
    location decoder's last class head, which scores the things as in the official
    ``get_bboxes``), "pred_stuff_logits": B×K_stuff, "pred_masks": B×(N+K_stuff)×⌈H/8⌉×⌈W/8⌉
    (logits; thing queries first, then stuff query k = ``stuff_classes[k]``)}`` from the
    final output of each mask decoder; in training also ``"thing_aux_outputs"`` /
    ``"stuff_aux_outputs"`` (each mask-decoder layer's own: ``{"masks"[, "logits"]}``)
    and ``"loc_outputs"`` (per location-decoder layer ``{"pred_boxes": B×N×4 cxcywh in
    [0, 1], "pred_box_logits": B×N×K_thing}``, last layer last).

    Class logits are sigmoid logits (focal loss); thing logit j is class ``thing_classes[j]``.
    The attribute name ``backbone`` is relied on by the optimizer (lower backbone lr).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, cfg: PanopticSegFormerConfig,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], ops: OpsConfig | None = None) -> None:  # fmt: skip
        ops = ops or OpsConfig()
        thing_classes, stuff_classes = split_classes(cfg.thing_classes, num_classes)
        strides = list(getattr(backbone, "strides", [MASK_STRIDE]))
        if strides[0] != MASK_STRIDE:
            raise ValueError(
                f"Panoptic SegFormer reads the backbone's strides 8/16/32, got strides {strides}: set "
                "model.backbone.out_indices to [2, 3, 4] (ResNet) or [1, 2, 3] (Swin)"
            )
        if cfg.hidden_dim % 4 or cfg.hidden_dim % cfg.nheads:
            raise ValueError(f"model.panoptic_segformer: hidden_dim {cfg.hidden_dim} must be a multiple of 4 "
                             f"and of nheads {cfg.nheads}")  # fmt: skip
        for key in ("num_queries", "encoder_layers", "location_layers", "thing_mask_layers", "stuff_mask_layers",
                    "num_points"):  # fmt: skip
            if getattr(cfg, key) < 1:
                raise ValueError(f"model.panoptic_segformer.{key} must be >= 1, got {getattr(cfg, key)}")
        encoder = DeformableEncoder(backbone.channels, cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward, cfg.dropout,
                                    cfg.encoder_layers, cfg.num_points, ops, extra_level=cfg.extra_level)  # fmt: skip
        head = PanopticSegFormerHead(cfg, encoder.num_levels, len(thing_classes), len(stuff_classes), ops)
        # NormalizedInput's slots: the deformable encoder is the "pixel decoder" (as in
        # Mask2Former), the head with its three decoders the "predictor".
        super().__init__(backbone, encoder, head, pixel_mean, pixel_std)
        self.thing_classes, self.stuff_classes = thing_classes, stuff_classes

    def forward(self, images: Tensor) -> dict:
        features = self.backbone(self.normalize(images))
        memory, _, shapes, spatial_shapes, level_start_index = self.pixel_decoder(features)
        # The encoder's positions stay inside it: the decoders attend without them.
        return self.predictor(memory, shapes, spatial_shapes, level_start_index)


def query_class_probs(outputs: dict, thing_classes: Sequence[int], stuff_classes: Sequence[int]) -> Tensor:
    """B×Q×K sigmoid class probabilities over all K classes, one row per query (the order
    of ``pred_masks``): a thing query's row holds its thing-class probabilities, stuff query
    k's row only the probability of ``stuff_classes[k]``, every other entry 0. What
    ``mask_wise_merge`` ranks and labels the masks by."""
    things = outputs["pred_thing_logits"].float().sigmoid()
    stuff = outputs["pred_stuff_logits"].float().sigmoid()
    batch, num_things = things.shape[:2]
    num_classes = len(thing_classes) + len(stuff_classes)
    probs = things.new_zeros(batch, num_things + stuff.shape[1], num_classes)
    probs[:, :num_things, list(thing_classes)] = things
    rows = torch.arange(stuff.shape[1], device=probs.device) + num_things
    probs[:, rows, torch.as_tensor(list(stuff_classes), device=probs.device)] = stuff
    return probs


def panoptic_segformer_panoptic(outputs: dict, image_size: Sequence[int], thing_classes: Sequence[int],
                                stuff_classes: Sequence[int],
                                cfg: PanopticInferenceConfig | None = None) -> list[tuple[Tensor, Segments]]:  # fmt: skip
    """Eval-mode outputs of an ``image_size`` (H, W) batch -> one ``(id_map, segments)``
    per image by the paper's mask-wise merging (``model.panoptic_inference.mask_wise_merge``)
    of the sigmoid class probabilities and the sigmoid masks aligned to the input."""
    cfg = cfg or PanopticInferenceConfig()
    probs = query_class_probs(outputs, thing_classes, stuff_classes)
    masks = upsample_masks(outputs["pred_masks"], image_size).sigmoid()
    things = set(thing_classes)
    is_thing = [c in things for c in range(probs.shape[-1])]
    num_things = outputs["pred_thing_logits"].shape[1]
    results = []
    for b in range(masks.shape[0]):
        candidates, candidate_masks = thing_detections(probs[b, :num_things], masks[b, :num_things],
                                                       thing_classes, cfg.max_thing_detections)  # fmt: skip
        results.append(mask_wise_merge_from_config(torch.cat([candidates, probs[b, num_things:]]),
                                                   torch.cat([candidate_masks, masks[b, num_things:]]), is_thing,
                                                   cfg))  # fmt: skip
    return results


def thing_detections(probs: Tensor, masks: Tensor, thing_classes: Sequence[int], limit: int) -> tuple[Tensor, Tensor]:
    """The thing candidates of one image, as the official test picks them (mmdet's
    ``max_per_img``): of the Q×K class probabilities (``query_class_probs`` rows of the thing
    queries), the ``limit`` highest (query, thing class) pairs, each a row holding only its
    class's probability, with its query's mask. A query may enter twice, with two classes;
    ``limit`` 0 (or at least Q × classes) keeps every query with all its classes, which the
    merge ranks by the best."""
    columns = torch.as_tensor(list(thing_classes), device=probs.device)
    scores = probs[:, columns]
    if limit <= 0 or limit >= scores.numel():
        return probs, masks
    top, flat = scores.reshape(-1).topk(limit)
    query, column = flat // scores.shape[1], flat % scores.shape[1]
    rows = probs.new_zeros(limit, probs.shape[1])
    rows[torch.arange(limit, device=probs.device), columns[column]] = top
    return rows, masks[query]
