import ops.torchvision_fix  # noqa: F401  (before timm)

# isort: split
import itertools
import math

import pytest
import torch

from model.matcher import HungarianMatcher
from ops.losses import (
    batch_dice_loss,
    batch_mask_costs,
    batch_sigmoid_focal_loss,
    dice_loss,
    sigmoid_focal_loss,
)
from ops.point_sampling import point_sample


def test_batch_losses_hand_values():
    # Logit 0 -> p = 0.5 everywhere. Target row 0 = all ones, row 1 = all zeros.
    inputs = torch.zeros(1, 4)
    targets = torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0]])
    focal = batch_sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2)
    # positive pixel: alpha * (1-p)^2 * ln 2; negative pixel: (1-alpha) * p^2 * ln 2
    expected = torch.tensor([[0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)]])
    torch.testing.assert_close(focal, expected)
    dice = batch_dice_loss(inputs, targets)
    # 1 - (2*2 + 1) / (2 + 4 + 1) and 1 - (0 + 1) / (2 + 0 + 1)
    torch.testing.assert_close(dice, torch.tensor([[1 - 5 / 7, 1 - 1 / 3]]))


@pytest.mark.parametrize("alpha, gamma", [(0.3, 1.5), (0.25, 2.0), (-1.0, 2.0)])
def test_batch_losses_equal_the_per_pair_losses(alpha, gamma):
    torch.manual_seed(0)
    inputs = torch.randn(5, 3, 4) * 3
    inputs[0, 0] = torch.tensor([30.0, -30.0, 0.0, 12.0])  # saturated logits: softplus(x) - x
    targets = (torch.rand(4, 3, 4) > 0.5).float()
    focal = batch_sigmoid_focal_loss(inputs, targets, alpha=alpha, gamma=gamma)
    dice = batch_dice_loss(inputs, targets)
    both = batch_mask_costs(inputs, targets, alpha=alpha, gamma=gamma)
    assert torch.equal(both[0], focal) and torch.equal(both[1], dice)
    for i, j in itertools.product(range(5), range(4)):
        torch.testing.assert_close(
            focal[i, j], sigmoid_focal_loss(inputs[i : i + 1], targets[j : j + 1], 1, alpha=alpha, gamma=gamma)
        )
        torch.testing.assert_close(dice[i, j], dice_loss(inputs[i : i + 1], targets[j : j + 1], 1))


def test_batch_losses_are_fp32_under_bf16_autocast():
    inputs = torch.randn(3, 16).bfloat16()
    targets = (torch.rand(2, 16) > 0.5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert batch_sigmoid_focal_loss(inputs, targets).dtype == torch.float32
        assert batch_dice_loss(inputs, targets).dtype == torch.float32


def _random_case(seed: int, queries: int, num_targets: int, classes: int = 4, size: int = 4):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(1, queries, classes + 1, generator=g) * 2,
        "pred_masks": torch.randn(1, queries, size, size, generator=g) * 2,
    }
    target = {
        "labels": torch.randint(0, classes, (num_targets,), generator=g),
        "masks": torch.rand(num_targets, size, size, generator=g) > 0.5,
    }
    return outputs, target


@pytest.mark.parametrize("seed", range(4))
def test_matching_is_optimal_against_brute_force(seed):
    queries, num_targets = 5, 3
    outputs, target = _random_case(seed, queries, num_targets)
    matcher = HungarianMatcher(cost_class=1.0, cost_focal=20.0, cost_dice=1.0)
    [(rows, cols)] = matcher(outputs, [target])
    assert rows.dtype == cols.dtype == torch.int64 and len(rows) == num_targets
    assert sorted(cols.tolist()) == list(range(num_targets))

    # The cost, computed independently, one pair at a time.
    prob = outputs["pred_logits"][0].softmax(-1)
    masks = outputs["pred_masks"][0]
    tmasks = target["masks"].float()
    cost = torch.empty(queries, num_targets)
    for i, j in itertools.product(range(queries), range(num_targets)):
        cost[i, j] = (
            -prob[i, target["labels"][j]]
            + 20 * sigmoid_focal_loss(masks[i : i + 1], tmasks[j : j + 1], 1)
            + dice_loss(masks[i : i + 1], tmasks[j : j + 1], 1)
        )
    torch.testing.assert_close(matcher.cost_matrix(prob.log(), masks, target["labels"], target["masks"]), cost)

    best = min(
        sum(cost[q, j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(queries), num_targets)
    )
    found = sum(cost[r, c] for r, c in zip(rows.tolist(), cols.tolist()))
    assert float(found) == pytest.approx(float(best), abs=1e-5)


def test_matcher_recovers_a_planted_permutation_with_downsampled_targets():
    # Query q predicts (class, mask) of target perm[q]; targets are at 4x the
    # prediction resolution, as in training (input size vs stride 4).
    torch.manual_seed(0)
    perm = [2, 0, 1]
    labels = torch.tensor([1, 3, 2])
    small = torch.zeros(3, 4, 4, dtype=torch.bool)
    small[0, :2] = True
    small[1, 2:, :2] = True
    small[2, 2:, 2:] = True
    big = small.repeat_interleave(4, 1).repeat_interleave(4, 2)
    logits = torch.full((1, 6, 5), -5.0)
    masks = torch.full((1, 6, 4, 4), -8.0)  # extra queries 3..5 predict nothing
    for q, t in enumerate(perm):
        logits[0, q, labels[t]] = 5.0
        masks[0, q] = small[t].float() * 16 - 8
    [(rows, cols)] = HungarianMatcher()({"pred_logits": logits, "pred_masks": masks}, [{"labels": labels, "masks": big}])
    assert dict(zip(cols.tolist(), rows.tolist())) == {t: q for q, t in enumerate(perm)}


def test_matcher_handles_images_without_targets_and_bf16_outputs():
    outputs, target = _random_case(0, queries=4, num_targets=2)
    outputs = {k: v.bfloat16() for k, v in outputs.items()}
    empty = {"labels": torch.empty(0, dtype=torch.int64), "masks": torch.empty(0, 4, 4, dtype=torch.bool)}
    batched = {k: v.repeat(2, 1, 1) if v.dim() == 3 else v.repeat(2, 1, 1, 1) for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        indices = HungarianMatcher()(batched, [target, empty])
    assert [len(r) for r, _ in indices] == [2, 0]
    assert indices[1][0].dtype == torch.int64


def test_matcher_rejects_non_finite_costs():
    outputs, target = _random_case(0, queries=3, num_targets=2)
    outputs["pred_masks"][0, 1, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        HungarianMatcher()(outputs, [target])


def test_point_sampled_costs_compare_every_pair_at_the_same_points():
    outputs, target = _random_case(3, queries=4, num_targets=2, size=6)
    matcher = HungarianMatcher(cost_class=1.0, cost_focal=20.0, cost_dice=1.0, num_points=16)
    logits, masks = outputs["pred_logits"][0], outputs["pred_masks"][0]
    torch.manual_seed(7)
    cost = matcher.cost_matrix(logits, masks, target["labels"], target["masks"])
    torch.manual_seed(7)
    points = torch.rand(1, 16, 2)  # the matcher's draw: one set of points per image
    pred = point_sample(masks[:, None], points.expand(4, -1, -1))[:, 0]
    tgt = point_sample(target["masks"][:, None].float(), points.expand(2, -1, -1))[:, 0]
    assert ((tgt > 0) & (tgt < 1)).any()  # the case exercises soft targets
    prob = logits.softmax(-1)
    # Bilinear sampling makes soft targets t; the focal cost blends the positive and the
    # negative focal terms linearly, t * focal(x, 1) + (1 - t) * focal(x, 0).
    ones = torch.ones(1, 1)
    for i, j in itertools.product(range(4), range(2)):
        focal = sum(
            float(t) * sigmoid_focal_loss(x.view(1, 1), ones, 1) + (1 - float(t)) * sigmoid_focal_loss(x.view(1, 1), 0 * ones, 1)
            for x, t in zip(pred[i], tgt[j])
        ) / len(tgt[j])
        expected = -prob[i, target["labels"][j]] + 20 * focal + dice_loss(pred[i : i + 1], tgt[j : j + 1], 1)
        torch.testing.assert_close(cost[i, j], expected)
    with pytest.raises(ValueError, match="model.matcher.num_points"):
        HungarianMatcher(num_points=-1)


def test_point_sampled_matcher_recovers_a_planted_permutation():
    labels = torch.tensor([1, 3, 2])
    big = torch.zeros(3, 16, 16, dtype=torch.bool)
    big[0, :8], big[1, 8:, :8], big[2, 8:, 8:] = True, True, True
    logits = torch.full((1, 5, 5), -5.0)
    masks = torch.full((1, 5, 4, 4), -8.0)
    perm = [1, 2, 0]
    small = big[:, ::4, ::4].float()
    for q, t in enumerate(perm):
        logits[0, q, labels[t]] = 5.0
        masks[0, q] = small[t] * 16 - 8
    torch.manual_seed(0)
    [(rows, cols)] = HungarianMatcher(num_points=64)(
        {"pred_logits": logits, "pred_masks": masks}, [{"labels": labels, "masks": big}]
    )
    assert dict(zip(cols.tolist(), rows.tolist())) == {t: q for q, t in enumerate(perm)}
