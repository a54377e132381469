"""Typed configuration of the ``data`` section (owned here, composed by ``launcher``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from data_pipeline.augment_config import AugmentConfig


@dataclass
class SyntheticConfig:
    """The generated dataset ``launcher demo`` and the tests use."""

    num_classes: int = 5  # class 0 is the textured background
    image_size: int = 64
    num_train: int = 512
    num_val: int = 64
    samples_per_shard: int = 64
    seed: int = 0

    # Value ranges checked when a config is loaded (launcher.typed_config.check_rules).
    RULES: ClassVar[dict[str, str]] = {
        "num_classes image_size num_train num_val samples_per_shard": "positive int", "seed": ">= 0"}


@dataclass
class DataConfig:
    # manifest.json written by ``python -m data_pipeline shard``.
    train_manifest: str = ""
    val_manifest: str = ""
    # "semantic": targets are one mask per class present (the label map). "panoptic":
    # the loader also reads each sample's panoptic id map and segments (.pan.png, .json),
    # targets are one mask per non-crowd segment, and evaluation reports PQ / SQ / RQ.
    task: Literal["semantic", "panoptic"] = "semantic"
    crop_size: int = 512
    batch_size: int = 2  # per worker
    num_workers: int = 0  # DataLoader worker processes per rank
    shuffle_buffer: int = 256
    ignore_index: int = 255
    # ADE20K convention: label 0 ("other") becomes ignore (255) and every other label
    # shifts down by one, so 150 classes are 0..149. Applied when reading label maps.
    reduce_zero_label: bool = False
    seed: int = 0
    # A bad training sample (corrupt or truncated shard, missing label, label out of
    # range, size mismatch, RGB label): "raise" stops with a one-line error naming shard
    # and sample; "skip" leaves it out, logs it, counts it in the step log and exports
    # segscale_data_skipped_samples_total. Evaluation always raises: a metric over a
    # silently shrunken validation set would mislead.
    on_error: Literal["raise", "skip"] = "raise"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Training augmentation (random resize, category-constrained crop, flip, photometric
    # distortion: MaskFormer's ADE20K recipe); see augment_config.py.
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    # Value ranges checked when a config is loaded (launcher.typed_config.check_rules; the
    # loader checks them again in the workers). Labels are uint8 maps: ignore is one of them.
    RULES: ClassVar[dict[str, str]] = {
        "crop_size batch_size": "positive int",
        "num_workers shuffle_buffer seed": ">= 0",
    }

    def validate(self, path: str) -> None:
        if not 0 <= self.ignore_index <= 255:
            raise ValueError(f"{path}.ignore_index: expected a label value in [0, 255], got {self.ignore_index}")
