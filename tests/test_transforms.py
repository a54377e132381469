"""The MaskFormer ADE20K training augmentation (data_pipeline.transforms.augment_sample)."""

from __future__ import annotations

import colorsys
import dataclasses

import pytest
import torch

from data_pipeline.augment_config import AugmentConfig
from data_pipeline.augment_plan import CAT_CROP_TRIES, draw_crop_offsets, resize_shape
from data_pipeline.config import DataConfig
from data_pipeline.photometric import hsv_to_rgb, photometric_distort, rgb_to_hsv
from data_pipeline.transforms import (
    augment_sample,
    category_area_ok,
    choose_crop,
    panoptic_to_targets,
    resize_labels,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sample(h: int, w: int, values=(3, 7, 11), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(1000 + seed)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    vals = torch.tensor(values, dtype=torch.int64)
    semantic = vals[torch.randint(0, len(values), (h, w), generator=g)]
    return image, semantic


@pytest.mark.parametrize("shape", [(10, 10), (20, 30), (100, 140), (200, 200), (5, 700), (700, 5), (1, 1)])
def test_output_is_exactly_crop_and_labels_are_never_interpolated(shape):
    crop = 32
    image, semantic = _sample(*shape)
    for seed in range(6):
        out_img, out_sem = augment_sample(image, semantic, crop, AugmentConfig(), _gen(seed))
        assert out_img.shape == (3, crop, crop) and out_img.dtype == torch.uint8
        assert out_sem.shape == (crop, crop) and out_sem.dtype == torch.int64
        assert out_img.is_contiguous() and out_sem.is_contiguous()
        assert set(out_sem.unique().tolist()) <= {3, 7, 11, 255}


def test_resize_shape_matches_detectron2():
    assert resize_shape(512, 683, 256, 2048) == (256, 342)
    assert resize_shape(683, 512, 1024, 2048) == (1366, 1024)
    # Long side capped: short side 512 would make it 5120 > 2048.
    assert resize_shape(100, 1000, 512, 2048) == (205, 2048)
    assert resize_shape(1000, 3, 1, 8) == (8, 1)  # never 0 px


def test_resize_labels_nearest_copies_values():
    labels = torch.tensor([[1, 2], [3, 4_000_000]])
    up = resize_labels(labels, 4, 4)
    assert up.tolist() == [
        [1, 1, 2, 2],
        [1, 1, 2, 2],
        [3, 3, 4_000_000, 4_000_000],
        [3, 3, 4_000_000, 4_000_000],
    ]
    assert resize_labels(up, 2, 2).tolist() == labels.tolist()


def _labelled_extent(sem: torch.Tensor) -> tuple[int, int]:
    labelled = sem != 255
    return int(labelled.any(1).sum()), int(labelled.any(0).sum())


def test_resize_scale_stays_in_range():
    # A 40x40 single-class map at crop 64: the short side becomes 64 * U(0.5, 2), so after
    # padding/cropping the labelled square is min(new side, 64) wide.
    image, semantic = _sample(40, 40, values=(1,))
    aug = AugmentConfig(cat_max_ratio=1.0, photometric=False, hflip=False)
    sides = []
    for seed in range(300):
        _, sem = augment_sample(image, semantic, 64, aug, _gen(seed))
        rows, cols = _labelled_extent(sem)
        assert rows == cols
        sides.append(rows)
    assert min(sides) >= 32 and max(sides) <= 64
    below = sum(s < 64 for s in sides) / len(sides)
    assert abs(below - 1 / 3) < 0.1  # P(U(0.5, 2) < 1) = 1/3
    assert len({s for s in sides if s < 64}) > 10  # continuous, not a few fixed scales

    fixed = dataclasses.replace(aug, min_scale=0.75, max_scale=0.75)
    for seed in range(5):
        _, sem = augment_sample(image, semantic, 64, fixed, _gen(seed))
        assert _labelled_extent(sem) == (48, 48)


def test_max_size_caps_the_long_side():
    # 4 x 400 at crop 64: short side 32..128 would make the long side >= 3200, so the
    # default cap 4 * 64 = 256 applies: 3 x 256 (4 * 256 / 400 = 2.56 -> 3 rows).
    image, semantic = _sample(4, 400, values=(1, 2))
    aug = AugmentConfig(cat_max_ratio=1.0, photometric=False)
    for seed in range(10):
        _, sem = augment_sample(image, semantic, 64, aug, _gen(seed))
        assert _labelled_extent(sem) == (3, 64)
    capped = dataclasses.replace(aug, max_size=100)  # 4 * 100 / 400 = 1 row
    _, sem = augment_sample(image, semantic, 64, capped, _gen(0))
    assert _labelled_extent(sem) == (1, 64)
    assert AugmentConfig().resolved_max_size(512) == 2048


def _corner_map(size: int = 256, corner: int = 80) -> torch.Tensor:
    sem = torch.zeros(size, size, dtype=torch.int64)
    sem[:corner, :corner] = 1  # ~10% class 1 in the top-left corner, 90% class 0
    return sem


def test_category_area_ok():
    assert not category_area_ok(torch.zeros(4, 4, dtype=torch.int64), 0.75)  # one class
    half = torch.tensor([[0, 0], [1, 1]])
    assert category_area_ok(half, 0.75)
    assert not category_area_ok(torch.tensor([[0, 0], [0, 1]]), 0.75)  # 75% is not < 75%
    assert category_area_ok(torch.tensor([[0, 255], [255, 1]]), 0.75)  # ignore not counted
    assert not category_area_ok(torch.tensor([[0, 255], [255, 255]]), 0.75)


def test_constrained_crop_returns_first_valid_of_its_ten_tries():
    # Replay the generator: draw_crop_offsets draws the 10 tops, then the 10 lefts, so we
    # know exactly which windows it considered. choose_crop must return the first valid one
    # if any is valid, else the 10th.
    sem, crop = _corner_map(), 128
    n_valid_found = 0
    for seed in range(200):
        replay = _gen(seed)
        tops = torch.randint(0, 256 - crop + 1, (CAT_CROP_TRIES,), generator=replay).tolist()
        lefts = torch.randint(0, 256 - crop + 1, (CAT_CROP_TRIES,), generator=replay).tolist()
        tries = list(zip(tops, lefts))
        offsets = draw_crop_offsets(256, 256, crop, _gen(seed), 0.75)
        assert list(offsets) == tries
        valid = [t for t in tries if category_area_ok(sem[t[0] : t[0] + crop, t[1] : t[1] + crop], 0.75)]
        got = choose_crop(sem, offsets, crop, 0.75)
        if valid:
            n_valid_found += 1
            assert got == valid[0]
        else:
            assert got == tries[-1]
    assert n_valid_found > 10  # the test exercised the constraint
    assert len(draw_crop_offsets(256, 256, crop, _gen(0), 1.0)) == 1  # constraint off: one window
    assert draw_crop_offsets(crop, crop, crop, _gen(0), 0.75) == ((0, 0),)  # one window fits


def test_constraint_picks_valid_crops_far_more_often():
    sem, crop = _corner_map(), 128
    image = torch.zeros(3, 256, 256, dtype=torch.uint8)
    # Short side 2 * 128 = 256: the map keeps its size.
    base = AugmentConfig(min_scale=2.0, max_scale=2.0, photometric=False, hflip=False)

    def valid_rate(aug: AugmentConfig) -> float:
        hits = 0
        for seed in range(300):
            _, out = augment_sample(image, sem, crop, aug, _gen(seed))
            hits += category_area_ok(out, 0.75)
        return hits / 300

    with_constraint = valid_rate(base)
    without = valid_rate(dataclasses.replace(base, cat_max_ratio=1.0))
    # One random window is valid ~3% of the time; ten tries find one ~25% of the time.
    assert without < 0.08
    assert with_constraint > 0.15 and with_constraint > 3 * without


def test_photometric_changes_image_never_labels():
    image, semantic = _sample(50, 70)
    on = AugmentConfig()
    off = dataclasses.replace(on, photometric=False)
    changed = 0
    for seed in range(8):
        img_on, sem_on = augment_sample(image, semantic, 32, on, _gen(seed))
        img_off, sem_off = augment_sample(image, semantic, 32, off, _gen(seed))
        assert img_on.dtype == torch.uint8
        assert torch.equal(sem_on, sem_off)  # photometric draws last: geometry identical
        changed += not torch.equal(img_on, img_off)
    assert changed >= 5  # P(no colour op at all) = 1/16


def test_photometric_forced_probabilities():
    image, _ = _sample(16, 16)
    g = _gen(0)
    assert torch.equal(photometric_distort(image, g, p=0.0), image)
    # p=1: contrast x2 only (brightness 0, saturation x1, hue +0), whichever order.
    for seed in range(4):
        out = photometric_distort(
            image,
            _gen(seed),
            p=1.0,
            brightness_delta=0,
            contrast_range=(2, 2),
            saturation_range=(1, 1),
            hue_delta=0,
        )
        assert torch.equal(out, (image.float() * 2).clamp(0, 255).to(torch.uint8))
    # Brightness only: a constant shift in [-32, 32] on unclamped pixels.
    mid = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    out = photometric_distort(
        mid, _gen(3), p=1.0, brightness_delta=32, contrast_range=(1, 1), saturation_range=(1, 1), hue_delta=0
    )
    shift = out.int() - 100
    assert (shift == shift.flatten()[0]).all() and abs(int(shift.flatten()[0])) <= 32
    # Saturation x0 makes every pixel grey at its V = max(R, G, B).
    out = photometric_distort(
        image, _gen(1), p=1.0, brightness_delta=0, contrast_range=(1, 1), saturation_range=(0, 0), hue_delta=0
    )
    assert torch.equal(out, image.max(0, keepdim=True).values.expand_as(image))


def test_hsv_matches_colorsys_and_hue_scale_is_opencv():
    rgb = torch.rand(3, 6, 7, generator=_gen(0))
    rgb[:, 0, 0] = 0.5  # grey
    rgb[:, 0, 1] = 0.0  # black
    hsv = rgb_to_hsv(rgb)
    for i in range(6):
        for j in range(7):
            want = colorsys.rgb_to_hsv(*rgb[:, i, j].tolist())
            assert hsv[:, i, j].tolist() == pytest.approx(want, abs=1e-5)
    assert torch.allclose(hsv_to_rgb(hsv), rgb, atol=1e-5)
    # +60 on OpenCV's 0-180 scale is +120 degrees: red -> green.
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    hsv = rgb_to_hsv(red)
    hsv[0] = (hsv[0] + 60 / 180) % 1.0
    assert torch.allclose(hsv_to_rgb(hsv).flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)


def test_panoptic_to_targets_excludes_crowd_void_and_absent():
    ids = torch.tensor([[0, 1, 1], [2, 2, 3], [4, 4, 4]])
    segments = [
        {"id": 1, "category_id": 5, "iscrowd": 0},
        {"id": 2, "category_id": 9, "iscrowd": 1},  # crowd
        {"id": 3, "category_id": 255, "iscrowd": 0},  # void category
        {"id": 4, "category_id": 5, "iscrowd": 0},  # same class, separate instance
        {"id": 6, "category_id": 2, "iscrowd": 0},  # not in the map
    ]
    targets = panoptic_to_targets(ids, segments)
    assert targets["labels"].tolist() == [5, 5]
    assert targets["masks"].dtype == torch.bool
    assert torch.equal(targets["masks"][0], ids == 1) and torch.equal(targets["masks"][1], ids == 4)
    empty = panoptic_to_targets(torch.zeros(2, 3, dtype=torch.int64), segments)
    assert empty["labels"].shape == (0,) and empty["masks"].shape == (0, 2, 3)


def test_panoptic_follows_the_labels():
    g = _gen(5)
    h, w = 60, 90
    panoptic = (
        torch.randint(0, 6, (h // 6, w // 6), generator=g).repeat_interleave(6, 0).repeat_interleave(6, 1)
    )
    category = torch.tensor([255, 4, 4, 8, 1, 2])  # id -> class; id 0 is void
    semantic = category[panoptic]
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    for seed in range(10):
        out = augment_sample(image, semantic, 48, AugmentConfig(), _gen(seed), panoptic=panoptic)
        assert len(out) == 3
        _, sem, pan = out
        assert pan.shape == (48, 48) and pan.dtype == torch.int64 and pan.is_contiguous()
        assert set(pan.unique().tolist()) <= set(range(6))
        assert torch.equal(sem, category[pan])  # same resize/crop/flip; padding = void/ignore
    assert len(augment_sample(image, semantic, 48, AugmentConfig(), _gen(0))) == 2


def test_same_seed_same_output_different_seed_different():
    image, semantic = _sample(120, 90)
    panoptic = semantic.clone()
    a = augment_sample(image, semantic, 64, AugmentConfig(), _gen(7), panoptic=panoptic)
    b = augment_sample(image, semantic, 64, AugmentConfig(), _gen(7), panoptic=panoptic)
    c = augment_sample(image, semantic, 64, AugmentConfig(), _gen(8), panoptic=panoptic)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"min_scale": 0.0}, "min_scale"),
        ({"min_scale": 3.0}, "min_scale"),
        ({"max_scale": -1.0}, "min_scale"),
        ({"max_size": -1}, "max_size"),
        ({"max_size": 1.5}, "max_size"),
        ({"cat_max_ratio": 0.0}, "cat_max_ratio"),
        ({"cat_max_ratio": 1.5}, "cat_max_ratio"),
        ({"hflip": "yes"}, "hflip"),
        ({"photometric": 1}, "photometric"),
        ({"min_scale": "big"}, "min_scale"),
    ],
)
def test_config_validation(overrides, key):
    aug = AugmentConfig(**overrides)
    with pytest.raises(ValueError, match=rf"^data\.augment\.{key} ") as err:
        aug.validate()
    assert "\n" not in str(err.value)
    image, semantic = _sample(8, 8)
    with pytest.raises(ValueError, match=rf"data\.augment\.{key}"):
        augment_sample(image, semantic, 8, aug, _gen(0))


def test_data_config_has_augment_defaults():
    aug = DataConfig().augment
    assert aug == AugmentConfig(0.5, 2.0, 0, 0.75, True, True)
    aug.validate()


@pytest.mark.parametrize("seed", range(6))
def test_padding_stays_zero_after_photometric_distortion(seed):
    # A 20x30 image in a 48 crop at scale 1 of its short side: padding on both edges.
    image, semantic = _sample(20, 30)
    image = image.clamp(min=10)  # real pixels are never 0, so any 0 is padding
    aug = AugmentConfig(min_scale=20 / 48, max_scale=20 / 48, photometric=True)
    img, sem = augment_sample(image, semantic, 48, aug, _gen(seed))
    padded = sem == 255
    assert padded.any() and int(img[:, padded].max()) == 0
    assert bool((img[:, ~padded] > 0).any())
