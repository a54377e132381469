"""The Pyramid Fusion Transformer decoder (seed 000): per-scale category queries, fused across scales.

For every scale s of the pixel pyramid (strides 4, 8, 16, 32) there are K category
queries Q_s (query i stands for class i), zero at the first layer, with learnable
positional encodings P_s that every layer reuses ("shared at different depths"). Each
layer runs, in this order:

1. intra-scale query self-attention: Q,K = proj(Q_s + P_s), V = proj(Q_s), per scale;
2. cross-scale inter-query attention over the 4K concatenated queries:
   Q,K = proj(Q_all + P_all), V = proj(Q_all), the result split back per scale;
3. intra-scale query-pixel cross-attention: Q = proj(Q_s + P_s),
   K = proj(P_s + sine_s), V = proj(P_s), with *fixed* sine encodings on the pixel tokens
   (too many tokens for learned ones);
4. a feed-forward network.

Pixel tokens never attend to each other (no pixel-to-pixel attention, the point of the
design: its cost would grow with HW² at stride 4). Heads, per scale (equations 4, 5):
one class logit per query L_s^prob = Linear(Q_s) (C -> 1: "class i is in the image",
p_i = sigmoid of the average), and mask logits MLP(Q_s)·M_s; the per-scale logits are
averaged in logit space (masks after upsampling to stride 4). In training with deep
supervision every layer's averaged prediction is kept for the auxiliary losses; at
evaluation only the last layer's heads run (4 scales × K masks at stride 4 per earlier
layer would be wasted on every sliding window and TTA view). In training the masks are
handed over as their factors, not formed (``PFTPredictor`` says why).

Parameter sharing. The paper's parameter counts (ADE20K) exceed MaskFormer's on the same
backbone by 33/33/32/33/31/30M (R50/R101/Swin-T/S/B/L). On MaskFormer's FPN pixel decoder
(conv_dim 256, whose maps are the pixel tokens, so no input projection) with hidden 256,
FFN 2048 and 6 layers, one scale's attention costs 0.26M and its FFN 1.05M per layer:

- everything per scale (four complete decoders, the cross-scale attention included):
  decoder 45.2M, i.e. +34.9M over MaskFormer's 10.3M decoder: R50 76.2M (+2.9% vs 74M),
  Swin-T 77.0M (+4.0%), Swin-B 137.0M (+3.0%) — inside 5% but uniformly high;
- self-attention, cross-attention, FFN and norms per scale, *one* cross-scale attention
  per layer (it reads the concatenation of all scales, so it is not any one scale's
  module — equation (2) has a single projection of Q_all): decoder 40.4M, +30.2M:
  R50 71.4M (-3.5%), R101 90.4M (-2.8%), Swin-T 72.3M (-2.4%), Swin-S 93.6M (-2.5%),
  Swin-B 132.3M (-0.6%), Swin-L 241.9M (-0.1%).

The second is what is built here: it follows the equation literally and lands closer on
average (the paper's numbers are rounded to 1M, so they cannot separate the two better).
Attention runs on ``ops.attention`` (fused kernels chosen by device and dtype; the
query-pixel attention over stride-4 tokens never materialises the K×HW weights).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import PFTDecoderConfig
from model.pixel_decoder import c2_xavier_fill
from model.position_encoding import PositionEmbeddingSine
from model.transformer_decoder import MLP
from ops.apex_optional import layer_norm
from ops.attention import MultiheadAttention, xavier_init_like_detr
from ops.config import OpsConfig
from ops.dropout import Dropout
from ops.mask_product import average_over_scales, mask_logits
from ops.recompute import checkpointed

# The strides of the pyramid PFT decodes (the pixel decoder's ``multi_scale_features``).
PFT_STRIDES = (4, 8, 16, 32)


class PFTDecoderLayer(nn.Module):
    """One layer of all scales at once (the cross-scale attention couples them).

    ``forward(*queries, *query_pos, *pixel_keys, *pixel_values) -> tuple(queries)``, S
    tensors each (S = number of scales): queries B×K×C, query_pos K×C, pixel_keys (pixel
    tokens + sine encoding) and pixel_values (pixel tokens) B×HW_s×C. Flat tensor
    arguments because reentrant checkpointing only tracks top-level tensors.
    """

    def __init__(
        self,
        num_scales: int,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        pre_norm: bool,
        ops: OpsConfig,
    ) -> None:
        super().__init__()
        self.num_scales = num_scales
        self.pre_norm = pre_norm

        def per_scale(make: Callable[[], nn.Module]) -> nn.ModuleList:
            return nn.ModuleList(make() for _ in range(num_scales))

        def attention() -> MultiheadAttention:
            return MultiheadAttention(
                d_model, nhead, dropout, ops.attention_backend, ops.attention_max_matrix_mib
            )

        self.self_attn = per_scale(attention)
        self.scale_attn = attention()  # one module over Q_all (see module docstring)
        self.cross_attn = per_scale(attention)
        self.linear1 = per_scale(lambda: nn.Linear(d_model, dim_feedforward))
        self.linear2 = per_scale(lambda: nn.Linear(dim_feedforward, d_model))
        self.norm1 = per_scale(lambda: layer_norm(d_model, ops.apex))
        self.norm2 = per_scale(lambda: layer_norm(d_model, ops.apex))
        self.norm3 = per_scale(lambda: layer_norm(d_model, ops.apex))
        self.norm4 = per_scale(lambda: layer_norm(d_model, ops.apex))
        self.dropout = Dropout(dropout)

    def _ffn(self, s: int, x: Tensor) -> Tensor:
        return self.linear2[s](self.dropout(F.relu(self.linear1[s](x))))

    def _sublayer_input(self, norm: nn.Module, x: Tensor) -> Tensor:
        return norm(x) if self.pre_norm else x

    def _sublayer_output(self, norm: nn.Module, x: Tensor, update: Tensor) -> Tensor:
        """Residual add: pre-norm normalised the input already, post-norm (DETR) the sum."""
        out = x + self.dropout(update)
        return out if self.pre_norm else norm(out)

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        n = self.num_scales
        if len(tensors) != 4 * n:
            raise ValueError(f"PFTDecoderLayer expects 4 x {n} tensors, got {len(tensors)}")
        queries = list(tensors[:n])
        query_pos, pixel_keys, pixel_values = tensors[n : 2 * n], tensors[2 * n : 3 * n], tensors[3 * n :]

        # (1) intra-scale query self-attention
        for s in range(n):
            x = self._sublayer_input(self.norm1[s], queries[s])
            update = self.self_attn[s](x + query_pos[s], x + query_pos[s], x)
            queries[s] = self._sublayer_output(self.norm1[s], queries[s], update)

        # (2) cross-scale inter-query attention: one attention over the 4K queries
        sizes = [q.shape[1] for q in queries]
        pos_all = torch.cat(list(query_pos))
        x_all = torch.cat([self._sublayer_input(self.norm2[s], q) for s, q in enumerate(queries)], dim=1)
        fused = self.scale_attn(x_all + pos_all, x_all + pos_all, x_all).split(sizes, dim=1)
        queries = [self._sublayer_output(self.norm2[s], q, fused[s]) for s, q in enumerate(queries)]

        # (3) intra-scale query-pixel cross-attention (no pixel-to-pixel attention), (4) FFN
        for s in range(n):
            x = self._sublayer_input(self.norm3[s], queries[s])
            update = self.cross_attn[s](x + query_pos[s], pixel_keys[s], pixel_values[s])
            queries[s] = self._sublayer_output(self.norm3[s], queries[s], update)
            x = self._sublayer_input(self.norm4[s], queries[s])
            queries[s] = self._sublayer_output(self.norm4[s], queries[s], self._ffn(s, x))
        return tuple(queries)


class PFTPredictor(nn.Module):
    """``forward(pixel_features, mask_features)`` -> ``{"pred_logits": B×K,
    "pred_masks": B×K×h0×w0, "aux_outputs": []}`` in evaluation.

    ``pixel_features``: one B×C_s×h_s×w_s map per scale (the pixel tokens, finest first);
    ``mask_features``: one B×D_s×h_s×w_s map per scale (M_s, dotted with the mask
    embeddings). h0×w0 is the finest mask map's size. Query i is class i: its class
    probability is ``sigmoid(pred_logits[:, i])`` and its mask ``sigmoid(pred_masks[:, i])``.

    In training the masks come as their factors instead: per layer ``"mask_embed"`` (the
    S per-scale B×K×D_s embeddings, in the products' dtype: autocast's, or the model's), at the
    top level ``"mask_features"`` (the S maps), and ``aux_outputs`` holds the earlier
    layers (``pred_logits`` and ``mask_embed``) with deep supervision;
    ``pft_mask_logits(layer["mask_embed"], out["mask_features"])`` forms a layer's
    ``pred_masks``. Nothing in training needs the full masks: the fixed matching reads no
    mask and the criterion takes the products again for the classes in the image only
    (``ops.mask_product.matched_mask_logits``). Forming them cost 4 scales × K masks at
    stride 4 per layer for nothing: 9–14 % of a PFT R50 fp32 CPU step at 512×512, batch 2
    (same-process A/B runs: 11.8 → 10.8 s, 13.3 → 11.5 s), and 6 × 2×150×128×128 fp32
    (113 MiB) of outputs held through the loss.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        mask_channels: Sequence[int],
        num_classes: int,
        *,
        hidden_dim: int = 256,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 6,
        dropout: float = 0.0,
        pre_norm: bool = False,
        mask_embed_layers: int = 3,
        deep_supervision: bool = True,
        grad_checkpointing: bool = False,
        ops: OpsConfig | None = None,
    ) -> None:
        super().__init__()
        ops = ops or OpsConfig()
        if len(in_channels) != len(mask_channels) or not in_channels:
            raise ValueError(f"PFT: {len(in_channels)} pixel maps but {len(mask_channels)} mask maps")
        if dec_layers < 1:
            raise ValueError(f"model.pft.dec_layers must be >= 1, got {dec_layers}")
        if hidden_dim % 4 or hidden_dim % nheads:
            raise ValueError(
                f"model.pft.hidden_dim={hidden_dim} must be a multiple of 4 (sine encoding) and of nheads={nheads}"
            )
        if mask_embed_layers < 1:
            raise ValueError(f"model.pft.mask_embed_layers must be >= 1, got {mask_embed_layers}")
        num_scales = len(in_channels)
        self.num_scales = num_scales
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        self.grad_checkpointing = grad_checkpointing
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        # P_s: learned, one table per scale, read by every layer (shared across depths).
        self.query_pos = nn.ModuleList(nn.Embedding(num_classes, hidden_dim) for _ in range(num_scales))
        self.input_proj = nn.ModuleList()
        for channels in in_channels:
            if channels == hidden_dim:
                self.input_proj.append(nn.Identity())
            else:
                proj = nn.Conv2d(channels, hidden_dim, kernel_size=1)
                c2_xavier_fill(proj)
                self.input_proj.append(proj)
        self.layers = nn.ModuleList(
            PFTDecoderLayer(num_scales, hidden_dim, nheads, dim_feedforward, dropout, pre_norm, ops)
            for _ in range(dec_layers)
        )
        xavier_init_like_detr(self.layers)  # as DETR's transformer
        self.decoder_norm = nn.ModuleList(layer_norm(hidden_dim, ops.apex) for _ in range(num_scales))
        # One logit per category query (equation 4): query i only ever answers "is class i here?".
        self.class_embed = nn.ModuleList(nn.Linear(hidden_dim, 1) for _ in range(num_scales))
        self.mask_embed = nn.ModuleList(
            MLP(hidden_dim, hidden_dim, channels, mask_embed_layers) for channels in mask_channels
        )

    def predict(self, queries: Sequence[Tensor], mask_features: Sequence[Tensor]) -> dict[str, Tensor]:
        """Per-scale heads, averaged in logit space; masks upsampled to the finest map first.
        In training the per-scale mask embeddings (``"mask_embed"``) instead of the masks."""
        normed = [norm(q) for norm, q in zip(self.decoder_norm, queries)]
        logits = functools.reduce(torch.add, (head(q).squeeze(-1) for head, q in zip(self.class_embed, normed)))
        embeds = [mlp(q) for mlp, q in zip(self.mask_embed, normed)]
        out = {"pred_logits": logits / len(queries)}
        if self.training:
            out["mask_embed"] = embeds
        else:
            out["pred_masks"] = pft_mask_logits(embeds, mask_features)
        return out

    def forward(self, pixel_features: Sequence[Tensor], mask_features: Sequence[Tensor]) -> dict:
        if len(pixel_features) != self.num_scales or len(mask_features) != self.num_scales:
            raise ValueError(
                f"PFT expects {self.num_scales} pixel and mask maps, got {len(pixel_features)} and {len(mask_features)}"
            )
        keys, values = [], []
        for proj, x in zip(self.input_proj, pixel_features):
            # Fixed sine encoding (fp32, batch 1: it does not depend on the image content).
            pos = self.pe_layer(x[:1]).flatten(2).transpose(1, 2)
            tokens = proj(x).flatten(2).transpose(1, 2)  # B×HW×C
            values.append(tokens)
            keys.append(tokens + pos)  # computed once, reused by every layer
        batch = pixel_features[0].shape[0]
        query_pos = [embed.weight for embed in self.query_pos]
        # Q_s = 0 at the first layer: the queries differ only through P_s at first.
        queries: Sequence[Tensor] = [
            torch.zeros(batch, self.num_classes, w.shape[1], device=w.device, dtype=w.dtype)
            for w in query_pos
        ]
        # Heads on every layer only for the auxiliary losses (training); else the last one.
        every_layer = self.training and self.deep_supervision
        predictions = []
        for i, layer in enumerate(self.layers):
            args = (*queries, *query_pos, *keys, *values)
            queries = checkpointed(self.grad_checkpointing, layer, *args)
            if every_layer or i == len(self.layers) - 1:
                predictions.append(self.predict(queries, mask_features))
        out = dict(predictions[-1])
        out["aux_outputs"] = predictions[:-1]
        if self.training:
            out["mask_features"] = list(mask_features)  # shared by every layer's masks
        return out


def pft_mask_logits(mask_embed: Sequence[Tensor], mask_features: Sequence[Tensor]) -> Tensor:
    """PFT's mask logits, B×K×h0×w0: each scale's product ``mask_embed[s]·mask_features[s]``,
    upsampled to the finest map and averaged in logit space (equation 5)."""
    return average_over_scales(map(mask_logits, mask_embed, mask_features), mask_features[0].shape[-2:])


def build_pft_predictor(
    cfg: PFTDecoderConfig, conv_dim: int, mask_dim: int, num_classes: int, ops: OpsConfig | None = None
) -> PFTPredictor:
    """PFT on the pixel-decoder contract: ``len(PFT_STRIDES)`` maps of ``conv_dim`` channels
    as pixel tokens; masks on ``mask_features`` (``mask_dim``) at stride 4 and on the
    pyramid maps (``conv_dim``) at the coarser strides."""
    num_scales = len(PFT_STRIDES)
    return PFTPredictor(
        [conv_dim] * num_scales,
        [mask_dim] + [conv_dim] * (num_scales - 1),
        num_classes,
        hidden_dim=cfg.hidden_dim,
        nheads=cfg.nheads,
        dim_feedforward=cfg.dim_feedforward,
        dec_layers=cfg.dec_layers,
        dropout=cfg.dropout,
        pre_norm=cfg.pre_norm,
        mask_embed_layers=cfg.mask_embed_layers,
        deep_supervision=cfg.deep_supervision,
        grad_checkpointing=cfg.grad_checkpointing,
        ops=ops,
    )
