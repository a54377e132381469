"""UN-EPT, the Unified Efficient Pyramid Transformer (seed 001): per-pixel semantic
segmentation with a sparse-sampling (deformable) transformer and boundary refinement.

- context branch: the backbone's last three maps (the official dilated ResNet-50: res3..res5
  all at stride 8, 60×60 each for 480 crops; a plain ViT's simple feature pyramid without
  its stride-4 level: strides 8/16/32) are projected to ``hidden_dim`` and encoded
  (``model.deformable_encoder``) by deformable self-attention over all L = 3 levels, N = 16 points per head and level
  (``MSDeformAttn``). The decoder's queries are the stride-8 grid: a learned embedding per
  grid cell (``query_grid``², 60² = 3600 for the official 480 crops, resized bilinearly
  to other grids) *plus* the spatial branch's features at that cell (the official
  ``context + query_embed``); each decoder layer is query self-attention, deformable
  cross-attention into the encoded pyramid from the query's own position, FFN. Sine
  encodings of the grid position go into the attention queries/keys (the official
  decoder passes none; its learned embedding is the only position signal).
- spatial branch: three stride-2 conv-BN blocks on the image (stride 8, 256 channels),
  which also feed the boundary heads.
- a 1×1 classifier on the decoded grid gives K-class logits at stride 8, upsampled to the
  image (``coarse_logits``); the edge (2-way) and direction (8-bin) heads' predictions,
  upsampled likewise, shift the logits of predicted edge pixels one step along the
  predicted direction (``sem_logits``, what inference uses; see ``model.unept_heads``).

The R50 presets use the official backbone, mmseg's dilated ResNetV1c (timm's ``resnet50c``
with ``output_stride: 8``); any other backbone's strides 8/16/32 work as well (a pyramid, as
the paper's text describes, with 1/4 and 1/16 of the tokens at the coarser levels). Levels
of equal stride need nothing special: reference points and sampling locations are
normalised per level, and the level embedding tells the levels apart.

Differences to the official code: BatchNorm in the spatial branch and heads is per worker
(official: SyncBN), and the backbone's BatchNorm is frozen (``model.backbone.freeze_bn``;
official: trained SyncBN, ``norm_eval=False``). Inference uses the refined logits, as the
paper describes (boundary pixels are relabelled at test time, its Fig. 4); the official test
path (``base_segmentor.slide_inference``) averages the coarse logits, using the refinement
only inside the training loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.backbone import Backbone
from model.config import UNEPTConfig
from model.deformable_encoder import DeformableDecoderLayer, DeformableEncoder
from model.msdeform_pixel_decoder import encoder_reference_points
from model.unept_heads import (
    UNEPT_STRIDE,
    BoundaryHead,
    SpatialBranch,
    refine_logits,
    upsample_to_image,
)
from ops.config import OpsConfig


def keep_last_levels(backbone: Backbone, levels: int) -> None:
    """Make ``backbone`` return only its last ``levels`` maps. For a plain ViT the simple
    feature pyramid's unused finer levels are removed (no idle weights, which ZeRO
    dislikes, and no stride-4 deconvolutions computed for nothing)."""
    if len(backbone.channels) < levels:
        raise ValueError(
            f"model.unept.num_levels={levels} needs at least that many backbone maps; "
            f"model.backbone.out_indices gives {len(backbone.channels)}"
        )
    if backbone.pyramid is None:
        if len(backbone.channels) != levels:
            raise ValueError(
                f"model.backbone.out_indices: UN-EPT reads exactly model.unept.num_levels={levels} maps "
                f"(e.g. [2, 3, 4] for strides 8/16/32 on ResNets), got {len(backbone.channels)}"
            )
        return
    pyramid = backbone.pyramid
    pyramid.levels = nn.ModuleList(list(pyramid.levels)[-levels:])
    pyramid.channels, pyramid.strides = pyramid.channels[-levels:], pyramid.strides[-levels:]
    backbone.channels, backbone.strides = list(pyramid.channels), list(pyramid.strides)


class UNEPT(nn.Module):
    """``forward(images: B×3×H×W, uint8 or float on a 0..255 scale)`` ->
    ``{"sem_logits": B×K×H×W (refined), "coarse_logits": B×K×H×W, "edge_logits":
    B×2×⌈H/8⌉×⌈W/8⌉, "dir_logits": B×8×⌈H/8⌉×⌈W/8⌉}``, logits in the autocast dtype.

    The attribute name ``backbone`` is relied on by the optimizer (lower backbone lr).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        cfg: UNEPTConfig,
        ops: OpsConfig,
        pixel_mean: list[float],
        pixel_std: list[float],
    ) -> None:
        super().__init__()
        d = cfg.hidden_dim
        if d % cfg.nheads or d % 4:
            raise ValueError(f"model.unept.hidden_dim={d} must be a multiple of 4 and of nheads={cfg.nheads}")
        for key in ("num_levels", "num_points", "enc_layers", "dec_layers", "query_grid", "refine_distance"):
            if getattr(cfg, key) < 1:
                raise ValueError(f"model.unept.{key} must be >= 1, got {getattr(cfg, key)}")
        keep_last_levels(backbone, cfg.num_levels)
        self.backbone = backbone
        self.refine_distance = cfg.refine_distance
        # The shared Deformable DETR encoder (1×1 conv + GroupNorm projections; the official
        # UN-EPT projects with a bare 1×1 conv), over all L levels.
        self.encoder = DeformableEncoder(
            backbone.channels,
            d,
            cfg.nheads,
            cfg.dim_feedforward,
            cfg.dropout,
            cfg.enc_layers,
            cfg.num_points,
            ops,
        )
        self.query_embed = nn.Parameter(torch.empty(1, d, cfg.query_grid, cfg.query_grid))
        nn.init.normal_(self.query_embed)  # nn.Embedding's initialisation, as the official
        self.spatial_branch = SpatialBranch(d)
        self.decoder = nn.ModuleList(
            DeformableDecoderLayer(
                d, cfg.dim_feedforward, cfg.dropout, cfg.num_levels, cfg.nheads, cfg.num_points, ops
            )
            for _ in range(cfg.dec_layers)
        )
        self.classifier = nn.Conv2d(d, num_classes, kernel_size=1)
        self.edge_head = BoundaryHead(d, 2)
        self.dir_head = BoundaryHead(d, 8)
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError("model.pixel_mean and model.pixel_std must have 3 values (RGB)")
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1), False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1), False
        )

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"UNEPT expects B×3×H×W images, got shape {tuple(images.shape)}")
        x = (images.float() - self.pixel_mean) / self.pixel_std
        image_size = (images.shape[-2], images.shape[-1])
        memory, _, _, spatial_shapes, level_start_index = self.encoder(self.backbone(x))

        spatial = self.spatial_branch(x)  # B×C×h×w, h = ⌈H/8⌉
        batch, channels, h, w = spatial.shape
        queries = self.query_embed
        if queries.shape[-2:] != (h, w):
            queries = F.interpolate(queries, size=(h, w), mode="bilinear", align_corners=False)
        tgt = (spatial + queries).flatten(2).transpose(1, 2)
        query_pos = self.encoder.pe_layer(spatial).flatten(2).transpose(1, 2)
        reference_points = encoder_reference_points([(h, w)], spatial.device)[:, :, None].expand(
            batch, -1, len(self.encoder.input_proj), -1
        )
        for layer in self.decoder:
            tgt = layer(tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index)
        decoded = tgt.transpose(1, 2).reshape(batch, channels, h, w)

        edge_logits, dir_logits = self.edge_head(spatial), self.dir_head(spatial)
        coarse = upsample_to_image(self.classifier(decoded), image_size, UNEPT_STRIDE)
        refined = refine_logits(
            coarse,
            upsample_to_image(edge_logits, image_size, UNEPT_STRIDE),
            upsample_to_image(dir_logits, image_size, UNEPT_STRIDE),
            self.refine_distance,
        )
        return {
            "sem_logits": refined,
            "coarse_logits": coarse,
            "edge_logits": edge_logits,
            "dir_logits": dir_logits,
        }
