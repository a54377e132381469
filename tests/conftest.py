"""Shared test set-up: the torchvision fix before anything imports timm, one thread, and
the tiny sharded dataset of the tests that train through the real CLI."""

import ops.torchvision_fix  # noqa: F401  (must precede timm/torchvision imports)

# isort: split
import pytest
import torch

from data_pipeline.config import SyntheticConfig
from data_pipeline.shard_writer import write_shards
from data_pipeline.synthetic import synthetic_source

# The CI machine has 2 cores; tests that start workers need the second one.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """32 train and 6 val synthetic 64x64 samples of 5 classes, in shards with their
    manifests (``train-manifest.json``, ``val-manifest.json``): configs/test_tiny.yaml's data."""
    root = tmp_path_factory.mktemp("data")
    synthetic = SyntheticConfig(num_classes=5, image_size=64, seed=3)
    write_shards(synthetic_source(synthetic, "train", 32), root, "train", max_count=8)
    write_shards(synthetic_source(synthetic, "val", 6), root, "val", max_count=4)
    return root


@pytest.fixture(scope="session")
def panoptic_dataset(tmp_path_factory):
    """configs/test_tiny_panoptic.yaml's data, written through ``python -m data_pipeline shard
    --format synthetic`` (whose shards carry each sample's .pan.png ids and .json segments):
    32 train and 6 val 64x64 samples of 5 classes (background stuff + 4 thing classes)."""
    from data_pipeline.cli import main as shard_main

    root = tmp_path_factory.mktemp("panoptic-data")
    for split, count, max_count in (("train", 32, 8), ("val", 6, 4)):
        args = ["shard", "--format", "synthetic", "--split", split, "--out", str(root), "--num-samples", str(count),
                "--max-count", str(max_count), "--seed", "5"]  # fmt: skip
        assert shard_main(args) == 0
    return root


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    """``--set`` items for 4 train and 4 val synthetic samples of 5 classes (one shard
    each): the data of configs/test_tiny.yaml's checks that never train."""
    root = tmp_path_factory.mktemp("data")
    for split in ("train", "val"):
        write_shards(synthetic_source(SyntheticConfig(num_classes=5), split, 4), root, split, max_count=4)
    return [f"data.train_manifest={root}/train-manifest.json", f"data.val_manifest={root}/val-manifest.json"]
