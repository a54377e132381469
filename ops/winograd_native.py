"""ctypes bindings of ``ops/winograd_cpu.c``: the tile transforms of
``ops.winograd_conv`` fused into one pass each (fp32, CPU). The layouts are that
module's; every tensor is checked before its pointer is handed over, since a wrong shape
would be read out of bounds rather than raise."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from ops import cpu_native

_LONG, _PTR = ctypes.c_long, ctypes.c_void_p


def library() -> ctypes.CDLL | None:
    lib = cpu_native.load("winograd_cpu")
    if lib is not None and not hasattr(lib, "_segscale_typed"):
        band = [_LONG] * 6  # channels, height, width, first tile row, end tile row, tiles per row
        lib.wino_input_tiles.argtypes = [_PTR, *band, _PTR, ctypes.c_int]
        lib.wino_output_tiles.argtypes = [_PTR, _PTR, *band, _PTR, ctypes.c_int]
        lib.wino_grad_output_tiles.argtypes = [_PTR, *band, _PTR, ctypes.c_int]
        lib.wino_grad_input_fold.argtypes = [_PTR, *band, _PTR, ctypes.c_int]
        for fn in (lib.wino_input_tiles, lib.wino_output_tiles, lib.wino_grad_output_tiles, lib.wino_grad_input_fold):
            fn.restype = None
        lib._segscale_typed = True
    return lib


def usable(*tensors: Tensor) -> bool:
    """Whether the fused kernels can run on these tensors: plain fp32 CPU tensors (not the
    fake tensors of ``launcher describe``, which have no data), no dispatch mode active
    (a fake-tensor or tracing mode would see none of the kernels' work), and a library
    built for this machine."""
    return (
        torch._C._len_torch_dispatch_stack() == 0
        and all(
            type(t) in (Tensor, torch.nn.Parameter) and t.dtype == torch.float32 and t.device.type == "cpu"
            for t in tensors
        )
        and library() is not None
    )


def _check(image: Tensor, tiles: Tensor, r0: int, r1: int, tiles_w: int) -> tuple[int, int, int]:
    """image: C×H×W; tiles: 36×(r1−r0)·tiles_w×C; both contiguous fp32, tiles inside the image."""
    channels, height, width = image.shape
    expected = (36, (r1 - r0) * tiles_w, channels)
    if (
        tiles.shape != expected
        or not (image.is_contiguous() and tiles.is_contiguous())
        or image.dtype != torch.float32
        or tiles.dtype != torch.float32
        or not (0 <= r0 < r1 <= -(-height // 4))
        or tiles_w != -(-width // 4)
    ):
        raise ValueError(
            f"winograd_native: image {tuple(image.shape)}, tiles {tuple(tiles.shape)} (expected {expected}, "
            f"contiguous fp32) for tile rows {r0}..{r1} of {tiles_w} tiles"
        )
    return channels, height, width


def input_tiles(x: Tensor, r0: int, r1: int, tiles_w: int, out: Tensor) -> Tensor:
    """``out`` (36×tiles×C) ← Bᵀ d B of every 6×6 input tile d of tile rows r0..r1 of ``x`` (C×H×W)."""
    dims = _check(x, out, r0, r1, tiles_w)
    library().wino_input_tiles(x.data_ptr(), *dims, r0, r1, tiles_w, out.data_ptr(), torch.get_num_threads())
    return out


def output_tiles(m: Tensor, bias: Tensor | None, r0: int, r1: int, tiles_w: int, out: Tensor) -> None:
    """Tile rows r0..r1 of ``out`` (K×H×W) ← Aᵀ m A (+ ``bias``) from ``m`` (36×tiles×K)."""
    dims = _check(out, m, r0, r1, tiles_w)
    if bias is not None and (bias.shape != (dims[0],) or not bias.is_contiguous() or bias.dtype != torch.float32):
        raise ValueError(f"winograd_native: bias {tuple(bias.shape)} for {dims[0]} output channels")
    bias_ptr = None if bias is None else bias.data_ptr()
    library().wino_output_tiles(m.data_ptr(), bias_ptr, *dims, r0, r1, tiles_w, out.data_ptr(), torch.get_num_threads())


def grad_output_tiles(grad_out: Tensor, r0: int, r1: int, tiles_w: int, out: Tensor) -> Tensor:
    """``out`` (36×tiles×K) ← the gradient of the output transform, from ``grad_out`` (K×H×W)."""
    dims = _check(grad_out, out, r0, r1, tiles_w)
    library().wino_grad_output_tiles(grad_out.data_ptr(), *dims, r0, r1, tiles_w, out.data_ptr(), torch.get_num_threads())
    return out


def grad_input_fold(grad_v: Tensor, r0: int, r1: int, tiles_w: int, grad_x: Tensor) -> None:
    """Rows of ``grad_x`` (C×H×W) under tile rows r0..r1 ← the gradient of the input transform
    from ``grad_v`` (36×tiles×C), overlap-added. Call bands in increasing r0 per image: the first
    band writes, the two rows it shares with the next are added to."""
    dims = _check(grad_x, grad_v, r0, r1, tiles_w)
    library().wino_grad_input_fold(grad_v.data_ptr(), *dims, r0, r1, tiles_w, grad_x.data_ptr(), torch.get_num_threads())
