"""Swin's window attention as segmentation needs it: pad-first, and no work on padding.

``SwinBlock`` is timm's ``SwinTransformerBlock`` with its ``forward`` replaced (attention
in ``_norm_attn`` instead of timm's ``_attn``), and is swapped in by class assignment
(``use_segmentation_swin_blocks``): same parameters,
buffers and state-dict keys, so pretrained weights load unchanged. Two changes:

1. **Pad before the shift.** timm shifts first and pads afterwards, yet builds the
   shifted-window mask for the padded size; when the map is not a multiple of the window
   (every stage of a 512 crop with window 7), the rows and columns that wrapped around
   from the top/left then share windows with the bottom/right of the image. Padding
   first, as Swin's segmentation code does, makes timm's own roll and mask line up.
2. **The qkv and output projections run on the map's tokens only.** A padding token is
   zero after ``norm1``, so its qkv is the bias alone; and the projection of a token
   that is cropped away is never used. Projecting before padding and after cropping
   computes the same values as projecting the padded windows, without the padding's
   share of the two largest matrix products of the block: 0.2x more tokens at a 64x64
   map with window 7, 0.7x at 16x16 and 2x at 8x8 (the last two stages of a 256 crop),
   about a fifth of Swin-T's linear-layer work at 256x256.

Windows and heads are split in one copy (qkv -> 3 x windows x heads x tokens x head dim)
and merged back in one, where timm makes one copy per step. The block saves less for
backward than timm's: ``norm1`` is fused into the qkv projection and ``norm2`` into the
MLP, whose GELU is recomputed in backward (``ops.lean_linear``), so neither norm's output
nor the GELU's is kept.
"""

from __future__ import annotations

import ops.torchvision_fix  # noqa: F401  (must run before timm imports torchvision)

# isort: split
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from torch import Tensor, nn

from ops.lean_linear import is_plain_gelu_mlp, layer_norm_linear, norm_gelu_mlp
from ops.window_attention import window_attention


class SwinBlock(SwinTransformerBlock):
    """timm's Swin block with pad-first windows, no projections of padding and lean
    norms and MLP (see the module docstring). Takes and returns B x H x W x C maps, as
    timm's."""

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, channels = x.shape
        x = x + self.drop_path1(self._norm_attn(x))
        x = x.reshape(batch, -1, channels)
        if type(self.norm2) is nn.LayerNorm and is_plain_gelu_mlp(self.mlp):
            x = x + self.drop_path2(norm_gelu_mlp(x, self.norm2, self.mlp))
        else:
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(batch, height, width, channels)

    def _qkv(self, x: Tensor, bias: bool) -> Tensor:
        """``attn.qkv(norm1(x))``, with or without the projection's bias."""
        qkv = self.attn.qkv
        bias = qkv.bias if bias else None
        if type(self.norm1) is nn.LayerNorm:
            return layer_norm_linear(x, self.norm1, qkv.weight, bias)
        return F.linear(self.norm1(x), qkv.weight, bias)

    def _norm_attn(self, x: Tensor) -> Tensor:
        attn = self.attn
        batch, height, width, _ = x.shape
        win_h, win_w = self.window_size
        pad_h, pad_w = -height % win_h, -width % win_w
        padded_h, padded_w = height + pad_h, width + pad_w
        if pad_h or pad_w:
            # Padding tokens project to the bias alone (they are zeros after norm1). The
            # bias in the product's dtype, as autocast's linear would add it.
            qkv = F.pad(self._qkv(x, bias=False), (0, 0, 0, pad_w, 0, pad_h))
            if attn.qkv.bias is not None:
                qkv = qkv + attn.qkv.bias.to(qkv.dtype)
        else:
            qkv = self._qkv(x, bias=True)
        shift = tuple(self.shift_size)
        if any(shift):
            qkv = torch.roll(qkv, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        heads = attn.num_heads
        head_dim = qkv.shape[-1] // (3 * heads)
        rows, cols, tokens = padded_h // win_h, padded_w // win_w, win_h * win_w
        # (B, rows, win_h, cols, win_w, 3, heads, d) -> (3, B*rows*cols, heads, win_h*win_w, d)
        qkv = qkv.view(batch, rows, win_h, cols, win_w, 3, heads, head_dim)
        qkv = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, -1, heads, tokens, head_dim)
        q, k, v = qkv.unbind(0)

        if self.dynamic_mask:
            # get_attn_mask reads only the size, device and dtype of its argument.
            mask = self.get_attn_mask(x.new_empty((1, padded_h, padded_w, 0)))
        else:
            mask = self.attn_mask
        out = _window_attention(attn, q, k, v, mask)

        # (B*rows*cols, heads, win_h*win_w, d) -> (B, rows*win_h, cols*win_w, heads*d)
        out = out.view(batch, rows, cols, heads, win_h, win_w, head_dim)
        out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, padded_h, padded_w, heads * head_dim)
        if any(shift):
            out = torch.roll(out, shifts=shift, dims=(1, 2))
        if pad_h or pad_w:
            out = out[:, :height, :width]
        return attn.proj_drop(attn.proj(out))


def _window_attention(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """timm ``WindowAttention.forward``'s attention (both of its paths) on split q/k/v:
    relative position bias, the shifted-window mask (0 / -100 per window), softmax,
    attention dropout. Without dropout, timm's default path runs as
    ``ops.window_attention``, which saves only q, k and v for backward."""
    windows, heads, tokens, _ = q.shape
    if not attn.fused_attn and (attn.attn_drop.p == 0 or not attn.training):
        return window_attention(q, k, v, attn.scale, attn._get_rel_pos_bias().squeeze(0), mask)
    if attn.fused_attn:
        bias = attn._get_rel_pos_bias()
        if mask is not None:
            num_windows = mask.shape[0]
            mask = mask.view(1, num_windows, 1, tokens, tokens).expand(windows // num_windows, -1, heads, -1, -1)
            bias = bias + mask.reshape(-1, heads, tokens, tokens)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    scores = scores + attn._get_rel_pos_bias()
    if mask is not None:
        num_windows = mask.shape[0]
        scores = scores.view(-1, num_windows, heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, heads, tokens, tokens)
    return attn.attn_drop(attn.softmax(scores)) @ v


def use_segmentation_swin_blocks(body: nn.Module) -> None:
    """Turn every timm ``SwinTransformerBlock`` in ``body`` into a ``SwinBlock``."""
    for module in body.modules():
        if type(module) is SwinTransformerBlock:
            module.__class__ = SwinBlock
