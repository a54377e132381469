"""``python -m data_pipeline shard --format <dataset>`` end to end on fixture trees."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_formats import ade_tree, folder_tree, panoptic_tree, pascal_tree  # tests/ is on sys.path

from data_pipeline.cli import main
from data_pipeline.loader import decode_sample
from data_pipeline.manifest import load_manifest
from data_pipeline.shard_writer import decode_panoptic


def shard(fmt: str, root: Path, split: str, out: Path, *extra: str) -> int:
    return main(["shard", "--format", fmt, "--root", str(root), "--split", split, "--out", str(out), *extra])


def members(tar_path: str) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_ade20k_shards_jpeg_bytes_and_loads_with_reduce_zero_label(tmp_path, capsys):
    base = ade_tree(tmp_path / "ade")
    assert (
        shard("ade20k", tmp_path / "ade", "train", tmp_path / "out", "--max-count", "1", "--workers", "2")
        == 0
    )
    manifest = load_manifest(tmp_path / "out/train-manifest.json")
    assert manifest.format == "ade20k" and manifest.num_samples == 2 and len(manifest.shards) == 2
    assert manifest.source["reduce_zero_label"] is True and len(manifest.classes) == 151
    raw = members(manifest.shard_paths()[1])
    assert sorted(raw) == ["train_00000001.jpg", "train_00000001.json", "train_00000001.pan.png",
                           "train_00000001.seg.png"]  # fmt: skip
    assert raw["train_00000001.jpg"] == (base / "images/training/ADE_train_00000002.jpg").read_bytes()
    sample = {"__key__": "train_00000001", "__url__": "x", **{k.split(".", 1)[1]: v for k, v in raw.items()}}
    image, labels = decode_sample(sample, reduce_zero=True)
    assert tuple(image.shape) == (3, 6, 8)
    stored = np.resize(np.array([0, 1, 150, 7]), 48).reshape(6, 8)
    np.testing.assert_array_equal(labels.numpy(), np.where(stored == 0, 255, stored - 1))
    assert "wrote 2 train samples" in capsys.readouterr().out


def test_pascal_context_and_folder_shard(tmp_path):
    pascal_tree(tmp_path / "voc")
    assert shard("pascal_context", tmp_path / "voc", "train", tmp_path / "out", "--num-samples", "1") == 0
    assert load_manifest(tmp_path / "out/train-manifest.json").num_samples == 1
    folder_tree(tmp_path / "plain", ["a", "b", "c"])
    assert shard("folder", tmp_path / "plain", "train", tmp_path / "out2") == 0
    raw = members(load_manifest(tmp_path / "out2/train-manifest.json").shard_paths()[0])
    # b.png (second by name) is a PNG dataset image: re-encoded losslessly as .png.
    assert "train_00000001.png" in raw and "train_00000000.jpg" in raw
    assert Image.open(io.BytesIO(raw["train_00000001.png"])).size == (8, 6)


def test_coco_panoptic_shards_ids_and_segments(tmp_path):
    _, ids = panoptic_tree(tmp_path / "coco")
    assert shard("coco_panoptic", tmp_path / "coco", "val", tmp_path / "out") == 0
    manifest = load_manifest(tmp_path / "out/val-manifest.json")
    assert manifest.thing_classes == [0, 1] and manifest.source["split_folder"] == "val2017"
    raw = members(manifest.shard_paths()[0])
    np.testing.assert_array_equal(
        decode_panoptic(np.asarray(Image.open(io.BytesIO(raw["val_00000000.pan.png"])))), ids
    )
    meta = json.loads(raw["val_00000000.json"])
    assert [(s["id"], s["iscrowd"]) for s in meta["segments_info"]] == [(5, 0), (70000, 0), (300, 1)]
    assert raw["val_00000000.jpg"] == (tmp_path / "coco/val2017/000000000285.jpg").read_bytes()


@pytest.mark.parametrize(
    "fmt, make, message",
    [
        ("ade20k", None, "--root is required for --format ade20k"),
        ("cityscapes", "empty", "leftImg8bit/train: Cityscapes train leftImg8bit folder not found"),
        ("ade20k", "range", "label value 151 out of range"),
    ],
)
def test_cli_reader_errors_are_one_line_exit_2(tmp_path, capsys, fmt, make, message):
    argv = ["shard", "--format", fmt, "--split", "train", "--out", str(tmp_path / "out")]
    if make == "empty":
        (tmp_path / "data").mkdir()
    elif make == "range":
        base = ade_tree(tmp_path / "data")
        Image.fromarray(np.full((6, 8), 151, np.uint8)).save(
            base / "annotations/training/ADE_train_00000002.png"
        )
    if make is not None:
        argv += ["--root", str(tmp_path / "data")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m data_pipeline: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out/train-manifest.json").exists()
