"""MaskFormer's transformer module and segmentation heads (``TransformerPredictor``).

A DETR decoder: N queries attend to themselves and to the stride-32 feature map. As in
the paper, the decoder's input ``tgt`` is all zeros ("the N query embeddings are
initialized as zero vectors") and the learned query embeddings enter only as positional
embeddings, added to the queries and keys of every attention. Each layer's (normed)
output goes through the class head (K+1 logits, the last one "no object") and the
mask-embedding MLP, whose dot product with the per-pixel embeddings gives the masks;
in training with deep supervision every layer but the last becomes an auxiliary output.
At evaluation only the last layer's heads run (the Q masks per earlier layer would be
computed for nothing on every window and TTA view).

DETR also has a transformer *encoder* over the feature map. MaskFormer's semantic
configs (ADE20K etc.) set ``ENC_LAYERS: 0``; only its panoptic "+ 6 Enc" models use
one. It is left out here: with 0 layers DETR's encoder is the identity, except that in
the pre-norm variant its final LayerNorm still normalises the memory (kept below).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import TransformerDecoderConfig
from model.pixel_decoder import c2_xavier_fill
from model.position_encoding import PositionEmbeddingSine
from ops.apex_optional import layer_norm
from ops.attention import MultiheadAttention, xavier_init_like_detr
from ops.config import OpsConfig
from ops.dropout import Dropout
from ops.lean_linear import relu_dropout_linear
from ops.mask_product import mask_logits
from ops.recompute import checkpointed


class DecoderLayer(nn.Module):
    """DETR decoder layer: self-attention, cross-attention, FFN; post-norm by default."""

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool, ops: OpsConfig
    ) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(
            d_model, nhead, dropout, ops.attention_backend, ops.attention_max_matrix_mib
        )
        self.cross_attn = MultiheadAttention(
            d_model, nhead, dropout, ops.attention_backend, ops.attention_max_matrix_mib
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = layer_norm(d_model, ops.apex)
        self.norm2 = layer_norm(d_model, ops.apex)
        self.norm3 = layer_norm(d_model, ops.apex)
        self.dropout = Dropout(dropout)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)
        self.pre_norm = pre_norm

    def _self_attn(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        q = k = tgt + query_pos
        return self.dropout1(self.self_attn(q, k, tgt))

    def _cross_attn(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        return self.dropout2(self.cross_attn(tgt + query_pos, memory + pos, memory))

    def _ffn(self, tgt: Tensor) -> Tensor:
        # = linear2(dropout(relu(linear1(tgt)))), saving only the dropout's output.
        return self.dropout3(relu_dropout_linear(self.linear1(tgt), self.dropout, self.linear2))

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        """``tgt``/``query_pos``: B×Q×C; ``memory``/``pos``: B×HW×C."""
        if self.pre_norm:
            tgt = tgt + self._self_attn(self.norm1(tgt), query_pos)
            tgt = tgt + self._cross_attn(self.norm2(tgt), memory, pos, query_pos)
            return tgt + self._ffn(self.norm3(tgt))
        tgt = self.norm1(tgt + self._self_attn(tgt, query_pos))
        tgt = self.norm2(tgt + self._cross_attn(tgt, memory, pos, query_pos))
        return self.norm3(tgt + self._ffn(tgt))


class StandardTransformerDecoder(nn.Module):
    """A stack of ``DecoderLayer``s returning every layer's output after a shared final
    LayerNorm (DETR's ``return_intermediate``): L×B×Q×C."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        num_layers: int,
        dim_feedforward: int,
        dropout: float,
        pre_norm: bool,
        ops: OpsConfig | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"model.decoder.dec_layers must be >= 1, got {num_layers}")
        if d_model % nhead:
            raise ValueError(f"model.decoder.hidden_dim={d_model} is not divisible by nheads={nhead}")
        ops = ops or OpsConfig()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm, ops) for _ in range(num_layers)
        )
        self.norm = layer_norm(d_model, ops.apex)
        # The 0-layer encoder's final norm (DETR builds it only for pre-norm).
        self.memory_norm = layer_norm(d_model, ops.apex) if pre_norm else nn.Identity()
        self.grad_checkpointing = grad_checkpointing
        xavier_init_like_detr(self)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        memory = self.memory_norm(memory)
        hidden = []
        for layer in self.layers:
            tgt = checkpointed(self.grad_checkpointing, layer, tgt, memory, pos, query_pos)
            hidden.append(self.norm(tgt))
        return torch.stack(hidden)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR/MaskFormer ``MLP``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"model.decoder.mask_embed_layers must be >= 1, got {num_layers}")
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class TransformerPredictor(nn.Module):
    """``forward(x: B×C_in×h×w stride-32 map, mask_features: B×D×H×W)`` ->
    ``{"pred_logits": B×Q×(K+1), "pred_masks": B×Q×H×W, "aux_outputs": [...]}``;
    ``aux_outputs`` (earlier layers, same keys) only in training with deep supervision.
    In training also ``"mask_embed"`` (``[B×Q×C]``, per layer) and ``"mask_features"``
    (``[B×D×H×W]``, top level), of which ``pred_masks`` is the product, for the criterion:
    one-element lists, the one scale of the per-scale factors PFT hands it."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        mask_dim: int,
        *,
        num_queries: int = 100,
        hidden_dim: int = 256,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 6,
        dropout: float = 0.1,
        pre_norm: bool = False,
        enforce_input_project: bool = False,
        mask_embed_layers: int = 3,
        deep_supervision: bool = True,
        ops: OpsConfig | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if hidden_dim % 4:
            # Half the channels encode y and half x, each as sin/cos pairs.
            raise ValueError(f"model.decoder.hidden_dim must be a multiple of 4, got {hidden_dim}")
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.decoder = StandardTransformerDecoder(
            hidden_dim, nheads, dec_layers, dim_feedforward, dropout, pre_norm, ops, grad_checkpointing
        )
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj: nn.Module
        if in_channels != hidden_dim or enforce_input_project:
            self.input_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
            c2_xavier_fill(self.input_proj)
        else:
            self.input_proj = nn.Identity()
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, mask_embed_layers)
        self.deep_supervision = deep_supervision

    def forward(self, x: Tensor, mask_features: Tensor) -> dict:
        pos = self.pe_layer(x).flatten(2).transpose(1, 2)  # B×hw×C, fp32
        memory = self.input_proj(x).flatten(2).transpose(1, 2)  # B×hw×C
        batch = x.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        tgt = torch.zeros_like(query_pos)
        hidden = self.decoder(tgt, memory, pos, query_pos)  # L×B×Q×C
        if not (self.training and self.deep_supervision):
            hidden = hidden[-1:]  # heads for the auxiliary losses only when training
        logits = self.class_embed(hidden)
        # One product per layer rather than one L×B×Q×H×W tensor sliced into layers: the
        # backward of slicing a stacked output materialises full-size zero-filled gradients
        # of it (at 640² crops, 6 layers, 100 queries: ~120 MiB apiece).
        embeds = self.mask_embed(hidden)
        masks = [mask_logits(embed, mask_features) for embed in embeds]
        outputs = [{"pred_logits": a, "pred_masks": b} for a, b in zip(logits, masks)]
        if self.training:
            # For the criterion: it takes the matched masks' rows of the product again
            # rather than gathering them from pred_masks (ops/mask_product.py says why).
            for layer, embed in zip(outputs, embeds):
                layer["mask_embed"] = [embed]
        return {**outputs[-1], "aux_outputs": outputs[:-1],
                **({"mask_features": [mask_features]} if self.training else {})}


def build_transformer_predictor(
    cfg: TransformerDecoderConfig,
    in_channels: int,
    num_classes: int,
    mask_dim: int,
    ops: OpsConfig | None = None,
) -> TransformerPredictor:
    return TransformerPredictor(
        in_channels,
        num_classes,
        mask_dim,
        num_queries=cfg.num_queries,
        hidden_dim=cfg.hidden_dim,
        nheads=cfg.nheads,
        dim_feedforward=cfg.dim_feedforward,
        dec_layers=cfg.dec_layers,
        dropout=cfg.dropout,
        pre_norm=cfg.pre_norm,
        enforce_input_project=cfg.enforce_input_project,
        mask_embed_layers=cfg.mask_embed_layers,
        deep_supervision=cfg.deep_supervision,
        ops=ops,
        grad_checkpointing=cfg.grad_checkpointing,
    )
