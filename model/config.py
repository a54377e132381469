"""Typed configuration of the ``model`` section (owned here, composed by ``launcher``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ops.config import OpsConfig

# Each section's RULES are value ranges checked when a config is loaded (the specs are
# launcher.typed_config.check_rules's); what depends on the architecture (head counts that
# divide widths, thing classes below num_classes, ...) is checked as the model builds.
_SIZES = "hidden_dim nheads dim_feedforward"


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
    # Extra keyword arguments for ``timm.create_model`` (e.g. drop_path_rate; output_stride: 8
    # dilates a ResNet's res4/res5, all of res3..res5 at stride 8, for UN-EPT); {} = timm's defaults.
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # Activation checkpointing of the backbone blocks.
    grad_checkpointing: bool = False
    # Freeze BatchNorm statistics and affine parameters of CNN backbones (detectron2's
    # FrozenBN, which MaskFormer trains ResNets with): batch statistics over 2 crops per
    # worker are noise.
    freeze_bn: bool = True
    # Plain ViTs (ViT-L, DeiT-B) have one stride-16 map: a simple feature pyramid
    # (ViTDet: x4, x2, x1, x1/2) turns it into strides 4/8/16/32 with this many channels.
    # Used only for backbones whose features all share one stride.
    pyramid_channels: int = 256

    RULES: ClassVar[dict[str, str]] = {"out_indices": "non-empty", "pyramid_channels": "positive int"}


@dataclass
class PixelDecoderConfig:
    # "fpn": MaskFormer's FPN (BasePixelDecoder); "msdeformattn": Mask2Former's
    # multi-scale deformable-attention encoder over strides 8/16/32 plus an FPN step to 4.
    name: Literal["fpn", "msdeformattn"] = "fpn"
    conv_dim: int = 256
    mask_dim: int = 256
    norm: str = "GN"  # "GN" (32 groups, or fewer for narrow convs) or "" for none
    # msdeformattn only (Mask2Former defaults).
    encoder_layers: int = 6
    encoder_nheads: int = 8
    encoder_dim_feedforward: int = 1024
    encoder_dropout: float = 0.0
    encoder_num_points: int = 4
    # Activation checkpointing (reentrant, so ZeRO-3 works): the FPN recomputes each
    # level's lateral + output convs in backward, the msdeformattn decoder each encoder
    # layer and its FPN step. At stride 4 these are the largest maps a MaskFormer saves
    # outside the backbone.
    grad_checkpointing: bool = False

    RULES: ClassVar[dict[str, str]] = {
        "conv_dim mask_dim encoder_layers encoder_nheads encoder_dim_feedforward encoder_num_points": "positive int",
        "encoder_dropout": "[0, 1)",
    }


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
    # Activation checkpointing of each decoder layer (reentrant, so ZeRO-3 works).
    grad_checkpointing: bool = False
    # Number of linear layers of the mask-embedding MLP (MaskFormer: 3 = 2 hidden).
    mask_embed_layers: int = 3
    deep_supervision: bool = True

    RULES: ClassVar[dict[str, str]] = {
        f"num_queries {_SIZES} dec_layers mask_embed_layers": "positive int", "dropout": "[0, 1)"}


@dataclass
class PFTDecoderConfig:
    """Pyramid Fusion Transformer decoder (seed 000): one decoder per scale (strides
    4/8/16/32), K zero-initialised category queries per scale (one per class)."""

    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 6
    # Seed 000 gives no decoder dropout; 0.0 (Mask2Former's decoder value) is a choice, not
    # the paper's. MaskFormer's DETR decoder, which PFT replaces, uses 0.1 (model.decoder).
    dropout: float = 0.0
    pre_norm: bool = False
    mask_embed_layers: int = 3
    deep_supervision: bool = True
    # Activation checkpointing of each decoder layer (reentrant, so ZeRO-3 works).
    grad_checkpointing: bool = False

    RULES: ClassVar[dict[str, str]] = {f"{_SIZES} dec_layers mask_embed_layers": "positive int", "dropout": "[0, 1)"}


@dataclass
class PanopticSegFormerConfig:
    """Panoptic SegFormer (seed 004; the official panformer config): a deformable encoder
    on strides 8/16/32 (+ 64), a location decoder for the thing queries (boxes refine its
    references; its last class head scores the things), and mask decoders for the thing
    queries and the one-per-class stuff queries whose cross-attention maps are fused into
    the masks."""

    # Contiguous class ids that are "things" (COCO panoptic: the first 80 of 133); every
    # other class of model.num_classes is "stuff" and gets its own fixed query.
    thing_classes: list[int] = field(default_factory=lambda: list(range(80)))
    num_queries: int = 300  # thing queries
    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 1024
    dropout: float = 0.1
    encoder_layers: int = 6
    location_layers: int = 6
    # The official head decodes masks with two decoders: 4 layers for the thing queries
    # (cross-attention only) and 6 for the stuff queries (with query self-attention);
    # the paper's 51M (R50) / 221M (Swin-L) parameters count both.
    thing_mask_layers: int = 4
    stuff_mask_layers: int = 6
    # The official ChannelMapper adds a stride-64 level (3x3 stride-2 conv + GroupNorm on
    # the backbone's last map) for the encoder and the location decoder; the mask
    # decoders attend to strides 8/16/32 only. false = the seed's three levels.
    extra_level: bool = True
    num_points: int = 4  # deformable sampling points per head and level
    # Losses (official weights): focal class (things: on the location decoder), dice mask,
    # L1 + GIoU boxes; class, L1, GIoU and dice weights are also the matching costs.
    class_weight: float = 2.0  # the things' focal class loss (location decoder)
    # The official stuff class loss is its loss_cls (weight 2) times another 2.
    stuff_class_weight: float = 4.0
    dice_weight: float = 2.0
    box_l1_weight: float = 5.0
    giou_weight: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0

    RULES: ClassVar[dict[str, str]] = {
        f"num_queries {_SIZES} encoder_layers location_layers thing_mask_layers stuff_mask_layers num_points":
            "positive int",
        "dropout": "[0, 1)",
        "class_weight stuff_class_weight dice_weight box_l1_weight giou_weight focal_gamma": ">= 0",
        "focal_alpha": "[0, 1]",
    }


@dataclass
class UNEPTConfig:
    """UN-EPT (seed 001; official configs ``res50_unept_ade20k.py``/``deit_unept_ade20k.py``):
    deformable encoder/decoder over the backbone's last three maps (the official dilated R50:
    all at stride 8; else strides 8/16/32), learned queries on the stride-8 grid plus the
    spatial branch, per-pixel classifier, boundary refinement."""

    hidden_dim: int = 256
    nheads: int = 8
    num_levels: int = 3  # L: the backbone's last three maps (strides 8/8/8 dilated, or 8/16/32)
    num_points: int = 16  # N: sampling points per head and level (the paper's best)
    enc_layers: int = 2  # the official configs' depth=2 (encoder and decoder)
    dec_layers: int = 2
    dim_feedforward: int = 2048
    dropout: float = 0.1
    # Side of the learned query grid (official: 3600 = 60x60 queries for 480 crops),
    # bilinearly resized to the actual stride-8 grid of other input sizes.
    query_grid: int = 60
    # Boundary targets: pixels within this distance of a label change are edges.
    edge_radius: int = 5
    # Refinement step along the predicted direction, in output pixels (official: 1).
    refine_distance: int = 1
    # Loss weights (official): 0.8 CE(coarse) + 1 CE(refined) + 5 edge + 0.6 direction.
    coarse_weight: float = 0.8
    refined_weight: float = 1.0
    edge_weight: float = 5.0
    direction_weight: float = 0.6

    RULES: ClassVar[dict[str, str]] = {
        f"{_SIZES} num_levels num_points enc_layers dec_layers query_grid edge_radius": "positive int",
        "dropout": "[0, 1)",
        "refine_distance coarse_weight refined_weight edge_weight direction_weight": ">= 0",
    }


@dataclass
class MatcherConfig:
    cost_class: float = 1.0
    cost_focal: float = 20.0
    cost_dice: float = 1.0
    # Points sampled per mask for the matching costs; 0 = compare whole masks.
    num_points: int = 0

    RULES: ClassVar[dict[str, str]] = {"cost_class cost_focal cost_dice num_points": ">= 0"}


@dataclass
class LossConfig:
    class_weight: float = 1.0
    # PFT's focal-style cross-entropy on the class logits (lambda_focal-ce; 0 = off).
    focal_ce_weight: float = 0.0
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    no_object_weight: float = 0.1
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # Mask2Former's point-sampled mask loss: 0 = full-resolution masks; else the number
    # of points per mask (12544 in Mask2Former), chosen by importance sampling.
    num_points: int = 0
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75

    RULES: ClassVar[dict[str, str]] = {
        "class_weight focal_ce_weight focal_weight dice_weight no_object_weight focal_gamma num_points": ">= 0",
        "focal_alpha importance_sample_ratio": "[0, 1]",
        "oversample_ratio": ">= 1",
    }


@dataclass
class InferenceConfig:
    # Resize each image so its short side is this many pixels before inference and map
    # the prediction back (MaskFormer's test pipeline: the training short side, 512 or
    # 640); 0 = keep the stored size. ``scales`` multiply this size.
    short_side: int = 0
    # ... with the long side capped at this many pixels (detectron2's MAX_SIZE_TEST: 4×
    # the crop in MaskFormer's configs); ``scales`` multiply it too. 0 = no cap.
    max_size: int = 0
    # Sliding-window inference for images larger than the training crop: window side
    # (0 = whole image in one pass) and stride between windows.
    window_size: int = 0
    window_stride: int = 0
    # Multi-scale + flip test-time augmentation: short-side scales relative to the
    # input (e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]); [1.0] and no flip = single scale.
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False

    RULES: ClassVar[dict[str, str]] = {"short_side max_size window_size window_stride": ">= 0", "scales": "> 0"}


@dataclass
class PanopticInferenceConfig:
    """Panoptic post-processing (``model.panoptic``); defaults are the papers'."""

    # MaskFormer/Mask2Former rule (their ADE20K/COCO panoptic configs: 0.8 / 0.8): keep
    # queries whose top class is not "no object" and scores > object_mask_threshold; drop
    # a query whose argmax area / own (mask >= 0.5) area is < overlap_threshold.
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    # Panoptic SegFormer mask-wise merging (official code's defaults): score =
    # p_class^class_exponent * mean_mask_prob^mask_exponent, masks binarised at
    # > mask_threshold, mean = sum / (area + mask_area_offset); drop scores below
    # confidence_threshold (stuff: stuff_confidence_threshold, null = the same) and masks
    # with more than thing_overlap / stuff_overlap of their pixels already painted.
    class_exponent: float = 1.0
    mask_exponent: float = 2.0
    confidence_threshold: float = 0.25
    stuff_confidence_threshold: float | None = None
    thing_overlap: float = 0.4
    stuff_overlap: float = 0.2
    mask_threshold: float = 0.5
    mask_area_offset: float = 1.0
    # The things merged: the top this many (thing query, class) pairs of the sigmoid class
    # scores, so a query may enter with two classes (the official test_cfg max_per_img,
    # mmdet's top-k over Q×C); 0 = every thing query with its best class.
    max_thing_detections: int = 100

    RULES: ClassVar[dict[str, str]] = {
        "object_mask_threshold overlap_threshold confidence_threshold stuff_confidence_threshold thing_overlap "
        "stuff_overlap mask_threshold": "[0, 1]",
        "class_exponent mask_exponent mask_area_offset max_thing_detections": ">= 0",
    }


@dataclass
class ModelConfig:
    # "maskformer" (seed 002), "pft" (Pyramid Fusion Transformer, seed 000), "unept" (seed
    # 001) or "panoptic_segformer" (seed 004).
    name: Literal["maskformer", "pft", "panoptic_segformer", "unept"] = "maskformer"
    num_classes: int = 150
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    # MaskFormer's DETR-style decoder (used when name == "maskformer").
    decoder: TransformerDecoderConfig = field(default_factory=TransformerDecoderConfig)
    # PFT's per-scale decoders (used when name == "pft").
    pft: PFTDecoderConfig = field(default_factory=PFTDecoderConfig)
    # UN-EPT's context/spatial branches and boundary refinement (used when name == "unept").
    unept: UNEPTConfig = field(default_factory=UNEPTConfig)
    # Panoptic SegFormer (used when name == "panoptic_segformer").
    panoptic_segformer: PanopticSegFormerConfig = field(default_factory=PanopticSegFormerConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    panoptic: PanopticInferenceConfig = field(default_factory=PanopticInferenceConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # Kernel choices: attention backend, deformable-attention implementation, apex.
    ops: OpsConfig = field(default_factory=OpsConfig)
    # Input normalisation (ImageNet statistics, 0-255 scale), applied inside the model
    # so loaders can ship uint8 images.
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])

    RULES: ClassVar[dict[str, str]] = {
        "num_classes": "positive int",
        "pixel_std": "> 0",
    }

    def validate(self, path: str) -> None:
        for key in ("pixel_mean", "pixel_std"):
            if len(getattr(self, key)) != 3:
                raise ValueError(f"{path}.{key}: expected 3 values (RGB), got {getattr(self, key)}")
