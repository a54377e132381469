"""Panoptic SegFormer's two decoders (seed 004): the location decoder and the mask decoder.

``LocationDecoder``: Deformable DETR's decoder over the N thing queries. Each layer does
query self-attention, deformable cross-attention into the encoder tokens around the
query's reference point (a learned point per query), and an FFN. It returns the
location-aware thing queries; in training it also returns, for every layer (deep
supervision), the auxiliary head's boxes (``cxcywh`` in [0, 1], offsets added to the
reference point in logit space) and thing-class logits. That head is unused in inference.

``MaskDecoder``: thing queries (from the location decoder) and stuff queries (one per
stuff class) attend to the encoder tokens with plain multi-head cross-attention. Each
layer's pre-softmax attention logits (B×heads×Q×S over the S tokens of all levels) are
split by level, reshaped to each level's H×W, upsampled (bilinear) to the finest level
(stride 8), concatenated over levels and heads and fused by a 1×1 conv into one mask
logit per query (``fuse_attention_maps``). A linear head per query kind gives the class
logits: thing queries over the thing classes, each stuff query one logit for its own
class. Every layer predicts (deep supervision); inference reads the last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ops.apex_optional import layer_norm
from ops.config import OpsConfig
from ops.ms_deform_attn import MSDeformAttn

MASK_STRIDE = 8  # the masks come out at the finest encoder level


def _focal_prior_bias(linear: nn.Linear, prior: float = 0.01) -> None:
    # Deformable DETR: sigmoid class logits start at p = 0.01 so the focal loss is not
    # swamped by the many easy negatives in the first steps.
    nn.init.constant_(linear.bias, -math.log((1 - prior) / prior))


class FFN(nn.Module):
    """Post-norm ReLU feed-forward block with its residual."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, ops: OpsConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = layer_norm(d_model, ops.apex)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class LocationDecoderLayer(nn.Module):
    def __init__(self, d_model: int, nheads: int, d_ffn: int, dropout: float, levels: int, points: int,
                 ops: OpsConfig) -> None:  # fmt: skip
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout, batch_first=True)
        self.norm1 = layer_norm(d_model, ops.apex)
        self.cross_attn = MSDeformAttn(d_model, levels, nheads, points, implementation=ops.deform_attn)
        self.norm2 = layer_norm(d_model, ops.apex)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(d_model, d_ffn, dropout, ops)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor) -> Tensor:  # fmt: skip
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attended = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index
        )
        tgt = self.norm2(tgt + self.dropout(attended))
        return self.ffn(tgt)


class MLP(nn.Module):
    def __init__(self, dim: int, out: int, layers: int) -> None:
        super().__init__()
        dims = [dim] * layers + [out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class LocationDecoder(nn.Module):
    """``forward(memory B×S×C, spatial_shapes, level_start_index)`` ->
    ``(thing queries B×N×C, [{"pred_boxes": B×N×4, "pred_box_logits": B×N×K_thing}]
    per layer, first to last — empty unless training)``."""

    def __init__(self, num_queries: int, d_model: int, nheads: int, d_ffn: int, dropout: float, layers: int,
                 levels: int, points: int, num_thing_classes: int, ops: OpsConfig) -> None:  # fmt: skip
        super().__init__()
        self.query_embed = nn.Embedding(num_queries, 2 * d_model)  # positional half, content half
        self.reference_points = nn.Linear(d_model, 2)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        self.layers = nn.ModuleList(
            LocationDecoderLayer(d_model, nheads, d_ffn, dropout, levels, points, ops) for _ in range(layers)
        )
        # The auxiliary detection head, shared by every layer (Deformable DETR without box
        # refinement); the last layer of the box MLP starts at zero (box = reference point).
        self.box_embed = MLP(d_model, 4, 3)
        nn.init.zeros_(self.box_embed.layers[-1].weight)
        nn.init.zeros_(self.box_embed.layers[-1].bias)
        self.class_embed = nn.Linear(d_model, num_thing_classes)
        _focal_prior_bias(self.class_embed)

    def forward(
        self, memory: Tensor, spatial_shapes: Tensor, level_start_index: Tensor
    ) -> tuple[Tensor, list]:
        batch, levels = memory.shape[0], spatial_shapes.shape[0]
        query_pos, tgt = self.query_embed.weight[None].expand(batch, -1, -1).chunk(2, -1)
        reference = self.reference_points(query_pos).float().sigmoid()  # B×N×2 (x, y)
        per_level = reference[:, :, None].expand(-1, -1, levels, -1)
        predictions = []
        for layer in self.layers:
            tgt = layer(tgt, query_pos, per_level, memory, spatial_shapes, level_start_index)
            if self.training:
                delta = self.box_embed(tgt).float()
                centre = delta[..., :2] + torch.logit(reference, eps=1e-5)
                boxes = torch.cat((centre, delta[..., 2:]), -1).sigmoid()
                predictions.append({"pred_boxes": boxes, "pred_box_logits": self.class_embed(tgt)})
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
    """Query self-attention, cross-attention returning its pre-softmax logits, FFN."""

    def __init__(self, d_model: int, nheads: int, d_ffn: int, dropout: float, ops: OpsConfig) -> None:
        super().__init__()
        self.nheads = nheads
        self.self_attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout, batch_first=True)
        self.norm1 = layer_norm(d_model, ops.apex)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.norm2 = layer_norm(d_model, ops.apex)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(d_model, d_ffn, dropout, ops)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], self.nheads, -1).transpose(1, 2)

    def forward(self, tgt: Tensor, memory: Tensor, memory_pos: Tensor) -> tuple[Tensor, Tensor]:
        """-> (queries B×Q×C, attention logits B×heads×Q×S)."""
        tgt = self.norm1(tgt + self.dropout(self.self_attn(tgt, tgt, tgt, need_weights=False)[0]))
        q, k, v = (
            self._heads(self.q_proj(tgt)),
            self._heads(self.k_proj(memory + memory_pos)),
            self._heads(self.v_proj(memory)),
        )
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        # Softmax in fp32: S is thousands of tokens at stride 8.
        attended = (logits.float().softmax(-1).to(v.dtype) @ v).transpose(1, 2).flatten(2)
        tgt = self.norm2(tgt + self.dropout(self.out_proj(attended)))
        return self.ffn(tgt), logits


class MaskDecoder(nn.Module):
    """``forward(things B×N×C, memory B×S×C, memory_pos B×S×C, shapes)`` -> one
    ``{"pred_thing_logits": B×N×K_thing, "pred_stuff_logits": B×K_stuff,
    "pred_masks": B×(N+K_stuff)×H/8×W/8}`` per layer (all layers in training, else the last)."""

    def __init__(self, d_model: int, nheads: int, d_ffn: int, dropout: float, layers: int,
                 num_thing_classes: int, num_stuff_classes: int, num_levels: int, ops: OpsConfig) -> None:  # fmt: skip
        super().__init__()
        self.stuff_queries = nn.Embedding(num_stuff_classes, d_model)
        self.layers = nn.ModuleList(
            MaskDecoderLayer(d_model, nheads, d_ffn, dropout, ops) for _ in range(layers)
        )
        # One 1×1 fusion conv per layer: each layer's attention maps mean something else.
        self.mask_fusion = nn.ModuleList(nn.Conv2d(num_levels * nheads, 1, 1) for _ in range(layers))
        self.thing_class = nn.Linear(d_model, num_thing_classes)
        self.stuff_class = nn.Linear(d_model, 1)  # stuff query k: "stuff class k is present"
        _focal_prior_bias(self.thing_class)
        _focal_prior_bias(self.stuff_class)

    def forward(self, things: Tensor, memory: Tensor, memory_pos: Tensor,
                shapes: Sequence[tuple[int, int]]) -> list[dict]:  # fmt: skip
        batch, num_things = things.shape[:2]
        queries = torch.cat(
            (things, self.stuff_queries.weight[None].expand(batch, -1, -1).to(things.dtype)), 1
        )
        outputs = []
        for i, (layer, fusion) in enumerate(zip(self.layers, self.mask_fusion)):
            queries, logits = layer(queries, memory, memory_pos)
            if not self.training and i < len(self.layers) - 1:
                continue
            maps = fuse_attention_maps(logits, shapes)  # B×Q×(L·heads)×H×W
            masks = fusion(maps.flatten(0, 1)).view(batch, queries.shape[1], *maps.shape[-2:])
            outputs.append({
                "pred_thing_logits": self.thing_class(queries[:, :num_things]),
                "pred_stuff_logits": self.stuff_class(queries[:, num_things:])[..., 0],
                "pred_masks": masks,
            })  # fmt: skip
        return outputs


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
