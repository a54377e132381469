"""3×3 convolution (stride 1, padding 1) by Winograd's minimal filtering, F(4×4, 3×3).

Why: the FPN pixel decoders run 256→256 3×3 convolutions at stride 4 (the last output
conv and ``mask_features``); in fp32 on CPU these two alone are as many FLOPs as a whole
Swin-T backbone at the same crop, and oneDNN's direct kernel runs them at the CPU's GEMM
rate. Winograd's algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016; what cuDNN picks for such layers on a GPU) computes each 4×4 output
tile from a 6×6 input tile with 36 multiplications per (input, output) channel pair
instead of 144: the convolution becomes 36 independent channel GEMMs in a transformed
domain, 4× fewer multiply-adds, plus cheap linear transforms of the tiles. The backward
pass runs the same way (two more batches of 36 GEMMs), so training gains in all three.

Numerics: the transforms multiply by the fixed matrices below (entries up to 8 and
1/24), so the result differs from the direct convolution by a few fp32 ulps of the
output's scale (relative error ~1e-5 against fp64, the direct kernel ~3e-7); that is why
``auto`` keeps it to fp32 and never uses it under bf16/fp16 autocast. In fp64 it matches
to ~1e-13 (the tests check values and gradients there).

Memory: like the direct kernel it saves only its input and weight for backward; the
transformed tiles are rebuilt from them there, as an im2col convolution rebuilds its
column matrix.

The tile transforms: for fp32 CPU tensors, C kernels (``ops/winograd_cpu.c`` through
``ops.winograd_native``) that read and write each band once; elsewhere (fp64, other
devices, no C compiler) the PyTorch path below — a layout copy and one Kronecker-form
matrix product per transform, bound by memory bandwidth on CPU, and the reference the
kernels are tested against.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ops import winograd_native
from ops.scratch import ScratchBuffers

# F(4×4, 3×3) transform matrices (Lavin & Gray, 2016, interpolation points 0, ±1, ±2, ∞).
_BT = [
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
]
_G = [
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
]
_AT = [
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
]
_TILE, _OUT = 6, 4  # input tile, output tile
# Below this many output tiles per image ``auto`` keeps the direct kernel: the transforms'
# fixed cost outweighs the saved multiplications. Measured forward+backward, 256→256
# channels, batch 2, 2-core AVX-512 CPU (benchmarks/winograd_conv.py), Winograd against
# direct: with the fused C transforms, 32×32 maps (64 tiles) 19.9 against 34.8 ms and
# 16×16 (16 tiles) 8.8 against 9.0 ms; with the PyTorch transforms (no C compiler, or
# SEGSCALE_NATIVE_OPS=0), 64×64 (256 tiles) 124 against 142 ms but 32×32 41.3 against
# 34.8 ms.
MIN_TILES = 64
MIN_TILES_PYTORCH_TRANSFORMS = 256


def auto_min_tiles() -> int:
    """Output tiles per image from which ``algorithm="auto"`` runs Winograd on CPU."""
    return MIN_TILES if winograd_native.library() is not None else MIN_TILES_PYTORCH_TRANSFORMS


def _kron(matrix: list[list[float]]) -> Tensor:
    m = torch.tensor(matrix, dtype=torch.float64)
    return torch.kron(m, m)


# Kronecker forms that transform a whole flattened tile with one matrix product,
# (Bᵀ d B) = (Bᵀ⊗Bᵀ) vec(d): 36×36 input, 36×9 filter, 16×36 output. Built once, here,
# as real tensors: a lazily filled cache could capture the fake tensors of
# ``launcher describe``'s FakeTensorMode pass.
_KRON = (_kron(_BT), _kron(_G), _kron(_AT))


def _transforms(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    return tuple(m.to(dtype=dtype, device=device) for m in _KRON)


# Tiles are processed in bands of whole tile rows of one image, about this many tiles at
# a time: the transformed tiles of a band are a few MiB, so the transient memory stays
# small next to the activations alive at that point (oneDNN's GEMMs run as fast at 128
# rows as at 512 here).
BAND_TILES = 128


def _bands(n: int, tiles_h: int, tiles_w: int) -> list[tuple[int, int, int]]:
    """(image, first tile row, end tile row) of every band."""
    rows = max(1, BAND_TILES // tiles_w)
    return [(i, r0, min(r0 + rows, tiles_h)) for i in range(n) for r0 in range(0, tiles_h, rows)]


def _band_tiles(x: Tensor, image: int, r0: int, r1: int, tiles_w: int, out: Tensor) -> Tensor:
    """``out`` (36, tiles·C) filled with the overlapping 6×6 tiles (stride 4) of tile rows r0..r1 of one
    image under the convolution's zero padding (widened to whole tiles at the bottom and
    right), one row per position in the tile, channels innermost so each position is a
    (tiles, C) GEMM operand. Only the band is padded: no padded copy of the whole input."""
    height, width = x.shape[-2:]
    top, bottom = _OUT * r0 - 1, _OUT * r1 + 1  # input rows the band reads
    band = x[image : image + 1, :, max(top, 0) : min(bottom, height)]
    pad_rows = (max(-top, 0), max(bottom - height, 0))
    band = F.pad(band, (1, 1 + _OUT * tiles_w - width, *pad_rows))
    tiles = band.unfold(2, _TILE, _OUT).unfold(3, _TILE, _OUT)  # 1 C rows tw 6 6 (a view)
    out.view(_TILE, _TILE, 1, r1 - r0, tiles_w, x.shape[1]).copy_(tiles.permute(4, 5, 0, 2, 3, 1))
    return out


def _fold_band(grad_tiles: Tensor, grad_padded: Tensor, image: int, r0: int, r1: int) -> None:
    """Adjoint of ``_band_tiles``: adds each tile's gradient onto ``grad_padded`` (N×C×
    4(th+1)×4(tw+1)), where neighbouring tiles overlap by two rows/columns."""
    c, tiles_w = grad_padded.shape[1], grad_padded.shape[-1] // _OUT - 1
    g = grad_tiles.view(_TILE, _TILE, 1, r1 - r0, tiles_w, c).permute(2, 5, 3, 0, 4, 1)  # 1 C rows 6 tw 6
    out = grad_padded[image : image + 1, :, _OUT * r0 : _OUT * (r1 + 1)].view(
        1, c, r1 - r0 + 1, _OUT, tiles_w + 1, _OUT
    )
    out[:, :, :-1, :, :-1, :] += g[:, :, :, :4, :, :4]
    out[:, :, 1:, :2, :-1, :] += g[:, :, :, 4:, :, :4]
    out[:, :, :-1, :, 1:, :2] += g[:, :, :, :4, :, 4:]
    out[:, :, 1:, :2, 1:, :2] += g[:, :, :, 4:, :, 4:]


def _input_tiles(
    x: Tensor, image: int, r0: int, r1: int, tiles_w: int, kron_b: Tensor, scratch: ScratchBuffers, fused: bool
) -> Tensor:
    """The band's transformed input tiles Bᵀ d B, 36×tiles×C in ``scratch``'s "v" (forward,
    and rebuilt for the weight gradient): one pass of the C kernel, or the tile copy and
    one Kronecker-form product."""
    c, tiles = x.shape[1], (r1 - r0) * tiles_w
    v = scratch.get("v", 36, tiles, c)
    if fused:
        return winograd_native.input_tiles(x[image], r0, r1, tiles_w, v)
    d = _band_tiles(x, image, r0, r1, tiles_w, scratch.get("tiles", 36, tiles * c))
    torch.mm(kron_b, d, out=v.view(36, -1))
    return v


def _tile_counts(x: Tensor) -> tuple[int, int]:
    return -(-x.shape[-2] // _OUT), -(-x.shape[-1] // _OUT)


def _filters(weight: Tensor, kron_g: Tensor, channels_first: bool) -> Tensor:
    """Transformed filters, 36×C×K (``channels_first``) or 36×K×C, contiguous: oneDNN's
    batched GEMM runs a quarter slower on a transposed operand here."""
    k, c = weight.shape[:2]
    if channels_first:
        return (kron_g @ weight.permute(2, 3, 1, 0).reshape(9, c * k)).view(36, c, k)
    return (kron_g @ weight.reshape(k * c, 9).t()).view(36, k, c)


class _WinogradConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        n, c, height, width = x.shape
        k = weight.shape[0]
        tiles_h, tiles_w = _tile_counts(x)
        kron_b, kron_g, kron_a = _transforms(x.dtype, x.device)
        u = _filters(weight, kron_g, channels_first=True)
        fused = winograd_native.usable(x, weight)
        if fused:  # the fused output transform writes the image's pixels only
            out = torch.empty((n, k, height, width), dtype=x.dtype, device=x.device)
        else:
            # The output in whole tiles, so each band's tiles land in it with one strided
            # write; cropped (copied) only when the map is not a whole number of tiles.
            out = torch.empty((n, k, _OUT * tiles_h, _OUT * tiles_w), dtype=x.dtype, device=x.device)
        scratch = ScratchBuffers(x)
        for image, r0, r1 in _bands(n, tiles_h, tiles_w):
            tiles = (r1 - r0) * tiles_w
            v = _input_tiles(x, image, r0, r1, tiles_w, kron_b, scratch, fused)
            m = torch.bmm(v, u, out=scratch.get("m", 36, tiles, k))
            if fused:
                winograd_native.output_tiles(m, bias, r0, r1, tiles_w, out[image])
                continue
            y = scratch.get("y", 16, tiles * k)
            torch.mm(kron_a, m.view(36, -1), out=y)
            y = y.view(_OUT, _OUT, 1, r1 - r0, tiles_w, k).permute(2, 5, 3, 0, 4, 1)  # 1 K rows 4 tw 4
            target = out[image : image + 1, :, _OUT * r0 : _OUT * r1].view(1, k, r1 - r0, _OUT, tiles_w, _OUT)
            if bias is None:
                target.copy_(y)
            else:
                torch.add(y, bias.view(1, k, 1, 1, 1, 1), out=target)
        if out.shape[-2:] != (height, width):
            out = out[:, :, :height, :width].contiguous()
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable  # the backward writes into reused buffers; no double backward
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        n, c, height, width = x.shape
        k = weight.shape[0]
        tiles_h, tiles_w = _tile_counts(x)
        kron_b, kron_g, kron_a = _transforms(x.dtype, x.device)
        need_x, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        fused = winograd_native.usable(x, weight)
        grad_out = grad_out.contiguous()
        # Output tiles do not overlap: pad the gradient to whole tiles (a no-op view when
        # the map is a whole number of tiles; the fused kernels read the image's pixels only).
        grad_padded_out = grad_out
        if not fused and (_OUT * tiles_h, _OUT * tiles_w) != (height, width):
            grad_padded_out = F.pad(grad_out, (0, _OUT * tiles_w - width, 0, _OUT * tiles_h - height))
        if need_x:
            u = _filters(weight, kron_g, channels_first=False)
            if fused:  # every pixel is written by the fold of the bands, in order
                grad_x = torch.empty_like(x)
            else:
                grad_padded = x.new_zeros(n, c, _OUT * (tiles_h + 1), _OUT * (tiles_w + 1))
        # The filters' gradient is allocated by the first band's product (not zero-filled
        # and accumulated into: a 9 MiB fill per 256-channel conv) and summed into after.
        grad_u = None
        # Buffers are shared where one use ends before the next begins (the gradient of
        # the tiles is folded before the weight path rebuilds the tiles).
        scratch = ScratchBuffers(x)
        # No band work when only the bias needs a gradient (e.g. a frozen conv's bias).
        bands = _bands(n, tiles_h, tiles_w) if need_x or need_weight else []
        for image, r0, r1 in bands:
            tiles = (r1 - r0) * tiles_w
            grad_m = scratch.get("m", 36, tiles, k)
            if fused:
                winograd_native.grad_output_tiles(grad_out[image], r0, r1, tiles_w, grad_m)
            else:
                band = grad_padded_out[image : image + 1, :, _OUT * r0 : _OUT * r1]
                grad_tiles = scratch.get("y", 16, tiles * k)
                grad_tiles.view(_OUT, _OUT, 1, r1 - r0, tiles_w, k).copy_(
                    band.view(1, k, r1 - r0, _OUT, tiles_w, _OUT).permute(3, 5, 0, 2, 4, 1)
                )
                torch.mm(kron_a.t(), grad_tiles, out=grad_m.view(36, -1))
            if need_x:
                grad_v = scratch.get("v", 36, tiles, c)
                torch.bmm(grad_m, u, out=grad_v)
                if fused:
                    winograd_native.grad_input_fold(grad_v, r0, r1, tiles_w, grad_x[image])
                else:
                    grad_d = scratch.get("tiles", 36, tiles * c)
                    torch.mm(kron_b.t(), grad_v.view(36, -1), out=grad_d)
                    _fold_band(grad_d, grad_padded, image, r0, r1)
            if need_weight:
                # The transformed input is rebuilt here rather than saved, as an im2col
                # convolution rebuilds its columns: it is 2.25× the input's size.
                v = _input_tiles(x, image, r0, r1, tiles_w, kron_b, scratch, fused)
                if grad_u is None:
                    grad_u = torch.bmm(grad_m.transpose(1, 2), v)
                else:
                    grad_u.baddbmm_(grad_m.transpose(1, 2), v)
        if need_x and not fused:
            grad_x = grad_padded[:, :, 1 : height + 1, 1 : width + 1]
        grad_weight = (kron_g.t() @ grad_u.view(36, -1)).t().reshape(k, c, 3, 3) if need_weight else None
        grad_bias = grad_out.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x if need_x else None, grad_weight, grad_bias


def winograd_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3×3 ``weight`` (groups 1, stride 1,
    dilation 1) computed by Winograd F(4×4, 3×3); any input size (tiles are zero-padded)."""
    if weight.shape[-2:] != (3, 3) or x.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"winograd_conv3x3 needs an N×C×H×W input and a K×C×3×3 weight, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if x.numel() == 0:
        return F.conv2d(x, weight, bias, padding=1)
    return _WinogradConv3x3.apply(x.contiguous(), weight, bias)


_direct_only = 0


@contextmanager
def direct_convolutions() -> Iterator[None]:
    """Every ``Conv3x3`` runs the direct kernel inside. For FLOP counting
    (``launcher/mfu.py``): MFU counts the model's FLOPs, those of the convolution, not
    the 4× fewer products Winograd computes them with."""
    global _direct_only
    _direct_only += 1
    try:
        yield
    finally:
        _direct_only -= 1


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in, out, 3, padding=1)`` (same parameters and state dict) that runs
    Winograd F(4×4, 3×3) where it pays: ``algorithm="auto"`` picks it for fp32 CPU
    inputs, outside autocast, with at least ``auto_min_tiles()`` output tiles per image, and
    the direct kernel otherwise (GPUs: cuDNN chooses its own algorithm, Winograd
    included); ``"winograd"`` forces it for fp32/fp64 inputs on any device, outside
    autocast; ``"direct"`` never uses it."""

    def __init__(
        self, in_channels: int, out_channels: int, bias: bool = True, algorithm: str = "auto"
    ) -> None:
        if algorithm not in ("auto", "winograd", "direct"):
            raise ValueError(f"model.ops.conv3x3={algorithm!r}: expected 'auto', 'winograd' or 'direct'")
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias)
        self.algorithm = algorithm

    def _use_winograd(self, x: Tensor) -> bool:
        if (
            self.algorithm == "direct"
            or _direct_only
            or x.dim() != 4
            or torch.is_autocast_enabled(x.device.type)
        ):
            return False
        if self.algorithm == "winograd":
            return x.dtype in (torch.float32, torch.float64)
        tiles_h, tiles_w = _tile_counts(x)
        return x.device.type == "cpu" and x.dtype == torch.float32 and tiles_h * tiles_w >= auto_min_tiles()

    def forward(self, x: Tensor) -> Tensor:
        if self._use_winograd(x):
            return winograd_conv3x3(x, self.weight, self.bias)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, algorithm={self.algorithm}"
