"""Typed configuration of the ``model`` section (owned here, composed by ``launcher``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class BackboneConfig:
    # Any timm model name that supports ``features_only``.
    name: str = "resnet50"
    # Local file with pretrained weights (.pth/.pt/.safetensors); "" = random init.
    # Never downloaded from a hub at run time.
    pretrained_path: str = ""
    # timm feature indices; the default picks strides 4/8/16/32 on ResNets. Swin and
    # ConvNeXt have no stride-2 level: use [0, 1, 2, 3] for them.
    out_indices: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    # Extra keyword arguments for ``timm.create_model`` (e.g. drop_path_rate).
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # Activation checkpointing of the backbone blocks.
    grad_checkpointing: bool = False


@dataclass
class PixelDecoderConfig:
    # MaskFormer's FPN pixel decoder (BasePixelDecoder).
    conv_dim: int = 256
    mask_dim: int = 256
    norm: str = "GN"  # "GN" (32 groups, or fewer for narrow convs) or "" for none


@dataclass
class TransformerDecoderConfig:
    # DETR-style decoder on the stride-32 feature, as in MaskFormer.
    num_queries: int = 100
    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 6
    dropout: float = 0.1
    pre_norm: bool = False
    enforce_input_project: bool = False
    # Number of linear layers of the mask-embedding MLP (MaskFormer: 3 = 2 hidden).
    mask_embed_layers: int = 3
    deep_supervision: bool = True


@dataclass
class MatcherConfig:
    cost_class: float = 1.0
    cost_focal: float = 20.0
    cost_dice: float = 1.0


@dataclass
class LossConfig:
    class_weight: float = 1.0
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    no_object_weight: float = 0.1
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class ModelConfig:
    name: str = "maskformer"
    num_classes: int = 150
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: TransformerDecoderConfig = field(default_factory=TransformerDecoderConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # Input normalisation (ImageNet statistics, 0-255 scale), applied inside the model
    # so loaders can ship uint8 images.
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
