"""Scratch buffers for kernels that loop over blocks of a large operation."""

from __future__ import annotations

import math

from torch import Tensor


class ScratchBuffers:
    """Named flat buffers, allocated on first use and reused by every later block of the
    same call, handed out as contiguous views of their first elements (a call's last
    block may be smaller than its first). One set of allocations per call instead of
    several per block: fewer allocator calls, and glibc neither grows its heap with the
    freed multi-MiB blocks nor trims and re-faults the same pages block after block (CPU
    memory is measured as resident set size)."""

    def __init__(self, like: Tensor) -> None:
        self.like = like
        self.buffers: dict[str, Tensor] = {}

    def get(self, name: str, *shape: int) -> Tensor:
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[name] = self.like.new_empty(numel)
        return buffer[:numel].view(shape)
