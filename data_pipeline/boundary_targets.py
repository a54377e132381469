"""UN-EPT's boundary targets (seed 001), derived from label maps on the trainer's device.

UN-EPT (following SegFix) supervises two extra heads: an *edge* map (is a pixel within a
few pixels of a label change?) and an 8-bin *direction* map for those pixels, pointing
from the boundary into the pixel's own segment. At refinement time a boundary pixel takes
the logits of the pixel one step along its predicted direction (``model.unept_heads``).
The official code reads both from precomputed ``dt_offset`` files (SegFix's distance and
angle maps); here they are a function of the label map, computed in torch where the label
batch already is (the GPU in training), so the loader worker does nothing extra.

For each pixel p with a valid label, q is the nearest pixel (Euclidean) whose label is a
*different valid* label, searched within ``radius`` by shifting the whole batch once per
window offset (π·r² shifts, ~80 for r = 5: elementwise passes over B×H×W, well under a
millisecond per batch on a GPU). Then

- edge(p) = 1 when |p − q| <= radius (SegFix/UN-EPT: distance map <= 5), else 0;
- direction(p) = the bin of the vector p − q (away from the other segment, into p's own),
  bins centred on the angles −180° + 45°·i of atan2(dy, dx) with y pointing down:
  0 left, 1 up-left, 2 up, 3 up-right, 4 right, 5 down-right, 6 down, 7 down-left
  (``DIRECTION_VECTORS``, the official code's 8-bin table); ``ignore_index`` off the edge.

Ignore-aware: ignored pixels (and crop padding, which is labelled ignore) get
``ignore_index`` in both maps and never make a neighbour an edge; the image border is not a
boundary. Equal-distance candidates resolve in a fixed order (by angle), so the result is
deterministic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# (dy, dx) unit step of each direction bin; y points down (row index), x right.
DIRECTION_VECTORS: tuple[tuple[int, int], ...] = (
    (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1),
)  # fmt: skip
NUM_DIRECTIONS = len(DIRECTION_VECTORS)


def direction_bin(dy: float, dx: float) -> int:
    """The 8-bin index of the vector (dy, dx) (rows down, columns right)."""
    angle = math.degrees(math.atan2(dy, dx))  # (-180, 180]
    return int(math.floor((angle + 180.0 + 22.5) / 45.0)) % NUM_DIRECTIONS


def window_offsets(radius: int) -> list[tuple[int, int, int]]:
    """(dy, dx, squared distance) of every non-zero offset within ``radius``, nearest first
    (ties by angle, so the search is deterministic)."""
    offsets = [
        (dy, dx, dy * dy + dx * dx)
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
        if 0 < dy * dy + dx * dx <= radius * radius
    ]
    return sorted(offsets, key=lambda o: (o[2], math.atan2(o[0], o[1])))


@torch.no_grad()
def boundary_targets(semantic: Tensor, radius: int = 5, ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """``semantic`` B×H×W (or H×W) labels -> (edge, direction), int64 of the same shape:
    edge in {0, 1, ignore_index}, direction in 0..7 on edge pixels, ``ignore_index``
    elsewhere (see the module docstring)."""
    if radius < 1:
        raise ValueError(f"boundary radius must be >= 1, got {radius}")
    squeeze = semantic.dim() == 2
    labels = (semantic[None] if squeeze else semantic).long()
    if labels.dim() != 3:
        raise ValueError(f"semantic must be H×W or B×H×W, got shape {tuple(semantic.shape)}")
    _, height, width = labels.shape
    padded = F.pad(labels, (radius, radius, radius, radius), value=ignore_index)
    valid = labels != ignore_index
    found = torch.zeros_like(valid)
    direction = torch.full_like(labels, ignore_index)
    for dy, dx, _ in window_offsets(radius):
        other = padded[:, radius + dy : radius + dy + height, radius + dx : radius + dx + width]
        # Nearest first: a pixel's first hit is its nearest different valid label.
        hit = (other != labels) & (other != ignore_index) & valid & ~found
        # p − q = (−dy, −dx): away from the other segment.
        direction = torch.where(hit, direction_bin(-dy, -dx), direction)
        found |= hit
    edge = torch.where(valid, found.long(), ignore_index)
    if squeeze:
        return edge[0], direction[0]
    return edge, direction
