"""mIoU from one dataset-wide confusion matrix, checked against a brute-force count."""

import numpy as np
import pytest
import torch

from launcher.evaluate import ConfusionMatrix


def brute_force_miou(preds, targets, num_classes, ignore):
    ious = []
    for c in range(num_classes):
        inter = union = gt = 0
        for p, t in zip(preds, targets):
            valid = t != ignore
            inter += np.sum((p == c) & (t == c) & valid)
            union += np.sum(((p == c) | (t == c)) & valid)
            gt += np.sum((t == c) & valid)
        if union > 0:  # in the ground truth or the prediction
            ious.append(inter / union)
    return float(np.mean(ious))


def test_matches_brute_force_over_several_batches():
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 5, size=(2, 9, 7)) for _ in range(3)]
    targets = [rng.integers(0, 4, size=(2, 9, 7)) for _ in range(3)]
    for t in targets:
        t[t == 3] = 255  # class 3 only predicted, never in the ground truth: counts as IoU 0
    for p in preds:
        p[p == 4] = 0
    matrix = ConfusionMatrix(num_classes=5)  # class 4: neither predicted nor present
    for p, t in zip(preds, targets):
        matrix.update(torch.from_numpy(p), torch.from_numpy(t))
    results = matrix.results()
    assert results["miou"] == pytest.approx(brute_force_miou(preds, targets, 5, 255))
    assert results["per_class_iou"][3] == 0.0
    assert results["per_class_iou"][4] is None
    valid = sum(int(np.sum(t != 255)) for t in targets)
    assert results["pixels"] == valid
    correct = sum(int(np.sum((p == t) & (t != 255))) for p, t in zip(preds, targets))
    assert results["pixel_accuracy"] == pytest.approx(correct / valid)


def test_perfect_prediction_is_one_and_bad_labels_raise():
    target = torch.tensor([[0, 1], [2, 255]])
    matrix = ConfusionMatrix(num_classes=3)
    matrix.update(target.clone().masked_fill(target == 255, 0), target)
    assert matrix.results()["miou"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="target label 7 outside"):
        matrix.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7))
    with pytest.raises(ValueError, match="shape"):
        matrix.update(torch.zeros(2, 3, dtype=torch.long), target)


# ------------------------------------------------------- evaluate() with a toy model


class ColourCodedModel(torch.nn.Module):
    """Pixel colour channel q = 255 marks class q; the mask logits say so under either rule.
    ``pft``: PFT outputs (B×K logits, all confident). Otherwise MaskFormer outputs whose
    query q puts its softmax peak on class q+1, so the MaskFormer rule shifts every label."""

    def __init__(self, pft: bool):
        super().__init__()
        self.pft = pft

    def forward(self, images):
        b = images.shape[0]
        masks = images.float() / 255 * 20 - 10  # B×3×H×W: +10 where the channel is set
        if self.pft:
            return {"pred_logits": torch.full((b, 3), 10.0), "pred_masks": masks}
        logits = torch.zeros(b, 3, 4)
        logits[:, torch.arange(3), (torch.arange(3) + 1) % 3] = 20.0
        return {"pred_logits": logits, "pred_masks": masks}


def _colour_batches():
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        semantic = torch.randint(0, 3, (2, 9, 13), generator=g)
        images = (torch.nn.functional.one_hot(semantic, 3).permute(0, 3, 1, 2) * 255).to(torch.uint8)
        semantic[:, 0, :2] = 255  # some ignored pixels
        batches.append({"images": images, "semantic": semantic})
    return batches


def test_evaluate_uses_the_rule_and_the_inference_config():
    from launcher.evaluate import evaluate
    from model.config import InferenceConfig

    batches = _colour_batches()
    assert evaluate(ColourCodedModel(pft=True), batches, 3, rule="pft").results()["miou"] == pytest.approx(1.0)
    assert evaluate(ColourCodedModel(pft=False), batches, 3).results()["miou"] == pytest.approx(0.0)
    tta = InferenceConfig(short_side=12, window_size=8, window_stride=5, scales=[1.0, 2.0], flip=True)
    assert evaluate(ColourCodedModel(pft=True), batches, 3, inference=tta, rule="pft").results()["miou"] == \
        pytest.approx(1.0)
    with pytest.raises(ValueError, match="model.num_classes is 4"):
        evaluate(ColourCodedModel(pft=True), batches, 4, rule="pft")
    with pytest.raises(ValueError, match="model.name=pft"):  # PFT outputs read with MaskFormer's rule
        evaluate(ColourCodedModel(pft=True), batches, 3)


class BrightnessModel(torch.nn.Module):
    """PFT-shaped toy with a global view: every pixel is class 1 if the whole input's mean
    brightness is above 100, else class 0 — as sensitive to padding as a model can be."""

    def forward(self, images):
        b, _, h, w = images.shape
        bright = images.float().mean((1, 2, 3)) > 100  # B
        masks = torch.where(bright, 10.0, -10.0)[:, None, None, None].expand(b, 1, h, w)
        masks = torch.cat([-masks, masks], 1)  # class 0 = dark, class 1 = bright
        return {"pred_logits": torch.full((b, 2), 10.0), "pred_masks": masks}


def test_a_prediction_does_not_depend_on_its_batch_mates():
    from data_pipeline.loader import collate_batch
    from launcher.evaluate import evaluate

    small = {"image": torch.full((3, 6, 5), 200, dtype=torch.uint8), "semantic": torch.ones(6, 5, dtype=torch.int64),
             "key": "bright"}
    large = {"image": torch.full((3, 16, 20), 20, dtype=torch.uint8), "semantic": torch.zeros(16, 20, dtype=torch.int64),
             "key": "dark"}
    alone = evaluate(BrightnessModel(), [collate_batch([small]), collate_batch([large])], 2, rule="pft")
    assert alone.results()["miou"] == pytest.approx(1.0)
    together = collate_batch([small, large])  # the small image is padded to 16×20 with black
    assert torch.equal(evaluate(BrightnessModel(), [together], 2, rule="pft").matrix, alone.matrix)
    # Predicted from the padded canvas, the small image would turn dark.
    del together["image_sizes"]
    assert evaluate(BrightnessModel(), [together], 2, rule="pft").results()["miou"] < 0.5


# ------------------------------------------------------------------- presets and ranks


@pytest.mark.parametrize("name", ["maskformer_r50", "maskformer_r101", "maskformer_swin_t", "maskformer_swin_s",
                                  "maskformer_swin_b", "maskformer_swin_l", "maskformer_vit_l", "pft_r50",
                                  "pft_swin_t", "pft_swin_b", "pft_swin_l", "pft_vit_l"])
def test_presets_test_whole_images_at_the_training_scale_as_maskformer(name):
    import os

    from launcher.config import load_config

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}_ade20k.yaml"))
    crop, inference = cfg.data.crop_size, cfg.model.inference
    assert crop == (640 if name.endswith(("swin_b", "swin_l")) else 512)
    # detectron2's ResizeShortestEdge(MIN_SIZE_TEST=crop, MAX_SIZE_TEST=4 x crop), whole image
    assert (inference.short_side, inference.max_size, inference.window_size) == (crop, 4 * crop, 0)
    assert inference.scales == [1.0] and not inference.flip  # single-scale: the papers' main numbers


def test_lockstep_and_matrix_reduction_on_a_one_rank_gloo_group():
    import torch.distributed as dist

    from launcher.evaluate import evaluate

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        batches = _colour_batches()
        matrix = evaluate(ColourCodedModel(pft=True), batches, 3, lockstep=True, rule="pft")
        before = matrix.matrix.clone()
        matrix.all_reduce()
        assert torch.equal(matrix.matrix, before) and matrix.results()["miou"] == pytest.approx(1.0)
    finally:
        dist.destroy_process_group()
