"""timm backbone as a feature pyramid: a list of NCHW maps at increasing strides (4/8/16/32),
or equal ones from a dilated CNN (``timm_kwargs: {output_stride: 8}``).

Everything timm-specific lives here: building the ``features_only`` model, converting
NHWC outputs (Swin, MambaOut, ...) to NCHW, arbitrary input sizes, the simple feature
pyramid in front of plain ViTs, activation checkpointing, and loading local pretrained
weights through ``model.pretrained``. The rest of the model only sees ``channels``, ``strides`` and a list of NCHW
tensors.

Families (decided from the timm model name):

- CNNs (``resnet50``, ``resnet101``, ...): used as timm builds them, with every
  BatchNorm frozen (``model.backbone.freeze_bn``, on by default): detectron2's FrozenBN,
  which MaskFormer trains its ResNets with. Naming trap: MaskFormer's "R101c" is
  detectron2's DeepLab ResNet with a 64-64-128 stem, which timm calls ``resnet101s``;
  timm's ``resnet101c`` (and ``resnet50c``) has a 32-32-64 stem. A ``resnet*c`` name
  therefore warns, except for UN-EPT, whose official R50 is mmseg's ResNetV1c: exactly
  timm's ``resnet50c``. ``timm_kwargs: {output_stride: 8}`` dilates res4/res5 (as mmseg's
  ``contract_dilation=True``: the first block of a stage keeps the previous dilation), so
  res3..res5 all come out at stride 8; only UN-EPT reads such equal strides.
- Swin (``swin_*``): built with ``strict_img_size=False`` (attention masks made per
  input size) and ``always_partition=True`` (window 7/12 and the half-window shift at
  every stage, whatever the feature size, as Swin's segmentation code does; timm would
  otherwise shrink the window and drop the shift when a stage is no larger than its
  window at the construction size). Each block pads its map to a multiple of the window
  *before* the cyclic shift and projects only the map's tokens, not the padding
  (``model.swin_block.SwinBlock``), and a LayerNorm normalises each output map, as
  MaskFormer's ``D2SwinTransformer`` does.
- Plain ViTs (``vit_*``, ``deit_*``): built with ``dynamic_img_size=True`` (position
  embeddings resampled to each input), one stride-16 map from the block in
  ``out_indices`` (e.g. ``[-1]``), turned into strides 4/8/16/32 by
  ``SimpleFeaturePyramid`` (ViTDet).

``model.backbone.timm_kwargs`` overrides any of these defaults.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import ops.torchvision_fix  # noqa: F401  (must run before timm imports torchvision)

# isort: split
import timm
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from timm.models import is_model_in_modules
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from model.config import BackboneConfig
from model.pretrained import load_pretrained
from model.simple_feature_pyramid import SimpleFeaturePyramid
from model.swin_block import use_segmentation_swin_blocks

logger = logging.getLogger(__name__)

# timm's deep-stem "c" ResNets (32-32-64 stem), easily mistaken for MaskFormer's R101c.
_TIMM_C_RESNET = re.compile(r"resnet(\d+)c")

# timm keyword defaults per family (see the module docstring); the config's
# ``timm_kwargs`` win over them.
_FAMILY_KWARGS: dict[str, dict[str, Any]] = {
    "swin": {"strict_img_size": False, "always_partition": True},
    "vit": {"dynamic_img_size": True},
    "cnn": {},
}


def warn_if_timm_c_resnet(name: str) -> None:
    """One-line warning for ``resnet50c``/``resnet101c``/...: a different stem than MaskFormer's "c"."""
    match = _TIMM_C_RESNET.fullmatch(name.split(".")[0])  # "resnet101c.gluon_in1k" too
    if match:
        depth = match.group(1)
        warnings.warn(
            f"model.backbone.name={name!r} is timm's 32-32-64 deep stem, not MaskFormer's R{depth}c "
            f"(detectron2's DeepLab stem 64-64-128 = timm's 'resnet{depth}s'): "
            f"set model.backbone.name=resnet{depth}s for the paper's variant",
            UserWarning,
            stacklevel=3,
        )


def backbone_family(name: str) -> str:
    """``"swin"``, ``"vit"`` or ``"cnn"`` (anything else timm builds) for a timm model name."""
    if is_model_in_modules(name, ["swin_transformer"]):
        return "swin"
    if is_model_in_modules(name, ["vision_transformer", "deit"]):
        return "vit"
    return "cnn"


class _FrozenBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's FrozenBN (what ``timm.layers.freeze_batch_norm_2d`` makes), keeping
    the input's dtype as detectron2's does: the fp32 scale and shift are folded in fp32,
    then cast, so under bf16 autocast the activations stay bf16 (torchvision's promotes
    them to fp32, doubling the memory of every ResNet activation after a norm)."""

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)


def _freeze_batch_norm(body: nn.Module) -> None:
    freeze_batch_norm_2d(body)
    for module in body.modules():
        if type(module) is FrozenBatchNorm2d:
            module.__class__ = _FrozenBatchNorm2d  # same buffers and state-dict keys


class Backbone(nn.Module):
    """``forward(x: B×3×H×W) -> [B×C_i×⌈H/s_i⌉×⌈W/s_i⌉ per level]``, strides increasing
    (or equal, for a CNN dilated with ``timm_kwargs`` ``output_stride``).

    Any H×W works: the input is zero-padded bottom/right to a multiple of the coarsest
    stride (after normalisation, as detectron2's ``ImageList`` pads MaskFormer's inputs
    to ``size_divisibility`` 32) and the maps are cropped back to ``⌈H/s⌉×⌈W/s⌉``.
    """

    def __init__(
        self,
        name: str,
        out_indices: Sequence[int] = (1, 2, 3, 4),
        pretrained_path: str = "",
        grad_checkpointing: bool = False,
        timm_kwargs: Mapping[str, Any] | None = None,
        pyramid_channels: int = 256,
        freeze_bn: bool = True,
        warn_timm_c_stem: bool = True,
    ) -> None:
        super().__init__()
        self.name = name
        self.family = backbone_family(name)
        if warn_timm_c_stem:
            warn_if_timm_c_resnet(name)
        # A null value means timm's default: a preset can undo a key of its base file (the
        # DeiT UN-EPT presets drop the R50 preset's output_stride).
        kwargs = {**_FAMILY_KWARGS[self.family], **dict(timm_kwargs or {})}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        try:
            # pretrained=False: weights never come from a hub at run time, only from
            # ``pretrained_path`` (clusters often have no internet, and runs must be
            # reproducible from local files).
            self.body = timm.create_model(
                name, pretrained=False, features_only=True, out_indices=tuple(out_indices), **kwargs
            )
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ValueError(f"model.backbone.name={name!r} is not a timm model (see timm.list_models())") from None
            raise
        except TypeError as err:
            if "unexpected keyword argument" in str(err):
                raise ValueError(f"model.backbone.timm_kwargs: {err}") from None
            raise
        except (IndexError, AssertionError) as err:
            # timm fails deep inside: "list index out of range", or (ViTs) an assert
            # "feature index 50 is out of range"; other asserts are not ours to rename.
            if isinstance(err, AssertionError) and "out of range" not in str(err):
                raise
            raise ValueError(
                f"model.backbone.out_indices={list(out_indices)} is out of range for {name!r} "
                "(ResNets have levels 0-4 with 0 at stride 2; Swin/ConvNeXt have 0-3 starting at stride 4; "
                "ViTs number their blocks, e.g. [-1] for the last)"
            ) from None
        info = self.body.feature_info
        channels: list[int] = list(info.channels())
        strides: list[int] = list(info.reduction())
        self.pyramid: SimpleFeaturePyramid | None = None
        if len(set(strides)) == 1 and (self.family == "vit" or len(strides) == 1):
            # Plain ViTs: every block is at one stride; ViTDet's pyramid reads one map.
            if len(strides) != 1:
                raise ValueError(
                    f"model.backbone.out_indices={list(out_indices)} selects {len(strides)} maps of {name!r}, all at "
                    f"stride {strides[0]}; the simple feature pyramid reads one block's map: give one index, e.g. [-1]"
                )
            self.pyramid = SimpleFeaturePyramid(channels[0], pyramid_channels, in_stride=strides[0])
            channels, strides = list(self.pyramid.channels), list(self.pyramid.strides)
        elif any(b < a for a, b in zip(strides, strides[1:])):
            # Equal strides pass: a dilated CNN (timm's output_stride), for UN-EPT; the
            # other models refuse them in ``model.build``.
            raise ValueError(
                f"model.backbone: {name!r} with out_indices={list(out_indices)} gives strides {strides}; "
                "the pixel decoder needs strictly increasing strides (e.g. 4/8/16/32)"
            )
        self.channels: list[int] = channels
        self.strides: list[int] = strides
        self.size_divisibility = strides[-1]
        # Some timm feature wrappers report their layout (Swin: NHWC); others are NCHW.
        # (timm's Format is a str enum, so it compares equal to its value.)
        self.nhwc = getattr(self.body, "output_fmt", "NCHW") == "NHWC"
        self.output_norms: nn.ModuleList | None = None
        if self.family == "swin":
            use_segmentation_swin_blocks(self.body)
            # Swin is pre-norm: a stage's output is the raw residual stream.
            self.output_norms = nn.ModuleList(nn.LayerNorm(c) for c in info.channels())
        if freeze_bn and self.family == "cnn":
            # detectron2's FrozenBN: BatchNorm statistics of 2 crops per worker are noise,
            # so the ImageNet statistics and affine stay fixed, even in .train() mode. The
            # affine become buffers (same state-dict keys, so pretrained weights load into
            # them); ``describe`` still counts them in the total, as the papers do.
            _freeze_batch_norm(self.body)
            if not pretrained_path and not any(p.is_meta for p in self.body.parameters()):
                # Frozen at init, BN is the identity and timm's zero-initialised last
                # gamma of each residual block stays zero: the residual branches never
                # learn. Right for a resumed run, wrong for training from scratch.
                logger.warning(
                    "model.backbone.freeze_bn=true on a randomly initialised %r: BatchNorm stays at its init "
                    "(set model.backbone.pretrained_path, or freeze_bn=false to train from scratch)", name)
        if grad_checkpointing:
            self.set_grad_checkpointing(True)
        if pretrained_path:
            load_pretrained(self.body, pretrained_path)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass instead of keeping them.

        Block by block where timm can (ViT blocks via ``model.set_grad_checkpointing``;
        Swin and other staged models through each stage's ``grad_checkpointing``), else
        stage by stage through the features wrapper (ResNets; timm leaves out the first
        and last stages). timm checkpoints non-reentrantly unless ``TIMM_REENTRANT_CKPT=1``
        is set, which ZeRO-3 needs (DESIGN.md section 4).
        """
        inner = getattr(self.body, "model", None)
        if isinstance(inner, nn.Module) and hasattr(inner, "set_grad_checkpointing"):
            inner.set_grad_checkpointing(enable)
            return
        stages = [m for m in self.body.children() if hasattr(m, "grad_checkpointing")]
        if stages:
            # Not the wrapper's own switch too: nested checkpoints would recompute twice.
            for stage in stages:
                stage.grad_checkpointing = enable
            return
        if not hasattr(self.body, "set_grad_checkpointing"):
            raise ValueError(f"model.backbone.grad_checkpointing: timm model {self.name!r} does not support it")
        self.body.set_grad_checkpointing(enable)

    def forward(self, x: Tensor) -> list[Tensor]:
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.size_divisibility, -width % self.size_divisibility
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        features = list(self.body(x))
        if self.output_norms is not None:
            features = [norm(f) for norm, f in zip(self.output_norms, features)]
        if self.nhwc:
            # The one place layouts are reconciled; contiguous so later convs get the
            # fast NCHW kernels instead of strided views.
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        if self.pyramid is not None:
            features = self.pyramid(features[-1])
        if pad_h or pad_w:
            features = [
                f[..., : math.ceil(height / s), : math.ceil(width / s)] for f, s in zip(features, self.strides)
            ]
        return features


def build_backbone(cfg: BackboneConfig, warn_timm_c_stem: bool = True) -> Backbone:
    return Backbone(
        cfg.name,
        out_indices=cfg.out_indices,
        pretrained_path=cfg.pretrained_path,
        grad_checkpointing=cfg.grad_checkpointing,
        timm_kwargs=cfg.timm_kwargs,
        pyramid_channels=cfg.pyramid_channels,
        freeze_bn=cfg.freeze_bn,
        warn_timm_c_stem=warn_timm_c_stem,
    )
