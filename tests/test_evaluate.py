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
    """PFT-shaped toy: pixel colour channel q = 255 marks class q. Its mask logits are right
    under either rule, but its class logits put each query's softmax peak on the *next*
    class, so MaskFormer's rule shifts every label while PFT's rule (diagonal) is exact."""

    def forward(self, images):
        b = images.shape[0]
        masks = images.float() / 255 * 20 - 10  # B×3×H×W: +10 where the channel is set
        logits = torch.zeros(b, 3, 4)
        logits[:, torch.arange(3), torch.arange(3)] = 10.0
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

    batches, model = _colour_batches(), ColourCodedModel()
    assert evaluate(model, batches, 3, rule="pft").results()["miou"] == pytest.approx(1.0)
    assert evaluate(model, batches, 3).results()["miou"] == pytest.approx(0.0)  # maskformer rule
    tta = InferenceConfig(window_size=8, window_stride=5, scales=[1.0, 2.0], flip=True)
    assert evaluate(model, batches, 3, inference=tta, rule="pft").results()["miou"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="model.num_classes is 4"):
        evaluate(model, batches, 4, rule="pft")
