"""UN-EPT's building blocks besides the backbone and the deformable layers
(``model.deformable_encoder``): the spatial branch, the boundary heads and the boundary
refinement (seed 001).

- ``SpatialBranch``: three 3×3 stride-2 conv-BN blocks on the image (64, 128, 256
  channels; ReLU after the first two — the official code leaves the last one linear, as
  its output is added to the learned queries) -> stride 8.
- ``BoundaryHead``: 1×1 conv-BN-ReLU-1×1 conv on the spatial-branch features (the edge head
  has 2 outputs, boundary / not, as the official 2-way softmax; the direction head 8).
- ``refine_logits``: for pixels predicted as edge (p(edge) > 0.5), the logits are read at
  the pixel ``distance`` steps along the predicted direction bin (into the segment's
  interior, where predictions are more reliable); other pixels keep their own. The
  official code does this with ``grid_sample`` at integer offsets and border padding; a
  gather with clamped indices is the same and exact in any dtype. One difference: the
  official ``_get_offset`` marks edges by the raw edge-class logit (``mask_logits[:, 1] >
  0.5``), not by the softmax; here p(edge) > 0.5, i.e. logit[1] > logit[0].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.boundary_targets import DIRECTION_VECTORS, NUM_DIRECTIONS

# Every UN-EPT map (queries, logits before upsampling, boundary heads) is at stride 8.
UNEPT_STRIDE = 8


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int, relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SpatialBranch(nn.Sequential):
    """B×3×H×W normalised image -> B×C×⌈H/8⌉×⌈W/8⌉."""

    def __init__(self, out_channels: int = 256) -> None:
        super().__init__(
            conv_bn(3, 64, 3, 2, relu=True),
            conv_bn(64, 128, 3, 2, relu=True),
            conv_bn(128, out_channels, 3, 2, relu=False),
        )


class BoundaryHead(nn.Sequential):
    def __init__(self, channels: int, outputs: int) -> None:
        super().__init__(
            conv_bn(channels, channels, 1, 1, relu=True), nn.Conv2d(channels, outputs, 1, bias=False)
        )


def upsample_to_image(x: Tensor, image_size: tuple[int, int], stride: int = UNEPT_STRIDE) -> Tensor:
    """A B×C×⌈H/s⌉×⌈W/s⌉ map -> B×C×H×W aligned to the image: bilinear to s·h×s·w, then
    cropped (the backbone and spatial branch pad bottom/right), as ``model.inference``
    aligns stride-4 mask logits."""
    height, width = image_size
    h, w = x.shape[-2:]
    if (h, w) != (height, width):
        x = F.interpolate(x, size=(h * stride, w * stride), mode="bilinear", align_corners=False)
        x = x[..., :height, :width]
    return x


def refine_logits(logits: Tensor, edge_logits: Tensor, dir_logits: Tensor, distance: int = 1) -> Tensor:
    """``logits`` B×K×H×W, ``edge_logits`` B×2×H×W, ``dir_logits`` B×8×H×W (same H×W) ->
    B×K×H×W: edge pixels (p(edge) > 0.5) read the logits ``distance`` pixels along their
    predicted direction (clamped to the image), others keep theirs."""
    batch, classes, height, width = logits.shape
    if edge_logits.shape[-2:] != (height, width) or dir_logits.shape[-2:] != (height, width):
        raise ValueError(
            f"refine_logits: edge/direction maps {tuple(edge_logits.shape)}, {tuple(dir_logits.shape)} "
            f"must match the logits' {height}×{width}"
        )
    if dir_logits.shape[1] != NUM_DIRECTIONS or edge_logits.shape[1] != 2:
        raise ValueError("refine_logits: expects 2 edge logits and 8 direction logits per pixel")
    with torch.no_grad():
        edge = edge_logits[:, 1] > edge_logits[:, 0]  # softmax p(edge) > 0.5
        vectors = torch.tensor(DIRECTION_VECTORS, device=logits.device) * distance
        step = vectors[dir_logits.argmax(1)] * edge[..., None]  # B×H×W×2, zero off the edge
        rows = torch.arange(height, device=logits.device).view(1, height, 1)
        cols = torch.arange(width, device=logits.device).view(1, 1, width)
        source_rows = (rows + step[..., 0]).clamp_(0, height - 1)
        source_cols = (cols + step[..., 1]).clamp_(0, width - 1)
        index = (source_rows * width + source_cols).view(batch, 1, height * width).expand(-1, classes, -1)
    return logits.flatten(2).gather(2, index).view_as(logits)
