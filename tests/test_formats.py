"""Format readers on tiny fixture trees laid out exactly like the real datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.formats import (
    FormatError,
    ade20k_source,
    cityscapes_source,
    coco_panoptic_source,
    coco_stuff_source,
    folder_source,
    pascal_context_source,
)
from data_pipeline.manifest import training_classes
from data_pipeline.shard_writer import Source, encode_panoptic, encode_sample


def write_image(path: Path, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random RGB image as JPEG or PNG (by suffix); returns the pixels as written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def write_label(path: Path, labels: np.ndarray | list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(labels, dtype=np.uint8)).save(path)


def labels_like(shape: tuple[int, int], values: list[int]) -> np.ndarray:
    """An index map of ``shape`` that contains each of ``values`` (cycled over pixels)."""
    count = shape[0] * shape[1]
    return np.resize(np.asarray(values, dtype=np.uint8), count).reshape(shape)


def ade_tree(root: Path) -> Path:
    base = root / "ADEChallengeData2016"
    write_image(base / "images/training/ADE_train_00000002.jpg", 6, 8, seed=1)
    write_label(base / "annotations/training/ADE_train_00000002.png", labels_like((6, 8), [0, 1, 150, 7]))
    write_image(base / "images/training/ADE_train_00000001.jpg", 7, 5, seed=2)
    write_label(base / "annotations/training/ADE_train_00000001.png", labels_like((7, 5), [3]))
    return base


def test_ade20k_reads_labels_as_stored_and_keeps_jpeg_bytes(tmp_path):
    base = ade_tree(tmp_path)
    source = ade20k_source(tmp_path, "train")
    assert source.format == "ade20k" and source.num_samples == 2
    assert len(source.classes) == 151 and source.classes[:3] == ["other", "wall", "building"]
    assert len(training_classes_of(source, True)) == 150 and source.classes[150] == "flag"
    assert source.options["reduce_zero_label"] is True and source.options["split_folder"] == "training"
    first, second = source.load(0), source.load(1)  # sorted by file name: 00000001 first
    assert first.image.shape == (7, 5, 3) and second.image.shape == (6, 8, 3)
    np.testing.assert_array_equal(second.semantic, labels_like((6, 8), [0, 1, 150, 7]))
    assert second.image_bytes == (base / "images/training/ADE_train_00000002.jpg").read_bytes()
    assert second.image_ext == "jpg"
    # Panoptic stand-in: one segment per class, label 0 ("other") is void.
    assert [(s["id"], s["category_id"]) for s in second.segments] == [(2, 1), (8, 7), (151, 150)]
    assert set(np.unique(second.panoptic)) == {0, 2, 8, 151}
    assert second.segments[0]["area"] == int((second.semantic == 1).sum())
    assert ade20k_source(tmp_path, "train", num_samples=1).num_samples == 1


def training_classes_of(source: Source, reduce_zero: bool) -> list[str]:
    class _M:  # training_classes only looks at .classes
        classes = source.classes

    return training_classes(_M(), reduce_zero)  # type: ignore[arg-type]


def _ade_bad(root: Path, case: str) -> str:
    base = ade_tree(root)
    label = base / "annotations/training/ADE_train_00000002.png"
    if case == "missing root":
        return "ADEChallengeData2016 folder not found"
    if case == "no label":
        label.unlink()
        return "ADE_train_00000002.jpg: no label, expected"
    if case == "size":
        write_label(label, np.zeros((6, 7)))
        return "ADE_train_00000002.png: label is 7x6 (WxH) but its image is 8x6"
    if case == "rgb":
        Image.new("RGB", (8, 6)).save(label)
        return "ADE_train_00000002.png: expected a single-channel index map"
    write_label(label, labels_like((6, 8), [151]))
    return "ADE_train_00000002.png: label value 151 out of range (expected 0..150 or 255)"


@pytest.mark.parametrize("case", ["missing root", "no label", "size", "rgb", "range"])
def test_ade20k_bad_input_errors_name_the_file(tmp_path, case):
    message = _ade_bad(tmp_path / "data", case)
    root = tmp_path / "elsewhere" if case == "missing root" else tmp_path / "data"
    with pytest.raises(FormatError, match=None) as info:
        source = ade20k_source(root, "train")
        for i in range(source.num_samples):
            source.load(i)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_split_folder_is_named(tmp_path):
    ade_tree(tmp_path)
    with pytest.raises(FormatError, match=r"images/validation: ADE20K val images folder not found"):
        ade20k_source(tmp_path, "val")


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    stems = [("zurich", "zurich_000001_000019"), ("aachen", "aachen_000000_000019")]
    label_ids = [0, 1, 7, 8, 11, 24, 26, 33, 30, 6]
    pixels = {}
    for i, (city, stem) in enumerate(stems):
        pixels[stem] = write_image(
            tmp_path / f"leftImg8bit/train/{city}/{stem}_leftImg8bit.png", 6, 8, seed=i
        )
        write_label(
            tmp_path / f"gtFine/train/{city}/{stem}_gtFine_labelIds.png", labels_like((6, 8), label_ids)
        )
    source = cityscapes_source(tmp_path, "train")
    assert source.classes[0] == "road" and source.classes[18] == "bicycle" and len(source.classes) == 19
    sample = source.load(0)  # aachen sorts first
    np.testing.assert_array_equal(sample.image, pixels["aachen_000000_000019"])  # PNG: exact
    assert sample.image_bytes is None
    expected = labels_like((6, 8), [255, 255, 0, 1, 2, 11, 13, 18, 255, 255])
    np.testing.assert_array_equal(sample.semantic, expected)
    write_label(
        tmp_path / "gtFine/train/zurich/zurich_000001_000019_gtFine_labelIds.png", labels_like((6, 8), [34])
    )
    with pytest.raises(FormatError, match=r"label value 34 out of range \(expected 0..33 or 255\)"):
        source.load(1)


def test_coco_stuff_maps_182_ids_to_171_classes(tmp_path):
    write_image(tmp_path / "images/val2017/000000000139.jpg", 7, 5)
    values = [0, 10, 11, 12, 90, 91, 181, 255, 25, 82]
    write_label(
        tmp_path / "stuffthingmaps_trainval2017/val2017/000000000139.png", labels_like((7, 5), values)
    )
    source = coco_stuff_source(tmp_path, "val")
    assert len(source.classes) == 171 and source.options["split_folder"] == "val2017"
    assert (source.classes[0], source.classes[79], source.classes[80], source.classes[170]) == (
        "person", "toothbrush", "banner", "wood")  # fmt: skip
    sample = source.load(0)
    expected = labels_like((7, 5), [0, 10, 255, 11, 255, 80, 170, 255, 255, 255])
    np.testing.assert_array_equal(sample.semantic, expected)
    write_label(tmp_path / "stuffthingmaps_trainval2017/val2017/000000000139.png", labels_like((7, 5), [182]))
    with pytest.raises(FormatError, match="label value 182 out of range"):
        source.load(0)


def pascal_tree(root: Path) -> Path:
    base = root / "VOCdevkit/VOC2010"
    for i, stem in enumerate(["2008_000008", "2008_000002"]):
        write_image(base / f"JPEGImages/{stem}.jpg", 6, 8, seed=i)
        write_label(base / f"SegmentationClassContext/{stem}.png", labels_like((6, 8), [0, 59, i + 1]))
    listing = base / "ImageSets/SegmentationContext/train.txt"
    listing.parent.mkdir(parents=True)
    listing.write_text("2008_000008\n2008_000002\n")
    return base


def test_pascal_context_uses_the_split_list_sorted(tmp_path):
    base = pascal_tree(tmp_path)
    source = pascal_context_source(tmp_path, "train")
    assert len(source.classes) == 60 and len(training_classes_of(source, True)) == 59
    assert source.classes[1] == "aeroplane" and source.classes[59] == "wood"
    assert source.options["reduce_zero_label"] is True
    sample = source.load(0)
    assert sample.image_bytes == (base / "JPEGImages/2008_000002.jpg").read_bytes()
    np.testing.assert_array_equal(sample.semantic, labels_like((6, 8), [0, 59, 2]))
    (base / "ImageSets/SegmentationContext/train.txt").write_text("2008_000008\nmissing_1\n")
    with pytest.raises(FormatError, match=r"JPEGImages/missing_1.jpg: image listed in train.txt not found"):
        pascal_context_source(tmp_path, "train")


def folder_tree(root: Path, classes: list[str] | None = None) -> None:
    write_image(root / "images/train/b.png", 6, 8)
    write_label(root / "masks/train/b.png", labels_like((6, 8), [0, 2, 255]))
    write_image(root / "images/train/a.jpg", 7, 5)
    write_label(root / "masks/train/a.png", labels_like((7, 5), [1]))
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")


def test_folder_classes_from_file_or_inferred(tmp_path):
    folder_tree(tmp_path / "inferred")
    source = folder_source(tmp_path / "inferred", "train")
    assert source.classes == ["class_0", "class_1", "class_2"] and source.num_samples == 2
    assert source.load(0).image_ext == "jpg" and source.load(1).image_bytes is None
    folder_tree(tmp_path / "named", ["sky", "road"])
    source = folder_source(tmp_path / "named", "train")
    assert source.classes == ["sky", "road"] and source.options["classes_from"].endswith("classes.txt")
    with pytest.raises(FormatError, match=r"b.png: label value 2 out of range \(expected 0..1 or 255\)"):
        source.load(1)


def test_a_16_bit_gray_image_is_sharded_by_its_high_byte_as_the_loader_reads_it(tmp_path):
    folder_tree(tmp_path)
    Image.fromarray(np.full((6, 8), 0x1234, np.uint16)).save(tmp_path / "images/train/b.png")  # mode I;16
    image = folder_source(tmp_path, "train").load(1).image
    assert image.dtype == np.uint8 and (image == 0x12).all()  # PIL's own conversion gives 255 everywhere
    tiff = tmp_path / "images/train/b.png"  # no 32-bit PNG exists: a TIFF under the name (PIL reads content)
    Image.fromarray(np.full((6, 8), 7, np.int32)).save(tiff, format="TIFF")
    with pytest.raises(FormatError, match=r"b.png: the image has 32-bit pixels \(PIL mode I\)"):
        folder_source(tmp_path, "train").load(1)


def panoptic_tree(root: Path) -> tuple[Path, np.ndarray]:
    ids = np.zeros((6, 8), dtype=np.int32)
    ids[:, :3], ids[:2, 3:], ids[4:, 4:] = 5, 70000, 300  # person, stuff, crowd car; rest void
    write_image(root / "val2017/000000000285.jpg", 6, 8)
    png = root / "annotations/panoptic_val2017/000000000285.png"
    png.parent.mkdir(parents=True)
    Image.fromarray(encode_panoptic(ids)).save(png)
    segments = [
        {"id": 5, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 3, 6], "area": 18},
        {"id": 70000, "category_id": 184, "iscrowd": 0, "bbox": [3, 0, 5, 2], "area": 10},
        {"id": 300, "category_id": 3, "iscrowd": 1, "bbox": [4, 4, 4, 2], "area": 8},
    ]
    data = {
        "images": [{"id": 285, "file_name": "000000000285.jpg", "height": 6, "width": 8}],
        "annotations": [{"image_id": 285, "file_name": "000000000285.png", "segments_info": segments}],
        "categories": [{"id": 184, "name": "tree-merged", "isthing": 0},
                       {"id": 3, "name": "car", "isthing": 1}, {"id": 1, "name": "person", "isthing": 1}],
    }  # fmt: skip
    (root / "annotations/panoptic_val2017.json").write_text(json.dumps(data))
    return png, ids


def test_coco_panoptic_ids_segments_and_semantic(tmp_path):
    _, ids = panoptic_tree(tmp_path)
    source = coco_panoptic_source(tmp_path, "val")
    assert source.classes == ["person", "car", "tree-merged"] and source.thing_classes == [0, 1]
    sample = source.load(0)
    np.testing.assert_array_equal(sample.panoptic, ids)
    expected = np.full((6, 8), 255, dtype=np.uint8)
    expected[:, :3], expected[:2, 3:] = 0, 2  # crowd car and void stay 255
    np.testing.assert_array_equal(sample.semantic, expected)
    summary = [
        (s["id"], s["category_id"], s["coco_category_id"], s["iscrowd"], s["isthing"])
        for s in sample.segments
    ]
    assert summary == [(5, 0, 1, 0, True), (70000, 2, 184, 0, False), (300, 1, 3, 1, True)]
    assert sample.image_bytes == (tmp_path / "val2017/000000000285.jpg").read_bytes()


def test_coco_panoptic_errors(tmp_path):
    png, ids = panoptic_tree(tmp_path)
    ids[0, 0] = 9
    Image.fromarray(encode_panoptic(ids)).save(png)
    with pytest.raises(
        FormatError, match=r"000000000285.png: segment ids \[9\] are not in its segments_info"
    ):
        coco_panoptic_source(tmp_path, "val").load(0)
    Image.fromarray(encode_panoptic(ids[:, :7])).save(png)
    with pytest.raises(FormatError, match="panoptic PNG is 7x6 .WxH. but its image is 8x6"):
        coco_panoptic_source(tmp_path, "val").load(0)
    with pytest.raises(FormatError, match="panoptic_train2017.json: COCO panoptic annotation file not found"):
        coco_panoptic_source(tmp_path, "train")


def test_encode_sample_writes_jpeg_bytes_and_checks_their_size(tmp_path):
    ade_tree(tmp_path)
    sample = ade20k_source(tmp_path, "train").load(1)
    encoded = encode_sample(sample, "train_00000001")
    assert "png" not in encoded and encoded["jpg"] == sample.image_bytes
    sample.image = sample.image[:, :7]
    sample.semantic, sample.panoptic = sample.semantic[:, :7], sample.panoptic[:, :7]
    with pytest.raises(ValueError, match="image_bytes is 8x6 .WxH. but the image array is 7x6"):
        encode_sample(sample, "train_00000001")
