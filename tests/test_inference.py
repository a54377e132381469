"""Semantic inference rules (MaskFormer, PFT), stride-4 alignment, and test-time prediction
(test resize, sliding window, TTA, padded batches)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import model.tta as tta
from model.config import InferenceConfig
from model.inference import (
    pft_semantic_inference,
    semantic_inference,
    semantic_scores,
    semantic_segmentation,
    upsample_mask_logits,
)
from model.tta import count_forward_passes, predict_semantic_scores, scaled_size, window_starts


class PixelModel(nn.Module):
    """Per-pixel toy (so window- and flip-equivariant): mask logits are a fixed affine map of
    each pixel's colour; class logits are fixed, MaskFormer-shaped (B×Q×(K+1)) or PFT-shaped
    (B×K). ``stride=4`` predicts masks like the real models: zero-pad the input bottom/right
    to a multiple of 4 and average 4×4 cells. Records input shapes."""

    def __init__(self, num_classes: int = 3, ramp: float = 0.0, seed: int = 0, pft: bool = False, stride: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(num_classes, 3, generator=g) * 3
        self.bias = torch.randn(num_classes, generator=g)
        self.logits = torch.randn(num_classes, num_classes + 1, generator=g) * 2
        self.pft_logits = torch.randn(num_classes, generator=g) * 2
        self.ramp = ramp  # > 0 adds a left-to-right ramp: breaks flip equivariance
        self.pft, self.stride = pft, stride
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, images):
        self.shapes.append(tuple(images.shape))
        x = images.float() / 255
        ramp = self.ramp * torch.linspace(-1, 1, x.shape[-1])
        if self.stride > 1:  # as the backbone: pad the input, not the output
            x = F.pad(x, (0, -x.shape[-1] % self.stride, 0, -x.shape[-2] % self.stride))
            ramp = F.pad(ramp, (0, x.shape[-1] - ramp.shape[0]))
        masks = torch.einsum("qc,bchw->bqhw", self.weight, x) + self.bias[:, None, None] + ramp
        if self.stride > 1:
            masks = F.avg_pool2d(masks, self.stride)
        b = x.shape[0]
        logits = self.pft_logits.expand(b, -1) if self.pft else self.logits.expand(b, -1, -1)
        return {"pred_logits": logits, "pred_masks": masks}


class WindowMeanModel(nn.Module):
    """PFT-shaped toy whose every mask probability is the mean intensity of its whole input:
    a stitched map then shows exactly which windows covered each pixel, and any padding or
    batch mate seen by a forward would change the answer."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, images):
        self.shapes.append(tuple(images.shape))
        b, _, h, w = images.shape
        mean = (images.float() / 255).mean((1, 2, 3)).clamp(1e-4, 1 - 1e-4)  # B
        logits = torch.full((b, 2), 30.0)  # p_i = sigmoid(30) = 1 in fp32
        masks = torch.logit(mean)[:, None, None, None].expand(b, 2, h, w)
        return {"pred_logits": logits, "pred_masks": masks}


def _images(batch=2, height=23, width=37, seed=1):
    return torch.randint(0, 256, (batch, 3, height, width), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


# ------------------------------------------------------------------------------ rules


def test_maskformer_rule_is_the_papers_marginalisation():
    g = torch.Generator().manual_seed(0)
    logits, masks = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    scores = semantic_inference(logits, masks)
    expected = torch.zeros(2, 5, 3, 5)
    for b in range(2):
        for i in range(4):
            p = logits[b, i].exp() / logits[b, i].exp().sum()  # softmax over K+1, no-object dropped
            for c in range(5):
                expected[b, c] += p[c] * torch.sigmoid(masks[b, i])
    assert torch.allclose(scores, expected, atol=1e-6)
    outputs = {"pred_logits": logits, "pred_masks": masks}
    assert torch.equal(semantic_segmentation(outputs, (3, 5)), expected.argmax(1))
    assert torch.equal(semantic_scores(outputs, "maskformer"), scores)


def test_pft_rule_is_sigmoid_of_the_class_logit_times_its_mask_on_a_hand_case():
    logits = torch.tensor([[0.0, -1.0]])  # B×K: one logit per category query
    masks = torch.tensor([[[[2.0, -2.0]], [[0.0, 3.0]]]])  # B×K×1×2
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = torch.tensor([[[[0.5 * sig(2), 0.5 * sig(-2)]], [[sig(-1) * 0.5, sig(-1) * sig(3)]]]])
    scores = pft_semantic_inference(logits, masks)
    assert torch.allclose(scores, expected, atol=1e-6)
    outputs = {"pred_logits": logits, "pred_masks": masks}
    # pixel 0: 0.44 vs 0.13 -> class 0; pixel 1: 0.06 vs 0.26 -> class 1
    assert semantic_segmentation(outputs, (1, 2), rule="pft").tolist() == [[[0, 1]]]
    assert torch.allclose(semantic_scores(outputs, "pft"), expected, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert semantic_scores({"pred_logits": logits.bfloat16(), "pred_masks": masks}, "pft").dtype == torch.float32
    # Each rule rejects the other family's outputs instead of misreading them.
    with pytest.raises(ValueError, match="model.name=pft"):
        semantic_segmentation(outputs, (1, 2))
    with pytest.raises(ValueError, match="one query per class"):
        pft_semantic_inference(torch.zeros(1, 2, 3), torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="one query per class"):
        pft_semantic_inference(torch.zeros(1, 3), torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="model.name"):
        semantic_scores(outputs, "detr")


# -------------------------------------------------------------------- stride-4 alignment


def test_stride4_mask_logits_are_upsampled_to_a_multiple_of_4_then_cropped():
    masks = torch.randn(2, 3, 6, 6)  # the stride-4 map of a 23×22 image: ⌈23/4⌉ = ⌈22/4⌉ = 6
    aligned = upsample_mask_logits(masks, (23, 22))
    expected = F.interpolate(masks, size=(24, 24), mode="bilinear", align_corners=False)[..., :23, :22]
    assert torch.equal(aligned, expected)
    # Stretching 6 cells over 23 pixels instead would move the map.
    stretched = F.interpolate(masks, size=(23, 22), mode="bilinear", align_corners=False)
    assert not torch.allclose(aligned, stretched, atol=1e-2)
    # Then brought to an output size; full-resolution masks pass through.
    out = upsample_mask_logits(masks, (23, 22), output_size=(46, 44))
    assert torch.equal(out, F.interpolate(expected, size=(46, 44), mode="bilinear", align_corners=False))
    assert torch.equal(upsample_mask_logits(masks, (6, 6)), masks)
    with pytest.raises(ValueError, match="stride-4 map 8×6"):
        upsample_mask_logits(masks, (30, 22))


@pytest.mark.parametrize("rule", ["maskformer", "pft"])
def test_an_image_scores_as_its_zero_padded_version_cropped(rule):
    """A stride-4 model sees a 21×23 image as the 24×24 image zero-padded: the 21×23 scores
    must be the top-left of the 24×24 ones, whatever H mod 4 is."""
    model = PixelModel(pft=rule == "pft", stride=4)
    image = _images(batch=1, height=21, width=23)
    padded = F.pad(image, (0, 1, 0, 3))
    small = predict_semantic_scores(model, image, InferenceConfig(), rule)
    large = predict_semantic_scores(model, padded, InferenceConfig(), rule)
    assert small.shape == (1, 3, 21, 23)
    assert torch.allclose(small, large[..., :21, :23], atol=1e-6)


# ---------------------------------------------------------------------- sliding window


def test_window_starts_end_flush_with_the_border():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(4, 4, 3) == [0]
    assert window_starts(3, 4, 2) == [0]
    assert window_starts(683, 512, 341) == [0, 171]


@pytest.mark.parametrize("rule", ["maskformer", "pft"])
def test_sliding_windows_agree_with_whole_image_for_a_local_model(rule):
    model, images = PixelModel(pft=rule == "pft"), _images()
    whole = predict_semantic_scores(model, images, InferenceConfig(), rule)
    model.shapes.clear()
    slid = predict_semantic_scores(model, images, InferenceConfig(window_size=16, window_stride=10), rule)
    assert slid.dtype == torch.float32 and slid.shape == (2, 3, 23, 37)
    assert torch.allclose(slid, whole, atol=1e-6)
    assert {s[-2:] for s in model.shapes} == {(16, 16)}
    # rows 0, 7 and columns 0, 10, 20, 21: 8 windows per image, 2 per forward
    assert sum(s[0] for s in model.shapes) == 2 * 8 and len(model.shapes) == 8


def test_overlapping_windows_are_averaged_and_padding_is_excluded():
    model, images = WindowMeanModel(), _images(batch=1, height=10, width=7).float()
    scores = predict_semantic_scores(model, images, InferenceConfig(window_size=4, window_stride=3), "pft")
    value = images / 255
    expected_sum, count = torch.zeros(10, 7), torch.zeros(10, 7)
    for y in (0, 3, 6):
        for x in (0, 3):
            expected_sum[y:y + 4, x:x + 4] += value[0, :, y:y + 4, x:x + 4].mean()
            count[y:y + 4, x:x + 4] += 1
    assert torch.allclose(scores[0, 0], expected_sum / count, atol=1e-5)
    assert torch.allclose(scores[0, 1], expected_sum / count, atol=1e-5)

    # 10×3 is narrower than the window: padded (with zeros: the toy has no pixel_mean) to 4
    # columns, the padded column cropped away again.
    model.shapes.clear()
    narrow = images[..., :3]
    scores = predict_semantic_scores(model, narrow, InferenceConfig(window_size=4, window_stride=3), "pft")
    assert scores.shape == (1, 2, 10, 3) and {s[-2:] for s in model.shapes} == {(4, 4)}
    padded = torch.zeros(1, 3, 10, 4)
    padded[..., :3] = narrow / 255
    expected_sum, count = torch.zeros(10, 4), torch.zeros(10, 4)
    for y in (0, 3, 6):
        expected_sum[y:y + 4] += padded[0, :, y:y + 4].mean()
        count[y:y + 4] += 1
    assert torch.allclose(scores[0, 0], (expected_sum / count)[:, :3], atol=1e-5)


def test_padding_uses_the_models_mean_colour():
    model = WindowMeanModel()
    model.register_buffer("pixel_mean", torch.tensor([51.0, 102.0, 153.0]).view(1, 3, 1, 1))
    image = torch.tensor([51.0, 102.0, 153.0]).view(1, 3, 1, 1).expand(1, 3, 2, 3)
    scores = predict_semantic_scores(model, image, InferenceConfig(window_size=4, window_stride=4), "pft")
    assert torch.allclose(scores, torch.full((1, 2, 2, 3), 0.4), atol=1e-5)  # mean of (51+102+153)/3/255


# ----------------------------------------------------------------- test size (short side)


def test_scaled_size_sets_the_short_side():
    assert scaled_size((30, 45), 1.0, 16) == (16, 24)
    assert scaled_size((45, 30), 0.5, 16) == (12, 8)  # portrait: the short side is the width
    assert scaled_size((512, 683), 1.75, 512) == (896, 1195)  # mmseg's 1.75 ratio of 512
    assert scaled_size((30, 45), 0.5) == (15, 23)  # short_side 0: relative to the image itself
    assert scaled_size((683, 512), 1.0, 512) == (683, 512)
    # the long side capped as detectron2's ResizeShortestEdge(512, max_size=2048) does
    assert scaled_size((100, 500), 1.0, 512, 2048) == (410, 2048)  # 512 x 2560 would pass the cap
    assert scaled_size((100, 300), 1.0, 512, 2048) == (512, 1536)  # under the cap: unchanged
    assert scaled_size((100, 500), 0.5, 512, 2048) == (205, 1024)  # scales shrink the cap too


@pytest.mark.parametrize("rule", ["maskformer", "pft"])
def test_short_side_resizes_before_inference_and_maps_back(rule):
    model, images = PixelModel(ramp=2.0, pft=rule == "pft", stride=4), _images(batch=2, height=30, width=45)
    cfg = InferenceConfig(short_side=16, scales=[0.5, 1.0])
    scores = predict_semantic_scores(model, images, cfg, rule)
    assert [s[-2:] for s in model.shapes] == [(8, 12), (16, 24)]  # scales multiply the test size
    assert scores.shape == (2, 3, 30, 45)  # back at the size the images came in
    expected = 0
    for size in ((8, 12), (16, 24)):
        resized = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
        expected = expected + semantic_scores(model(resized), rule, size, (30, 45))
    assert torch.allclose(scores, expected / 2, atol=1e-6)
    # short_side 0 keeps the stored size: another answer for this size-dependent toy.
    assert not torch.allclose(predict_semantic_scores(model, images, InferenceConfig(), rule), scores, atol=1e-3)


def test_short_side_with_mmseg_sliding_windows():
    """mmseg's single-scale slide test: resize to the crop's short side, windows of the crop
    every 2/3 crop, scores resized back to the stored size."""
    model, images = PixelModel(ramp=1.0, stride=4), _images(batch=1, height=24, width=40)
    cfg = InferenceConfig(short_side=12, window_size=12, window_stride=8)
    scores = predict_semantic_scores(model, images, cfg)
    assert model.shapes == [(1, 3, 12, 12)] * 2  # columns 0 and 8 of the 12×20 resized image
    resized = F.interpolate(images.float(), size=(12, 20), mode="bilinear", align_corners=False)
    windows = [semantic_scores(model(resized[..., x:x + 12]), "maskformer", (12, 12)) for x in (0, 8)]
    stitched = torch.zeros(1, 3, 12, 20)
    count = torch.zeros(12, 20)
    for x, window in zip((0, 8), windows):
        stitched[..., x:x + 12] += window
        count[:, x:x + 12] += 1
    expected = F.interpolate(stitched / count, size=(24, 40), mode="bilinear", align_corners=False)
    assert scores.shape == (1, 3, 24, 40) and torch.allclose(scores, expected, atol=1e-6)


# ---------------------------------------------------------------------- padded batches


def test_a_prediction_is_the_same_alone_or_padded_next_to_a_larger_image():
    model = WindowMeanModel()
    small, large = _images(batch=1, height=10, width=7, seed=2), _images(batch=1, height=12, width=9, seed=3)
    batch = torch.zeros(3, 3, 12, 9, dtype=torch.uint8)  # the loader pads bottom/right with black
    batch[0, :, :10, :7] = small[0]
    batch[1] = large[0]
    batch[2, :, :10, :7] = small[0]
    sizes = [(10, 7), (12, 9), (10, 7)]
    for cfg in (InferenceConfig(), InferenceConfig(short_side=8, window_size=6, window_stride=4, flip=True)):
        alone = predict_semantic_scores(model, small, cfg, "pft")
        model.shapes.clear()
        batched = predict_semantic_scores(model, batch, cfg, "pft", image_sizes=sizes)
        if cfg.window_size == 0:  # the two small images share a forward; nothing sees padding
            assert model.shapes == [(2, 3, 10, 7), (1, 3, 12, 9)]
        assert batched.shape == (3, 2, 12, 9)
        assert torch.allclose(batched[0, :, :10, :7], alone[0], atol=1e-6)
        assert torch.allclose(batched[2], batched[0]) and batched[0, :, 10:].abs().sum() == 0
        assert torch.allclose(batched[1], predict_semantic_scores(model, large, cfg, "pft")[0], atol=1e-6)
    # Read as one 12×9 batch, the padding leaks into the small image's prediction.
    assert not torch.allclose(predict_semantic_scores(model, batch, InferenceConfig(), "pft")[0, :, :10, :7],
                              predict_semantic_scores(model, small, InferenceConfig(), "pft")[0], atol=1e-3)
    with pytest.raises(ValueError, match="does not fit"):
        predict_semantic_scores(model, batch, InferenceConfig(), "pft", image_sizes=[(13, 9)] * 3)


# --------------------------------------------------------------------------------- TTA


def test_flip_tta_of_a_flip_equivariant_model_equals_no_tta():
    model, images = PixelModel(), _images()
    plain = predict_semantic_scores(model, images, InferenceConfig())
    flipped = predict_semantic_scores(model, images, InferenceConfig(flip=True))
    assert torch.allclose(flipped, plain, atol=1e-6)


def test_flip_tta_flips_the_scores_back_and_averages():
    model, images = PixelModel(ramp=4.0, pft=True), _images()
    plain = predict_semantic_scores(model, images, InferenceConfig(), "pft")
    flipped = predict_semantic_scores(model, images, InferenceConfig(flip=True), "pft")
    mirrored = semantic_scores(model(images.flip(-1).float()), "pft", images.shape[-2:]).flip(-1)
    assert torch.allclose(flipped, (plain + mirrored) / 2, atol=1e-6)
    assert not torch.allclose(flipped, plain, atol=1e-3)  # the ramp makes the flip matter


def test_scales_run_resized_images_and_come_back_at_the_input_size():
    model = PixelModel()
    images = torch.tensor([30.0, 200.0, 90.0]).view(1, 3, 1, 1).expand(2, 3, 12, 16)  # one colour
    single = predict_semantic_scores(model, images, InferenceConfig())
    model.shapes.clear()
    multi = predict_semantic_scores(model, images, InferenceConfig(scales=[0.5, 1.0, 1.5], flip=True))
    assert multi.shape == (2, 3, 12, 16)
    assert [s[-2:] for s in model.shapes] == [(6, 8)] * 2 + [(12, 16)] * 2 + [(18, 24)] * 2
    assert torch.allclose(multi, single, atol=1e-5)  # a constant image scores the same at every scale
    model.shapes.clear()
    slid = predict_semantic_scores(model, images, InferenceConfig(window_size=8, window_stride=6, scales=[0.75, 1.5]))
    assert slid.shape == (2, 3, 12, 16) and {s[-2:] for s in model.shapes} == {(8, 8)}
    assert torch.allclose(slid, single, atol=1e-5)


def test_multi_scale_averages_the_views():
    model, images = PixelModel(ramp=2.0), _images(batch=1, height=16, width=20)
    half = InferenceConfig(scales=[0.5])
    both = InferenceConfig(scales=[0.5, 1.0])
    expected = (predict_semantic_scores(model, images, half) + predict_semantic_scores(model, images, InferenceConfig())) / 2
    assert torch.allclose(predict_semantic_scores(model, images, both), expected, atol=1e-6)


# ------------------------------------------------------------------ passes and config


@pytest.mark.parametrize("cfg, max_batch", [
    (InferenceConfig(), 0),
    (InferenceConfig(scales=[0.5, 1.0], flip=True), 1),
    (InferenceConfig(window_size=16, window_stride=10, scales=[0.75, 1.25], flip=True), 3),
    (InferenceConfig(short_side=30, window_size=16, window_stride=10), 0),
])
def test_forward_passes_are_counted_and_capped(cfg, max_batch):
    model, images = PixelModel(), _images(batch=2)
    predict_semantic_scores(model, images, cfg, max_batch=max_batch)
    assert len(model.shapes) == count_forward_passes(images.shape[-2:], 2, cfg, max_batch)
    assert max(s[0] for s in model.shapes) <= (max_batch or 2)


def test_sync_passes_repeats_forwards_up_to_the_busiest_rank(monkeypatch):
    monkeypatch.setattr(tta, "max_across_ranks", lambda value: value + 2)
    model, images = PixelModel(), _images(batch=3)
    sizes = [(23, 37), (20, 30), (23, 37)]  # two size groups: 2 planned forwards, synced once
    scores = predict_semantic_scores(model, images, InferenceConfig(), image_sizes=sizes, sync_passes=True)
    assert len(model.shapes) == 4
    expected = predict_semantic_scores(PixelModel(), images, InferenceConfig(), image_sizes=sizes)
    assert torch.allclose(scores, expected)


def test_max_across_ranks_without_a_process_group_is_the_value():
    assert tta.max_across_ranks(7) == 7 and tta.collective_device() == torch.device("cpu")


@pytest.mark.parametrize("kwargs, key", [
    ({"short_side": -1}, "model.inference.short_side"),
    ({"window_size": -1}, "model.inference.window_size"),
    ({"window_size": 8, "window_stride": 0}, "model.inference.window_stride"),
    ({"window_size": 8, "window_stride": 9}, "model.inference.window_stride"),
    ({"scales": []}, "model.inference.scales"),
    ({"scales": [1.0, 0.0]}, "model.inference.scales"),
])
def test_bad_inference_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        predict_semantic_scores(PixelModel(), _images(), InferenceConfig(**kwargs))


def test_autocast_outputs_come_back_in_fp32():
    model, images = PixelModel(), _images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = predict_semantic_scores(model, images, InferenceConfig(window_size=16, window_stride=10))
    assert scores.dtype == torch.float32
