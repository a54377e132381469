"""``build_model`` / ``build_criterion``: the only place that maps a ``ModelConfig`` to modules.

Plain ``if``s, no registry: one look tells which class runs for which ``model.name``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from model.backbone import build_backbone
from model.config import ModelConfig
from model.criterion import ClassLoss, SetCriterion
from model.maskformer import MaskFormer
from model.matcher import FixedMatcher, HungarianMatcher
from model.panoptic_segformer import PanopticSegFormer
from model.pft import PFT
from model.pft_decoder import build_pft_predictor
from model.pixel_decoder import build_pixel_decoder
from model.psf_criterion import PanopticSegFormerCriterion
from model.transformer_decoder import build_transformer_predictor
from model.unept import UNEPT
from model.unept_criterion import UNEPTCriterion

SUPPORTED_MODELS = ("maskformer", "pft", "unept", "panoptic_segformer")


def _check_name(cfg: ModelConfig) -> None:
    if cfg.name not in SUPPORTED_MODELS:
        raise ValueError(
            f"model.name={cfg.name!r} is not supported; supported values: {', '.join(SUPPORTED_MODELS)}"
        )
    if cfg.num_classes < 1:
        raise ValueError(f"model.num_classes must be >= 1, got {cfg.num_classes}")


def build_meta_model(cfg: ModelConfig) -> nn.Module:
    """``build_model(cfg)`` with shapes only: on the ``meta`` device, no weights file read
    (Swin-L in about a second). For counting (``describe``) and checking a config before a
    run starts (``launcher.preflight``)."""
    cfg = copy.deepcopy(cfg)
    cfg.backbone.pretrained_path = ""
    with torch.device("meta"):
        return build_model(cfg)


def build_model(cfg: ModelConfig) -> MaskFormer | PFT | UNEPT | PanopticSegFormer:
    _check_name(cfg)
    # UN-EPT's official R50 is mmseg's ResNetV1c, which *is* timm's 32-32-64 "c" stem:
    # the warning about MaskFormer's R101c (timm's "s" stem) does not apply to it.
    backbone = build_backbone(cfg.backbone, warn_timm_c_stem=cfg.name != "unept")
    if cfg.name == "unept":
        # Per-pixel classifier on its own deformable encoder/decoder: no pixel decoder.
        # It also reads equal strides (a dilated ResNet, as the official 8/8/8).
        return UNEPT(backbone, cfg.num_classes, cfg.unept, cfg.ops, cfg.pixel_mean, cfg.pixel_std)
    strides = backbone.strides
    if any(b <= a for a, b in zip(strides, strides[1:])):
        raise ValueError(
            f"model.backbone: {cfg.backbone.name!r} with timm_kwargs={cfg.backbone.timm_kwargs} gives strides "
            f"{strides}; model.name={cfg.name} needs strictly increasing strides (e.g. 4/8/16/32): "
            "a dilated backbone (output_stride) is for model.name=unept only"
        )
    if cfg.name == "panoptic_segformer":
        # Its own deformable encoder on strides 8/16/32 (model.pixel_decoder unused).
        psf = cfg.panoptic_segformer
        return PanopticSegFormer(backbone, cfg.num_classes, psf, cfg.pixel_mean, cfg.pixel_std, cfg.ops)
    pixel_decoder = build_pixel_decoder(cfg.pixel_decoder, backbone.channels, cfg.ops)
    if cfg.name == "pft":
        # PFT reads the pixel decoder's whole pyramid (conv_dim channels per scale).
        pft = build_pft_predictor(
            cfg.pft, pixel_decoder.conv_dim, pixel_decoder.mask_dim, cfg.num_classes, cfg.ops
        )
        return PFT(backbone, pixel_decoder, pft, cfg.pixel_mean, cfg.pixel_std)
    # MaskFormer's transformer reads the pixel decoder's ``transformer_feature`` (for the
    # FPN: the backbone's res5 map, not an FPN level).
    predictor = build_transformer_predictor(
        cfg.decoder, pixel_decoder.transformer_channels, cfg.num_classes, pixel_decoder.mask_dim, cfg.ops
    )
    return MaskFormer(backbone, pixel_decoder, predictor, cfg.pixel_mean, cfg.pixel_std)


def build_criterion(cfg: ModelConfig) -> SetCriterion | UNEPTCriterion | PanopticSegFormerCriterion:
    _check_name(cfg)
    if cfg.name == "panoptic_segformer":
        # Its own matching and losses (model.matcher and model.loss unused).
        return PanopticSegFormerCriterion(cfg.num_classes, cfg.panoptic_segformer)
    if cfg.name == "unept":
        u = cfg.unept
        return UNEPTCriterion(cfg.num_classes, edge_radius=u.edge_radius, coarse_weight=u.coarse_weight,
                              refined_weight=u.refined_weight, edge_weight=u.edge_weight,
                              direction_weight=u.direction_weight)
    matcher: FixedMatcher | HungarianMatcher
    class_loss: ClassLoss
    if cfg.name == "pft":
        # One query per class: query i answers class i, no matching (model.matcher unused);
        # one sigmoid logit per query, "class i is in the image" (BCE + focal-CE, no
        # "no object" column, so model.loss.no_object_weight is unused).
        matcher = FixedMatcher()
        class_loss = "sigmoid"
    else:
        class_loss = "softmax"  # K+1-way softmax CE with the no-object weight
        matcher = HungarianMatcher(
            cost_class=cfg.matcher.cost_class,
            cost_focal=cfg.matcher.cost_focal,
            cost_dice=cfg.matcher.cost_dice,
            focal_alpha=cfg.loss.focal_alpha,
            focal_gamma=cfg.loss.focal_gamma,
            num_points=cfg.matcher.num_points,
        )
    return SetCriterion(
        cfg.num_classes,
        matcher,
        class_loss=class_loss,
        class_weight=cfg.loss.class_weight,
        focal_weight=cfg.loss.focal_weight,
        dice_weight=cfg.loss.dice_weight,
        no_object_weight=cfg.loss.no_object_weight,
        focal_alpha=cfg.loss.focal_alpha,
        focal_gamma=cfg.loss.focal_gamma,
        focal_ce_weight=cfg.loss.focal_ce_weight,
        num_points=cfg.loss.num_points,
        oversample_ratio=cfg.loss.oversample_ratio,
        importance_sample_ratio=cfg.loss.importance_sample_ratio,
    )
