"""Panoptic SegFormer's decoders (seed 004, the official panformer head): the location
decoder and the thing / stuff mask decoders.

``LocationDecoder``: Deformable DETR's decoder with iterative box refinement
(``with_box_refine``) over the N thing queries. Each layer does query self-attention,
deformable cross-attention into the encoder tokens around the query's reference (a
learned point per query, then the previous layer's box), and an FFN; a box head and a
class head per layer predict boxes (``cxcywh`` in [0, 1], offsets to the reference in
logit space) and thing-class logits. The boxes refine the next layer's reference; the
last layer's class logits are the things' class scores in inference too.

``MaskDecoder``: queries of one kind attend to the encoder tokens (strides 8/16/32) with
plain multi-head cross-attention, after a query self-attention when asked for (the
official stuff decoder has one, the thing decoder none). Each layer's pre-softmax
attention logits (B×heads×Q×S over the S tokens of all levels) are split by level,
reshaped to each level's H×W, upsampled (bilinear) to the finest level (stride 8),
concatenated over levels and heads and fused by a 1×1 conv into one mask logit per
query (``fuse_attention_maps``; the seed's "a conv". The official ``Attention`` first maps
each level's heads by a Linear(heads, heads) + ReLU and fuses with Linear(3·heads, 1) +
ReLU); stuff query k also gets one class logit per layer
("stuff class k is present"). Every layer predicts (deep supervision); inference reads
the last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.deformable_encoder import DeformableDecoderLayer
from ops.apex_optional import layer_norm
from ops.attention import MultiheadAttention
from ops.config import OpsConfig

MASK_STRIDE = 8  # the masks come out at the finest encoder level


def _focal_prior_bias(linear: nn.Linear, prior: float = 0.01) -> None:
    # Deformable DETR: sigmoid class logits start at p = 0.01 so the focal loss is not
    # swamped by the many easy negatives in the first steps.
    nn.init.constant_(linear.bias, -math.log((1 - prior) / prior))


class GeluFFN(nn.Module):
    """The official mask head's post-norm GELU feed-forward block with its residual (no
    dropout)."""

    def __init__(self, d_model: int, d_ffn: int, ops: OpsConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm = layer_norm(d_model, ops.apex)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.linear2(F.gelu(self.linear1(x))))


class MLP(nn.Module):
    def __init__(self, dim: int, out: int, layers: int) -> None:
        super().__init__()
        dims = [dim] * layers + [out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def box_head(d_model: int) -> MLP:
    """Deformable DETR's 3-layer box MLP; its last layer starts at zero (box = reference)."""
    head = MLP(d_model, 4, 3)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    return head


def refine_boxes(delta: Tensor, reference: Tensor) -> Tensor:
    """Box-head output + reference in logit space -> fp32 ``cxcywh`` boxes in [0, 1]. A
    2-value reference (a point) moves the centre only; the size comes from ``delta``."""
    delta = delta.float()
    if reference.shape[-1] == 4:
        return (delta + torch.logit(reference, eps=1e-5)).sigmoid()
    centre = delta[..., :2] + torch.logit(reference, eps=1e-5)
    return torch.cat((centre, delta[..., 2:]), -1).sigmoid()


class LocationDecoder(nn.Module):
    """``forward(memory B×S×C, spatial_shapes, level_start_index)`` -> ``(thing queries
    B×N×C, [{"pred_boxes": B×N×4, "pred_box_logits": B×N×K_thing}] per layer, first to
    last — only the last outside training)``. The last layer's class logits are the
    things' class scores (the official ``get_bboxes``)."""

    def __init__(self, num_queries: int, d_model: int, nheads: int, d_ffn: int, dropout: float, layers: int,
                 levels: int, points: int, num_thing_classes: int, ops: OpsConfig) -> None:  # fmt: skip
        super().__init__()
        self.query_embed = nn.Embedding(num_queries, 2 * d_model)  # positional half, content half
        self.reference_points = nn.Linear(d_model, 2)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(d_model, d_ffn, dropout, levels, nheads, points, ops)
            for _ in range(layers)
        )
        # One box and one class head per layer (with_box_refine clones them).
        self.box_heads = nn.ModuleList(box_head(d_model) for _ in range(layers))
        # Deformable DETR: the first layer's boxes start small (sigmoid(-2) = 0.12 of the image).
        nn.init.constant_(self.box_heads[0].layers[-1].bias[2:], -2.0)
        self.class_heads = nn.ModuleList(nn.Linear(d_model, num_thing_classes) for _ in range(layers))
        for head in self.class_heads:
            _focal_prior_bias(head)

    def forward(
        self, memory: Tensor, spatial_shapes: Tensor, level_start_index: Tensor
    ) -> tuple[Tensor, list]:
        batch, levels = memory.shape[0], spatial_shapes.shape[0]
        query_pos, tgt = self.query_embed.weight[None].expand(batch, -1, -1).chunk(2, -1)
        reference = self.reference_points(query_pos).float().sigmoid()  # B×N×2 (x, y)
        predictions = []
        for i, (layer, boxes_of, classes_of) in enumerate(zip(self.layers, self.box_heads, self.class_heads)):
            per_level = reference[:, :, None].expand(-1, -1, levels, -1)
            tgt = layer(tgt, query_pos, per_level, memory, spatial_shapes, level_start_index)
            boxes = refine_boxes(boxes_of(tgt), reference)
            if self.training or i == len(self.layers) - 1:  # the last class logits score the things
                predictions.append({"pred_boxes": boxes, "pred_box_logits": classes_of(tgt)})
            reference = boxes.detach()  # gradients do not flow through the references
        return tgt, predictions


def fuse_attention_maps(logits: Tensor, shapes: Sequence[tuple[int, int]]) -> Tensor:
    """B×heads×Q×S attention logits over the tokens of ``shapes`` (levels coarse to fine,
    ``sum(h*w) == S``) -> B×Q×(levels·heads)×H×W at the largest level's H×W: each level's
    slice reshaped to its map and upsampled (bilinear), concatenated level-major."""
    batch, heads, queries, tokens = logits.shape
    if tokens != sum(h * w for h, w in shapes):
        raise ValueError(f"fuse_attention_maps: {tokens} tokens for level shapes {list(shapes)}")
    target = max(shapes, key=lambda s: s[0] * s[1])
    maps = []
    for level, (h, w) in zip(logits.split([h * w for h, w in shapes], -1), shapes):
        level = level.reshape(batch * heads, queries, h, w)
        if (h, w) != target:
            level = F.interpolate(level, size=target, mode="bilinear", align_corners=False)
        maps.append(level.view(batch, heads, queries, *target).transpose(1, 2))
    return torch.cat(maps, 2)


class MaskDecoderLayer(nn.Module):
    """Optional query self-attention, cross-attention returning its pre-softmax logits (which
    the ops attention entry point does not give: computed here), GELU FFN (post-norm: the
    official MaskHead's Block)."""

    def __init__(self, d_model: int, nheads: int, d_ffn: int, self_attention: bool, ops: OpsConfig) -> None:
        super().__init__()
        self.nheads = nheads
        self.self_attn = None
        if self_attention:
            self.self_attn = MultiheadAttention(d_model, nheads, 0.0, backend=ops.attention_backend,
                                                max_matrix_mib=ops.attention_max_matrix_mib)  # fmt: skip
            self.norm0 = layer_norm(d_model, ops.apex)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.norm1 = layer_norm(d_model, ops.apex)
        self.ffn = GeluFFN(d_model, d_ffn, ops)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], self.nheads, -1).transpose(1, 2)

    def forward(
        self, tgt: Tensor, query_pos: Tensor | None, memory: Tensor, memory_pos: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """-> (queries B×Q×C, attention logits B×heads×Q×S). Positions are optional: the
        official heads give none to the memory, nor to the thing queries."""
        query = tgt if query_pos is None else tgt + query_pos
        if self.self_attn is not None:
            tgt = self.norm0(tgt + self.self_attn(query, query, tgt))
            query = tgt if query_pos is None else tgt + query_pos
        key = memory if memory_pos is None else memory + memory_pos
        q, k, v = (
            self._heads(self.q_proj(query)),
            self._heads(self.k_proj(key)),
            self._heads(self.v_proj(memory)),
        )
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        # Softmax in fp32: S is thousands of tokens at stride 8.
        attended = (logits.float().softmax(-1).to(v.dtype) @ v).transpose(1, 2).flatten(2)
        tgt = self.norm1(tgt + self.out_proj(attended))
        return self.ffn(tgt), logits


class MaskDecoder(nn.Module):
    """One query kind's mask decoder. ``forward(queries B×Q×C, query_pos B×Q×C | None,
    memory B×S×C, shapes)`` -> ``{"masks": B×Q×H/8×W/8 (logits)[, "logits":
    B×Q×num_outputs]}`` per layer and then the final one (every layer in training, else
    only the final). The final masks come from one more attention map after the last
    layer (the official ``AttentionTail``: query and key projections only), the final
    class logits from the last layer's queries (so the last layer's own dict has masks
    only: each head is supervised once). Class heads only when ``num_outputs`` is given:
    the official thing-mask class heads are trained with weight 0 and unused in
    inference (``model/panoptic_segformer.py``), so the thing decoder has none."""

    def __init__(self, d_model: int, nheads: int, d_ffn: int, layers: int, num_levels: int,
                 num_outputs: int | None, self_attention: bool, ops: OpsConfig) -> None:  # fmt: skip
        super().__init__()
        self.nheads = nheads
        self.layers = nn.ModuleList(
            MaskDecoderLayer(d_model, nheads, d_ffn, self_attention, ops) for _ in range(layers)
        )
        self.tail_q_proj = nn.Linear(d_model, d_model)
        self.tail_k_proj = nn.Linear(d_model, d_model)
        # One 1×1 fusion conv per attention map (layers + tail): each means something else.
        self.mask_fusion = nn.ModuleList(nn.Conv2d(num_levels * nheads, 1, 1) for _ in range(layers + 1))
        self.class_heads = None
        if num_outputs is not None:
            self.class_heads = nn.ModuleList(nn.Linear(d_model, num_outputs) for _ in range(layers))
            for head in self.class_heads:
                _focal_prior_bias(head)

    def _masks(self, logits: Tensor, shapes: Sequence[tuple[int, int]], fusion: nn.Conv2d) -> Tensor:
        maps = fuse_attention_maps(logits, shapes)  # B×Q×(L·heads)×H×W
        return fusion(maps.flatten(0, 1)).view(*maps.shape[:2], *maps.shape[-2:])

    def forward(self, queries: Tensor, query_pos: Tensor | None, memory: Tensor,
                shapes: Sequence[tuple[int, int]]) -> list[dict]:  # fmt: skip
        outputs = []
        for i, layer in enumerate(self.layers):
            queries, logits = layer(queries, query_pos, memory, None)
            if self.training:
                out = {"masks": self._masks(logits, shapes, self.mask_fusion[i])}
                if self.class_heads is not None and i < len(self.layers) - 1:
                    out["logits"] = self.class_heads[i](queries)  # the last layer's: in the final
                outputs.append(out)
        query = queries if query_pos is None else queries + query_pos
        k = self.tail_k_proj(memory).view(*memory.shape[:2], self.nheads, -1).transpose(1, 2)
        q = self.tail_q_proj(query).view(*query.shape[:2], self.nheads, -1).transpose(1, 2)
        final = {"masks": self._masks((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]), shapes,
                                      self.mask_fusion[-1])}  # fmt: skip
        if self.class_heads is not None:
            final["logits"] = self.class_heads[-1](queries)
        return outputs + [final]


def upsample_masks(pred_masks: Tensor, image_size: Sequence[int]) -> Tensor:
    """B×Q×⌈H/8⌉×⌈W/8⌉ mask logits -> fp32 B×Q×H×W logits aligned to the H×W input
    (bilinear to 8·h×8·w, then cropped, as ``model.inference.upsample_mask_logits`` does
    at stride 4)."""
    height, width = int(image_size[0]), int(image_size[1])
    h, w = pred_masks.shape[-2:]
    if (h, w) != (-(-height // MASK_STRIDE), -(-width // MASK_STRIDE)):
        raise ValueError(
            f"pred_masks are {h}×{w}, not the stride-{MASK_STRIDE} map of a {height}×{width} image"
        )
    with torch.autocast(device_type=pred_masks.device.type, enabled=False):
        masks = F.interpolate(pred_masks.float(), size=(h * MASK_STRIDE, w * MASK_STRIDE), mode="bilinear",
                              align_corners=False)  # fmt: skip
        return masks[..., :height, :width]
