"""prepare_batch: the trainer-side half of the training augmentation and the MaskFormer
targets, against the per-sample reference implementations they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.augment_config import AugmentConfig
from data_pipeline.augment_plan import PhotometricParams, draw_photometric, plan_sample, sample_generator
from data_pipeline.device_batch import augment_batch, prepare_batch, semantic_targets
from data_pipeline.photometric import apply_photometric, hsv_to_rgb, rgb_to_hsv
from data_pipeline.transforms import (
    augment_sample,
    reduce_zero_label,
    resize_image,
    resize_image_float,
    semantic_to_targets,
)

CPU = torch.device("cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _label_map(h: int, w: int, seed: int, classes: int = 12, ignore_share: float = 0.1) -> torch.Tensor:
    """Blocky uint8 labels of a few classes with ignore (255) sprinkled in."""
    g = _gen(seed)
    cells = torch.randint(0, classes, (h // 4 + 1, w // 4 + 1), generator=g, dtype=torch.uint8)
    labels = cells.repeat_interleave(4, 0).repeat_interleave(4, 1)[:h, :w].contiguous()
    labels[torch.rand(h, w, generator=g) < ignore_share] = 255
    return labels


def _batch(sizes, aug: AugmentConfig, crop: int, seed: int = 0, reduce_zero: bool = False) -> dict:
    """A training batch as the loader makes it: decoded H x W x 3 images, label maps, plans."""
    images, labels, plans = [], [], []
    for i, (h, w) in enumerate(sizes):
        images.append(torch.randint(0, 256, (h, w, 3), generator=_gen(100 + seed + i), dtype=torch.uint8))
        labels.append(_label_map(h, w, seed + i))
        plans.append(plan_sample(h, w, crop, aug, _gen(seed * 1000 + i), reduce_zero_label=reduce_zero))
    return {"images": images, "semantic": labels, "plans": plans, "keys": [str(i) for i in range(len(sizes))]}


def _assert_targets_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["labels"].dtype == torch.int64 and g["masks"].dtype == torch.bool
        assert torch.equal(g["labels"], w["labels"]) and torch.equal(g["masks"], w["masks"])


# ------------------------------------------------------------------------- targets


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_batched_targets_equal_the_per_sample_ones(dtype):
    for seed in range(5):
        semantic = torch.stack([_label_map(24, 20, seed * 10 + i, classes=3 + 5 * i) for i in range(4)]).to(
            dtype
        )
        semantic[2] = 255  # an image with nothing labelled: no targets at all
        want = [semantic_to_targets(m) for m in semantic]
        _assert_targets_equal(semantic_targets(semantic), want)
        assert semantic_targets(semantic)[2]["masks"].shape == (0, 24, 20)
    # Another ignore value: 0 is then no class, and 255 is one.
    semantic = torch.stack([_label_map(16, 16, 7), _label_map(16, 16, 8)])
    _assert_targets_equal(
        semantic_targets(semantic, ignore_index=0), [semantic_to_targets(m, 0) for m in semantic]
    )


def test_batched_targets_with_reduce_zero_label():
    raw = torch.stack([_label_map(16, 16, s, classes=6, ignore_share=0.0) for s in range(3)])
    reduced = reduce_zero_label(raw)
    targets = semantic_targets(reduced)
    _assert_targets_equal(targets, [semantic_to_targets(m) for m in reduced])
    for raw_map, target in zip(raw, targets):
        # The former class 0 is in no mask; the others moved down by one.
        assert target["labels"].tolist() == sorted({int(v) - 1 for v in raw_map.unique() if v != 0})


# -------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("photometric", [False, True])
def test_prepare_batch_equals_augment_sample_per_sample(photometric):
    # Mixed sizes: shrunk, enlarged, padded and cropped samples in one batch.
    aug = AugmentConfig(photometric=photometric)
    sizes, crop = [(30, 50), (64, 48), (17, 90), (80, 80)], 40
    for seed in range(4):
        batch = _batch(sizes, aug, crop, seed)
        images, targets = prepare_batch(batch, CPU)
        assert images.shape == (4, 3, crop, crop) and images.dtype == torch.uint8
        for i, (image, labels) in enumerate(zip(batch["images"], batch["semantic"])):
            want_image, want_labels = augment_sample(
                image.permute(2, 0, 1), labels, crop, aug, _gen(seed * 1000 + i)
            )
            assert torch.equal(images[i], want_image)
            _assert_targets_equal([targets[i]], [semantic_to_targets(want_labels)])


def test_reduce_zero_label_is_applied_on_the_device_before_the_crop():
    aug = AugmentConfig(photometric=False)
    batch = _batch([(40, 40), (30, 60)], aug, 32, seed=3, reduce_zero=True)
    _, semantic = augment_batch(batch["images"], batch["semantic"], batch["plans"], CPU)
    for i, (image, labels) in enumerate(zip(batch["images"], batch["semantic"])):
        _, want = augment_sample(image.permute(2, 0, 1), reduce_zero_label(labels), 32, aug, _gen(3000 + i))
        assert torch.equal(semantic[i], want)
    assert (semantic == 255).any()


def test_padding_stays_zero_after_batched_photometric():
    # 20x30 samples at scale 1 of a 48 crop: padding below and on one side (which, by the flip).
    aug = AugmentConfig(min_scale=20 / 48, max_scale=20 / 48, photometric=True)
    flips = set()
    for seed in range(4):
        batch = _batch([(20, 30)] * 6, aug, 48, seed)
        batch["images"] = [i.clamp(min=10) for i in batch["images"]]  # real pixels never 0
        images, _ = augment_batch(batch["images"], batch["semantic"], batch["plans"], CPU)
        for image, plan in zip(images, batch["plans"]):
            real = torch.zeros(48, 48, dtype=torch.bool)
            real[:20, slice(48 - 30, 48) if plan.flip else slice(0, 30)] = True
            assert int(image[:, ~real].max()) == 0 and bool((image[:, real] > 0).any())
            flips.add(plan.flip)
    assert flips == {True, False}


def test_prepare_batch_is_deterministic_and_plans_decide_everything():
    aug = AugmentConfig()
    batch = _batch([(50, 70), (70, 50)], aug, 32, seed=9)
    first, second = prepare_batch(batch, CPU), prepare_batch(batch, CPU)
    assert torch.equal(first[0], second[0])
    _assert_targets_equal(first[1], second[1])
    other = dict(batch, plans=_batch([(50, 70), (70, 50)], aug, 32, seed=10)["plans"])
    assert not torch.equal(prepare_batch(other, CPU)[0], first[0])


def test_sample_generator_keeps_the_default_rng_seeds():
    # The loader's per-sample seeds, as streams (and checkpoints' exact resume) have them.
    for key in [(0, 0, 0, 0, 1, 0), (3, 2, 1, 0, 1, 17), (12345, 7, 3, 1, 1, 999_999)] + [
        (0, e, r, 0, 1, p) for e in range(3) for r in range(2) for p in range(300)
    ]:
        want = torch.Generator().manual_seed(int(np.random.default_rng(list(key)).integers(2**62)))
        assert sample_generator(*key).initial_seed() == want.initial_seed()


def test_float_resize_is_within_one_level_of_the_uint8_kernel():
    # Devices without uint8 bilinear kernels (CUDA) resize through float32.
    image = torch.randint(0, 256, (3, 37, 53), generator=_gen(0), dtype=torch.uint8)
    for size in ((74, 106), (20, 30), (37, 80)):
        diff = (resize_image_float(image, *size).int() - resize_image(image, *size).int()).abs()
        assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) > 0.5


# --------------------------------------------------------------------- photometric


def _reference_photometric(image: torch.Tensor, params: PhotometricParams) -> torch.Tensor:
    """The per-sample photometric distortion as the loader worker ran it before the batched
    version (sequential steps, each only when drawn), with the drawn values as parameters."""
    x = image.float()
    if params.brightness is not None:
        x = (x + params.brightness).clamp_(0, 255)

    def contrast(x: torch.Tensor) -> torch.Tensor:
        return (x * params.contrast).clamp_(0, 255) if params.contrast is not None else x

    if params.contrast_first:
        x = contrast(x)
    if params.saturation is not None or params.hue is not None:
        hsv = rgb_to_hsv(x / 255.0)
        if params.saturation is not None:
            hsv[1] = (hsv[1] * params.saturation).clamp_(0, 1)
        if params.hue is not None:
            hsv[0] = (hsv[0] + params.hue / 180.0) % 1.0
        x = (hsv_to_rgb(hsv) * 255.0).clamp_(0, 255)
    if not params.contrast_first:
        x = contrast(x)
    return x.round_().to(torch.uint8)


def test_batched_photometric_matches_the_per_sample_version():
    images = torch.randint(0, 256, (16, 3, 24, 24), generator=_gen(1), dtype=torch.uint8)
    images[0] = 128  # grey: hue undefined
    images[1, :, :4] = 255  # saturated highlights that the brightness shift clips
    mismatched = total = 0
    for seed in range(25):
        params = [draw_photometric(_gen(seed * 100 + i)) for i in range(len(images))]
        params[3] = None  # a sample without the distortion in a batch with it
        batched = apply_photometric(images, params)
        for image, p, got in zip(images, params, batched):
            want = image if p is None else _reference_photometric(image, p)
            diff = (got.int() - want.int()).abs()
            assert int(diff.max()) <= 1  # float rounding at a .5 boundary at worst
            mismatched += int((diff > 0).sum())
            total += diff.numel()
    assert mismatched <= total * 1e-4
    # The draws: each step with probability 1/2, values over their whole ranges.
    drawn = [draw_photometric(_gen(s)) for s in range(2000)]
    for field in ("brightness", "contrast", "saturation", "hue"):
        assert abs(sum(getattr(p, field) is not None for p in drawn) / len(drawn) - 0.5) < 0.05
    assert abs(sum(p.contrast_first for p in drawn) / len(drawn) - 0.5) < 0.05
    assert {p.hue for p in drawn if p.hue is not None} == set(range(-18, 19))
    brightness = [p.brightness for p in drawn if p.brightness is not None]
    assert -32 <= min(brightness) < -30 and 30 < max(brightness) <= 32
    contrast = [p.contrast for p in drawn if p.contrast is not None]
    assert 0.5 <= min(contrast) < 0.52 and 1.48 < max(contrast) <= 1.5


def test_photometric_params_change_the_image_as_drawn():
    image = torch.full((1, 3, 4, 4), 100, dtype=torch.uint8)
    brighter = apply_photometric(image, [PhotometricParams(brightness=20.0)])
    assert brighter.unique().tolist() == [120]
    contrast = apply_photometric(image, [PhotometricParams(contrast=1.5, contrast_first=False)])
    assert contrast.unique().tolist() == [150]
    red = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    red[:, 0] = 255
    green = apply_photometric(red, [PhotometricParams(hue=60)])  # +120 degrees on OpenCV's scale
    assert green[0, :, 0, 0].tolist() == [0, 255, 0]
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        apply_photometric(image[0], [None])
