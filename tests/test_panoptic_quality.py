"""PQ / SQ / RQ on hand-built panoptic maps; every expected number is derived in a comment."""

from collections import Counter

import numpy as np
import pytest
import torch

from launcher.panoptic_quality import (
    PanopticAccumulator,
    PanopticFormatError,
    format_table,
    id_to_rgb,
    rgb_to_id,
)

# Categories 1, 2 and 5 are things, 3 and 4 stuff.
CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 3, "name": "sky", "isthing": 0},
    {"id": 4, "name": "road", "isthing": 0},
    {"id": 5, "name": "dog", "isthing": 1},
]


def row(*runs: tuple[int, int]) -> np.ndarray:
    """A 1 x N id map from (id, length) runs: row((1, 2), (0, 1)) = [[1, 1, 0]]."""
    return np.concatenate([np.full(n, i) for i, n in runs])[None, :]


def segs(*pairs, crowd=()) -> list[dict]:
    """Segments from (id, category) pairs; ids in ``crowd`` are iscrowd."""
    return [{"id": i, "category_id": c, "iscrowd": int(i in crowd)} for i, c in pairs]


def score(gt, gt_segments, pred, pred_segments) -> tuple[dict, PanopticAccumulator]:
    acc = PanopticAccumulator(CATEGORIES)
    acc.update(gt, gt_segments, pred, pred_segments)
    return acc.results(), acc


def per_class(results: dict, category_id: int) -> dict:
    return next(c for c in results["per_class"] if c["id"] == category_id)


def test_perfect_prediction_with_other_ids_scores_one():
    # 2-D maps, prediction ids renumbered (one needs all three RGB channels).
    gt = np.array([[1, 1, 3, 3], [1, 0, 3, 3], [2, 2, 4, 4]])
    big = 256 * 256 * 7 + 256 * 2 + 9
    pred = np.select([gt == 1, gt == 2, gt == 3, gt == 4], [big, 40, 50, 60], 0)
    results, acc = score(
        gt, segs((1, 1), (2, 2), (3, 3), (4, 4)), pred, segs((big, 1), (40, 2), (50, 3), (60, 4))
    )
    for group, n in (("All", 4), ("Things", 2), ("Stuff", 2)):
        assert results[group] == pytest.approx({"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": n})
    assert acc.stats[:, 1].tolist() == [1, 1, 1, 1, 0]  # one TP each; "dog" absent
    assert not per_class(results, 5)["counted"]


@pytest.mark.parametrize(
    "width, shift, thing_iou",
    [
        (10, 3, 7 / 13),  # intersection 10-3 = 7, union 10+3 = 13: 0.538 > 0.5, a match
        (10, 4, None),  # 6 / 14 = 0.429: no match
        (3, 1, None),  # 2 / 4 = exactly 0.5: no match (IoU must exceed 0.5)
    ],
)
def test_shifted_segment_matches_only_above_half_iou(width, shift, thing_iou):
    # GT: thing id 1 (person) on [0, width), stuff id 2 (sky) on [width, 2 width).
    # Pred: thing shifted right by `shift`, sky after it, the first `shift` pixels unlabelled.
    gt = row((1, width), (2, width))
    pred = row((0, shift), (7, width), (8, width - shift))
    results, _ = score(gt, segs((1, 1), (2, 3)), pred, segs((7, 1), (8, 3)))
    # Sky: intersection width - shift, union = GT sky (width): IoU (width - shift) / width, a match.
    sky_iou = (width - shift) / width
    assert per_class(results, 3)["pq"] == pytest.approx(sky_iou)
    person = per_class(results, 1)
    if thing_iou is None:  # one FN (GT) and one FP (prediction): PQ = 0 / (0 + 1/2 + 1/2)
        assert (person["tp"], person["fp"], person["fn"]) == (0, 1, 1)
        assert person["pq"] == 0.0 and results["Things"]["pq"] == 0.0
        assert results["All"]["pq"] == pytest.approx(sky_iou / 2)
    else:  # TP: PQ = SQ = IoU, RQ = 1
        assert (person["tp"], person["fp"], person["fn"]) == (1, 0, 0)
        assert person["pq"] == pytest.approx(thing_iou) and person["sq"] == pytest.approx(thing_iou)
        assert results["All"]["pq"] == pytest.approx((thing_iou + sky_iou) / 2)
    assert results["All"]["n"] == 2


def test_prediction_spilling_onto_void_keeps_its_iou():
    # GT: person id 1 on [0,10), void on [10,20), sky id 2 on [20,30).
    # Pred: person on [0,14) (4 pixels on void), a car wholly on void [14,20), sky exact.
    gt = row((1, 10), (0, 10), (2, 10))
    pred = row((5, 14), (6, 6), (7, 10))
    results, _ = score(gt, segs((1, 1), (2, 3)), pred, segs((5, 1), (6, 2), (7, 3)))
    # Person: union = 14 + 10 - 10 - 4 (on void) = 10 -> IoU 1 (it would be 10/14 if void counted).
    assert per_class(results, 1)["sq"] == pytest.approx(1.0)
    # The car is all on void: not an FP, so "car" has no TP/FP/FN and is left out of the averages.
    assert per_class(results, 2)["fp"] == 0 and not per_class(results, 2)["counted"]
    assert results["All"] == pytest.approx({"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2})
    assert results["Things"]["n"] == 1 and results["Stuff"]["n"] == 1


@pytest.mark.parametrize("car_start, car_is_fp", [(2, True), (1, False)])
def test_unmatched_prediction_is_ignored_only_when_more_than_half_on_void(car_start, car_is_fp):
    # GT: void [0,4), sky id 1 on [4,10) (6 px). Pred: unlabelled up to car_start, a car up to 6,
    # sky on [6,10): intersection 4, union 4 + 6 - 4 = 6 -> sky IoU 2/3, a match.
    # Car from 2: 2 of 4 pixels on void = exactly 1/2 -> FP. From 1: 3 of 5 on void -> ignored.
    gt = row((0, 4), (1, 6))
    pred = row((0, car_start), (3, 6 - car_start), (4, 4))
    results, _ = score(gt, segs((1, 3)), pred, segs((3, 2), (4, 3)))
    assert per_class(results, 3)["pq"] == pytest.approx(2 / 3)
    assert per_class(results, 2)["fp"] == int(car_is_fp)
    if car_is_fp:  # All averages car (PQ 0) and sky (2/3)
        assert results["All"]["pq"] == pytest.approx(1 / 3) and results["All"]["n"] == 2
        assert results["Things"] == pytest.approx({"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1})
    else:
        assert results["All"]["pq"] == pytest.approx(2 / 3) and results["All"]["n"] == 1
        assert results["Things"]["n"] == 0


@pytest.mark.parametrize(
    "on_crowd_category, expected_all_pq",
    [
        (1, 1.0),  # a person on the person crowd is ignored: person TP only -> All = (1 + 1) / 2
        (2, 2 / 3),  # a car on the person crowd is an FP for car: All = (1 + 0 + 1) / 3
    ],
)
def test_crowd_regions(on_crowd_category, expected_all_pq):
    # GT: person crowd id 1 on [0,10), person id 2 on [10,20), sky id 3 on [20,30).
    # Pred: a segment exactly on the crowd, the person and the sky exact.
    gt = row((1, 10), (2, 10), (3, 10))
    pred = row((11, 10), (12, 10), (13, 10))
    results, _ = score(
        gt, segs((1, 1), (2, 1), (3, 3), crowd={1}), pred, segs((11, on_crowd_category), (12, 1), (13, 3))
    )
    person = per_class(results, 1)
    # The crowd is never matched (even with IoU 1) and never a false negative.
    assert (person["tp"], person["fn"]) == (1, 0)
    assert person["fp"] == 0 and per_class(results, 2)["fp"] == int(on_crowd_category == 2)
    assert results["All"]["pq"] == pytest.approx(expected_all_pq)


def test_crowd_pixels_stay_in_the_union_as_in_panopticapi():
    # GT: person crowd id 1 on [0,10), person id 2 on [10,20). Pred: one person over both.
    # IoU with id 2 = 10 / (20 + 10 - 10) = 1/2 -> no match (only void leaves the union) -> FN.
    # Unmatched, 10 of its 20 pixels on crowd = exactly 1/2 -> not ignored -> FP.
    results, _ = score(row((1, 10), (2, 10)), segs((1, 1), (2, 1), crowd={1}), row((5, 20)), segs((5, 1)))
    person = per_class(results, 1)
    assert (person["tp"], person["fp"], person["fn"]) == (0, 1, 1)


def test_unmatched_segments_and_the_things_stuff_split():
    # GT: person 1 [0,10), person 2 [10,20), sky 3 [20,40), road 4 [40,50).
    # Pred: person a [0,10) exact; car b [10,20) (wrong category: GT 2 is FN, b is FP);
    # sky c [20,35): 15 / 20 = 0.75; road d [35,50): intersection 10, union 15 + 10 - 10 = 15 -> 2/3.
    gt = row((1, 10), (2, 10), (3, 20), (4, 10))
    pred = row((21, 10), (22, 10), (23, 15), (24, 15))
    results, acc = score(
        gt, segs((1, 1), (2, 1), (3, 3), (4, 4)), pred, segs((21, 1), (22, 2), (23, 3), (24, 4))
    )
    # [iou, tp, fp, fn] per category (person, car, sky, road, dog).
    expected = [[1, 1, 0, 1], [0, 0, 1, 0], [0.75, 1, 0, 0], [2 / 3, 1, 0, 0], [0, 0, 0, 0]]
    assert acc.stats == pytest.approx(np.array(expected))
    # person: PQ = 1 / (1 + 1/2) = 2/3, SQ 1, RQ 2/3; car: 0, 0, 0; sky: 3/4, 3/4, 1; road: 2/3, 2/3, 1.
    assert results["All"] == pytest.approx(
        {
            "pq": (2 / 3 + 0 + 3 / 4 + 2 / 3) / 4,  # 25/48
            "sq": (1 + 0 + 3 / 4 + 2 / 3) / 4,  # 29/48
            "rq": (2 / 3 + 0 + 1 + 1) / 4,
            "n": 4,
        }
    )  # 2/3
    assert results["Things"] == pytest.approx({"pq": 1 / 3, "sq": 1 / 2, "rq": 1 / 3, "n": 2})
    assert results["Stuff"] == pytest.approx({"pq": 17 / 24, "sq": 17 / 24, "rq": 1.0, "n": 2})
    table = format_table(results)
    assert "All       |  52.1   60.4   66.7      4" in table  # 25/48, 29/48, 2/3 in %
    assert "Things    |  33.3   50.0   33.3      2" in table


def test_merge_equals_one_accumulator_over_both_images():
    # Image A: person exact (TP, IoU 1). Image B: person missed (FN) and a spurious car (FP).
    image_a = (row((1, 4)), segs((1, 1)), row((9, 4)), segs((9, 1)))
    image_b = (row((1, 2), (2, 2)), segs((1, 1), (2, 3)), row((5, 2), (6, 2)), segs((5, 2), (6, 3)))
    one = PanopticAccumulator(CATEGORIES)
    one.update(*image_a)
    one.update(*image_b)
    first, second = PanopticAccumulator(CATEGORIES), PanopticAccumulator(CATEGORIES)
    first.update(*image_a)
    second.update(*image_b)
    tensors = first.to_tensor(), second.to_tensor()
    merged = first.merge(second)
    assert merged.stats == pytest.approx(one.stats)
    # person: TP 1 (IoU 1), FN 1 -> PQ 1 / (1 + 1/2) = 2/3; car: FP -> 0; sky: 1 -> All 5/9.
    results = merged.results()
    assert per_class(results, 1)["pq"] == pytest.approx(2 / 3)
    assert results["All"]["pq"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    # The tensor form round-trips, and sums like a rank's all_reduce would.
    assert tensors[0].dtype == torch.float64 and tensors[0].shape == (5, 4)
    summed = PanopticAccumulator(CATEGORIES)
    summed.load_tensor(tensors[0] + tensors[1])
    assert summed.stats == pytest.approx(one.stats)
    summed.all_reduce()  # no process group: unchanged
    assert summed.stats == pytest.approx(one.stats)
    with pytest.raises(ValueError, match="different categories"):
        first.merge(PanopticAccumulator(CATEGORIES[:2]))


def test_no_counted_category_gives_zero_not_a_crash():
    results, _ = score(row((0, 3)), [], row((0, 3)), [])
    assert results["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}


def test_rgb_ids_round_trip():
    ids = np.array([[0, 1, 256], [65536, 256 * 256 * 255 + 3, 300]])
    rgb = id_to_rgb(ids)
    assert rgb[1, 1].tolist() == [3, 0, 255] and rgb[0, 2].tolist() == [0, 1, 0]
    assert (rgb_to_id(rgb) == ids).all()


@pytest.mark.parametrize(
    "gt_segments, pred_segments, message",
    [
        (segs((1, 1)), segs((5, 1)), r"ground truth: segment id 2 is in the PNG but not in segments_info"),
        (
            segs((1, 1), (2, 3), (7, 3)),
            segs((5, 1)),
            r"ground truth: segment id 7 is in segments_info but not in",
        ),
        (segs((1, 1), (2, 3)), segs((5, 9)), r"prediction: segment id 5 has unknown category_id 9"),
        (segs((1, 1), (2, 3)), segs((5, 1), (5, 1)), r"prediction: segment id 5 is listed twice"),
    ],
)
def test_maps_and_segment_lists_that_disagree_are_named(gt_segments, pred_segments, message):
    acc = PanopticAccumulator(CATEGORIES)
    with pytest.raises(PanopticFormatError, match=message):
        acc.update(row((1, 2), (2, 2)), gt_segments, row((5, 2), (0, 2)), pred_segments)
    with pytest.raises(PanopticFormatError, match=r"prediction: size \(1, 3\) differs"):
        acc.update(row((1, 2), (2, 2)), segs((1, 1), (2, 3)), row((5, 3)), segs((5, 1)))


def reference_stats(gt, gt_segments, pred, pred_segments) -> np.ndarray:
    """The COCO panoptic API's per-image loop, pixel by pixel in plain Python: a slow but
    independent statement of the rules to check the vectorised code against."""
    column = {c["id"]: k for k, c in enumerate(CATEGORIES)}
    stats = np.zeros((len(CATEGORIES), 4))
    pairs = Counter(zip(gt.ravel().tolist(), pred.ravel().tolist()))
    gt_info = {s["id"]: {**s, "area": int((gt == s["id"]).sum())} for s in gt_segments}
    pred_info = {s["id"]: {**s, "area": int((pred == s["id"]).sum())} for s in pred_segments}
    gt_matched, pred_matched = set(), set()
    for (g, p), intersection in pairs.items():
        if g not in gt_info or p not in pred_info or gt_info[g]["iscrowd"]:
            continue
        if gt_info[g]["category_id"] != pred_info[p]["category_id"]:
            continue
        union = pred_info[p]["area"] + gt_info[g]["area"] - intersection - pairs.get((0, p), 0)
        if intersection / union > 0.5:
            stats[column[gt_info[g]["category_id"]]] += [intersection / union, 1, 0, 0]
            gt_matched.add(g)
            pred_matched.add(p)
    crowd = {}
    for g, info in gt_info.items():
        if g in gt_matched:
            continue
        if info["iscrowd"]:
            crowd[info["category_id"]] = g
            continue
        stats[column[info["category_id"]], 3] += 1
    for p, info in pred_info.items():
        if p in pred_matched:
            continue
        covered = pairs.get((0, p), 0)
        if info["category_id"] in crowd:
            covered += pairs.get((crowd[info["category_id"]], p), 0)
        if covered / info["area"] <= 0.5:
            stats[column[info["category_id"]], 2] += 1
    return stats


def random_image(rng: np.random.Generator) -> tuple:
    """Blobby GT (void, crowd at most once per category) and a perturbed, renumbered prediction."""
    gt = np.kron(rng.integers(0, 9, (6, 6)), np.ones((4, 4), dtype=np.int64))
    gt[rng.random(gt.shape) < 0.05] = 0
    gt_categories = rng.integers(1, 6, 9)
    crowd_ids = {i for i in range(1, 9) if rng.random() < 0.3 and gt_categories[i] not in gt_categories[1:i]}
    gt_segments = segs(*[(int(i), int(gt_categories[i])) for i in np.unique(gt) if i], crowd=crowd_ids)
    pred = np.roll(gt, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
    noise = rng.random(pred.shape) < 0.1
    pred[noise] = rng.integers(0, 12, int(noise.sum()))
    renumber = rng.permutation(np.arange(1, 13)) * 1000  # prediction 0 stays unlabelled
    pred = np.where(pred > 0, renumber[np.maximum(pred - 1, 0)], 0)
    pred_categories = {
        int(i): int(gt_categories[i]) if i < 9 and rng.random() < 0.8 else int(rng.integers(1, 6))
        for i in range(1, 13)
    }
    pred_segments = segs(
        *[(int(renumber[i - 1]), pred_categories[i]) for i in range(1, 13) if (pred == renumber[i - 1]).any()]
    )
    return gt, gt_segments, pred, pred_segments


def test_vectorised_update_agrees_with_a_per_pixel_reference_on_random_maps():
    rng = np.random.default_rng(0)
    total = PanopticAccumulator(CATEGORIES)
    expected = np.zeros((len(CATEGORIES), 4))
    for _ in range(40):
        image = random_image(rng)
        total.update(*image)
        expected += reference_stats(*image)
    assert total.stats == pytest.approx(expected)
    assert (
        expected[:, 1].sum() > 20 and expected[:, 2].sum() > 5 and expected[:, 3].sum() > 5
    )  # all exercised


def test_all_reduce_on_a_one_rank_gloo_group():
    # Two spawned ranks cost ~20 s of torch imports on the CI machine; the sum itself is the
    # tensor sum checked in test_merge_equals_one_accumulator_over_both_images.
    import torch.distributed as dist

    acc = PanopticAccumulator(CATEGORIES)
    acc.update(row((1, 4)), segs((1, 1)), row((0, 4)), [])  # person missed: FN
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        acc.all_reduce()
    finally:
        dist.destroy_process_group()
    assert acc.stats[0].tolist() == [0.0, 0.0, 0.0, 1.0] and acc.stats.dtype == np.float64
