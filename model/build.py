"""``build_model`` / ``build_criterion``: the only place that maps a ``ModelConfig`` to modules.

Plain ``if``s, no registry: one look tells which class runs for which ``model.name``.
"""

from __future__ import annotations

from model.backbone import build_backbone
from model.config import ModelConfig
from model.criterion import SetCriterion
from model.maskformer import MaskFormer
from model.matcher import HungarianMatcher
from model.pixel_decoder import build_pixel_decoder
from model.transformer_decoder import build_transformer_predictor

SUPPORTED_MODELS = ("maskformer",)


def _check_name(cfg: ModelConfig) -> None:
    if cfg.name not in SUPPORTED_MODELS:
        raise ValueError(f"model.name={cfg.name!r} is not supported; supported values: {', '.join(SUPPORTED_MODELS)}")
    if cfg.num_classes < 1:
        raise ValueError(f"model.num_classes must be >= 1, got {cfg.num_classes}")


def build_model(cfg: ModelConfig) -> MaskFormer:
    _check_name(cfg)
    backbone = build_backbone(cfg.backbone)
    pixel_decoder = build_pixel_decoder(cfg.pixel_decoder, backbone.channels)
    # MaskFormer's transformer reads the backbone's coarsest map (res5), not an FPN level.
    predictor = build_transformer_predictor(
        cfg.decoder, backbone.channels[-1], cfg.num_classes, cfg.pixel_decoder.mask_dim
    )
    return MaskFormer(backbone, pixel_decoder, predictor, cfg.pixel_mean, cfg.pixel_std)


def build_criterion(cfg: ModelConfig) -> SetCriterion:
    _check_name(cfg)
    matcher = HungarianMatcher(
        cost_class=cfg.matcher.cost_class,
        cost_focal=cfg.matcher.cost_focal,
        cost_dice=cfg.matcher.cost_dice,
        focal_alpha=cfg.loss.focal_alpha,
        focal_gamma=cfg.loss.focal_gamma,
    )
    return SetCriterion(
        cfg.num_classes,
        matcher,
        class_weight=cfg.loss.class_weight,
        focal_weight=cfg.loss.focal_weight,
        dice_weight=cfg.loss.dice_weight,
        no_object_weight=cfg.loss.no_object_weight,
        focal_alpha=cfg.loss.focal_alpha,
        focal_gamma=cfg.loss.focal_gamma,
    )
