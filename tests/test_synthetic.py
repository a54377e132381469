# ruff: noqa: I001  (ops.torchvision_fix must come first, before anything imports torchvision)
import ops.torchvision_fix  # noqa: F401

import colorsys
from dataclasses import replace

import numpy as np
import pytest

from data_pipeline.config import SyntheticConfig
from data_pipeline.synthetic import (
    class_names,
    generate_sample,
    split_index_offset,
    synthetic_source,
)

CFG = SyntheticConfig(num_classes=5, image_size=64, seed=0)


def _assert_same(a, b):
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.semantic, b.semantic)
    np.testing.assert_array_equal(a.panoptic, b.panoptic)
    assert a.segments == b.segments


def test_same_seed_and_index_give_identical_samples_in_any_order():
    forward = [generate_sample(i, CFG) for i in range(6)]
    backward = [generate_sample(i, CFG) for i in reversed(range(6))][::-1]
    for a, b in zip(forward, backward):
        _assert_same(a, b)


def test_different_index_or_seed_give_different_samples():
    a = generate_sample(3, CFG)
    assert not np.array_equal(a.image, generate_sample(4, CFG).image)
    assert not np.array_equal(a.image, generate_sample(3, replace(CFG, seed=1)).image)


def test_dtypes_and_shapes():
    s = generate_sample(0, replace(CFG, image_size=48))
    assert s.image.dtype == np.uint8 and s.image.shape == (48, 48, 3)
    assert s.semantic.dtype == np.uint8 and s.semantic.shape == (48, 48)
    assert s.panoptic.dtype == np.int32 and s.panoptic.shape == (48, 48)


@pytest.mark.parametrize("index", range(40))
def test_semantic_and_panoptic_labels_agree(index):
    s = generate_sample(index, CFG)
    ids = [seg["id"] for seg in s.segments]
    assert len(ids) == len(set(ids))
    assert set(np.unique(s.panoptic).tolist()) == set(ids)  # no void (0), no undescribed id
    for seg in s.segments:
        inside = s.panoptic == seg["id"]
        assert seg["area"] == int(inside.sum()) > 0
        assert np.all(s.semantic[inside] == seg["category_id"])
        assert seg["isthing"] == (seg["category_id"] != 0)
        assert seg["iscrowd"] == 0
        ys, xs = np.nonzero(inside)
        x, y, w, h = seg["bbox"]
        assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
    stuff = [seg for seg in s.segments if not seg["isthing"]]
    assert len(stuff) <= 1  # the background is one segment (absent only if fully covered)
    assert 1 <= len(s.segments) - len(stuff) <= 4  # the last object drawn is always visible
    assert s.semantic.max() < CFG.num_classes


def test_dataset_statistics_are_learnable_but_not_trivial():
    samples = [generate_sample(i, CFG) for i in range(150)]
    classes = np.bincount(np.concatenate([s.semantic.ravel() for s in samples]), minlength=5)
    assert np.all(classes > 0), "every class appears"
    things_per_image = [sum(seg["isthing"] for seg in s.segments) for s in samples]
    assert min(things_per_image) >= 1 and max(things_per_image) <= 4
    assert len(set(things_per_image)) >= 3, "object count varies"

    def saturation(pixels):
        return np.array([colorsys.rgb_to_hsv(*(p / 255.0))[1] for p in pixels[::7]])

    stuff = np.concatenate([s.image[s.semantic == 0] for s in samples[:20]])
    things = np.concatenate([s.image[s.semantic > 0] for s in samples[:20]])
    # Colour is the cue (things are more saturated) but backgrounds are textured, not flat.
    assert saturation(things).mean() > saturation(stuff).mean() + 0.2
    assert np.mean([s.image[s.semantic == 0].std() for s in samples[:20]]) > 5.0


def test_class_names():
    names = class_names(5)
    assert names[0] == "background" and len(names) == 5
    many = class_names(40)
    assert len(set(many)) == 40
    with pytest.raises(ValueError):
        class_names(1)


@pytest.mark.parametrize("bad", [{"num_classes": 1}, {"num_classes": 256}, {"image_size": 8}])
def test_invalid_config_raises(bad):
    with pytest.raises(ValueError):
        generate_sample(0, replace(CFG, **bad))


def test_splits_draw_disjoint_samples():
    assert split_index_offset("train") == 0
    assert len({split_index_offset(s) for s in ("train", "val", "test")}) == 3
    train = synthetic_source(CFG, "train", 4)
    val = synthetic_source(CFG, "val", 4)
    _assert_same(train.load(2), generate_sample(2, CFG))
    assert not np.array_equal(train.load(0).image, val.load(0).image)
    assert train.classes == class_names(5) and train.thing_classes == [1, 2, 3, 4]
