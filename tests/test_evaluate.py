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
