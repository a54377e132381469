"""Semantic inference rules (MaskFormer, PFT) and test-time prediction (sliding window, TTA)."""

import math

import pytest
import torch
from torch import nn

import model.test_time as test_time
from model.config import InferenceConfig
from model.inference import pft_semantic_inference, semantic_inference, semantic_scores, semantic_segmentation
from model.test_time import count_forward_passes, predict_semantic_scores, window_starts


class PixelModel(nn.Module):
    """Per-pixel toy (so window- and flip-equivariant): mask logits are a fixed affine map of
    each pixel's colour at full resolution; class logits are fixed. Records input shapes."""

    def __init__(self, num_classes: int = 3, ramp: float = 0.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(num_classes, 3, generator=g) * 3
        self.bias = torch.randn(num_classes, generator=g)
        self.logits = torch.randn(num_classes, num_classes + 1, generator=g) * 2
        self.ramp = ramp  # > 0 adds a left-to-right ramp: breaks flip equivariance
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, images):
        self.shapes.append(tuple(images.shape))
        x = images.float() / 255
        masks = torch.einsum("qc,bchw->bqhw", self.weight, x) + self.bias[:, None, None]
        masks = masks + self.ramp * torch.linspace(-1, 1, x.shape[-1])
        return {"pred_logits": self.logits.expand(x.shape[0], -1, -1), "pred_masks": masks}


class WindowMeanModel(nn.Module):
    """PFT-style toy whose every mask probability is the mean intensity of its whole input:
    a stitched map then shows exactly which windows covered each pixel."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, images):
        self.shapes.append(tuple(images.shape))
        b, _, h, w = images.shape
        mean = (images.float() / 255).mean((1, 2, 3)).clamp(1e-4, 1 - 1e-4)  # B
        logits = torch.full((b, 2, 3), -30.0)
        logits[:, 0, 0] = logits[:, 1, 1] = 30.0  # p_i = sigmoid(30) = 1 in fp32
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


def test_pft_rule_is_sigmoid_of_own_class_logit_times_mask_on_a_hand_case():
    # Query 0 votes loudly for class 2 and query 1 for class 0 off the diagonal: PFT ignores that.
    logits = torch.tensor([[[0.0, 5.0, 9.0], [7.0, -1.0, 3.0]]])
    masks = torch.tensor([[[[2.0, -2.0]], [[0.0, 3.0]]]])  # B×K×1×2
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = torch.tensor([[[[0.5 * sig(2), 0.5 * sig(-2)]], [[sig(-1) * 0.5, sig(-1) * sig(3)]]]])
    scores = pft_semantic_inference(logits, masks)
    assert torch.allclose(scores, expected, atol=1e-6)
    outputs = {"pred_logits": logits, "pred_masks": masks}
    assert semantic_segmentation(outputs, (1, 2), rule="pft").tolist() == [[[0, 1]]]
    assert torch.allclose(semantic_scores(outputs, "pft"), expected, atol=1e-6)
    # The same outputs read with MaskFormer's rule give another answer: the rule matters.
    assert semantic_segmentation(outputs, (1, 2)).tolist() != [[[0, 1]]]
    with pytest.raises(ValueError, match="one query per class"):
        pft_semantic_inference(torch.zeros(1, 3, 3), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="model.name"):
        semantic_scores(outputs, "detr")


# ---------------------------------------------------------------------- sliding window


def test_window_starts_end_flush_with_the_border():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(4, 4, 3) == [0]
    assert window_starts(3, 4, 2) == [0]
    assert window_starts(683, 512, 341) == [0, 171]


@pytest.mark.parametrize("rule", ["maskformer", "pft"])
def test_sliding_windows_agree_with_whole_image_for_a_local_model(rule):
    model, images = PixelModel(), _images()
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


# --------------------------------------------------------------------------------- TTA


def test_flip_tta_of_a_flip_equivariant_model_equals_no_tta():
    model, images = PixelModel(), _images()
    plain = predict_semantic_scores(model, images, InferenceConfig())
    flipped = predict_semantic_scores(model, images, InferenceConfig(flip=True))
    assert torch.allclose(flipped, plain, atol=1e-6)


def test_flip_tta_flips_the_scores_back_and_averages():
    model, images = PixelModel(ramp=4.0), _images()
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
])
def test_forward_passes_are_counted_and_capped(cfg, max_batch):
    model, images = PixelModel(), _images(batch=2)
    predict_semantic_scores(model, images, cfg, max_batch=max_batch)
    assert len(model.shapes) == count_forward_passes(images.shape[-2:], 2, cfg, max_batch)
    assert max(s[0] for s in model.shapes) <= (max_batch or 2)


def test_sync_passes_repeats_forwards_up_to_the_busiest_rank(monkeypatch):
    monkeypatch.setattr(test_time, "_max_across_ranks", lambda value, device: value + 2)
    model, images = PixelModel(), _images()
    scores = predict_semantic_scores(model, images, InferenceConfig(), sync_passes=True)
    assert len(model.shapes) == 3
    assert torch.allclose(scores, predict_semantic_scores(PixelModel(), images, InferenceConfig()))


@pytest.mark.parametrize("kwargs, key", [
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
