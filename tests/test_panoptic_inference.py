"""Panoptic inference rules: MaskFormer/Mask2Former's panoptic_inference and Panoptic
SegFormer's mask-wise merging, on hand-built predictions with hand-derived answers."""

import math

import pytest
import torch

from launcher.typed_config import ConfigError, from_dict
from model.config import ModelConfig, PanopticInferenceConfig
from model.panoptic_inference import (
    mask_wise_merge,
    mask_wise_merge_from_config,
    mask_wise_scores,
    maskformer_panoptic,
    panoptic_from_outputs,
)

# Classes 0 and 1 are things, class 2 is stuff.
IS_THING = [True, True, False]
ON, OFF = 20.0, -20.0  # mask logits: sigmoid ~ 1 and ~ 0


def class_logits(rows):
    """Rows of K+1 probabilities -> logits whose softmax gives them back."""
    return torch.tensor(rows, dtype=torch.float32).log()


def region_logits(regions, height=4, width=4):
    """One mask per query: logits ON inside ``(row slice, col slice)``, OFF elsewhere."""
    masks = torch.full((len(regions), height, width), OFF)
    for q, (rows, cols) in enumerate(regions):
        masks[q, rows, cols] = ON
    return masks


def check_consistent(id_map, segments):
    """id_map int32; every nonzero id listed once with its pixel count as area."""
    assert id_map.dtype == torch.int32
    ids = [s["id"] for s in segments]
    assert ids == list(range(1, len(segments) + 1))
    present = sorted(int(v) for v in id_map.unique() if v != 0)
    assert present == ids
    for s in segments:
        assert s["area"] == int((id_map == s["id"]).sum()) > 0
        assert isinstance(s["isthing"], bool) and s["isthing"] == IS_THING[s["category_id"]]


def summary(segments):
    return [(s["category_id"], s["isthing"], s["area"]) for s in segments]


# ---------------------------------------------------------------- MaskFormer / Mask2Former


def test_object_mask_threshold_drops_low_score_and_no_object_queries():
    logits = class_logits(
        [
            [0.90, 0.05, 0.03, 0.02],  # class 0 at 0.9: kept
            [0.10, 0.70, 0.10, 0.10],  # class 1 at 0.7: below 0.8
            [0.02, 0.02, 0.01, 0.95],  # "no object" at 0.95: never kept
        ]
    )
    masks = region_logits(
        [(slice(None), slice(0, 2)), (slice(None), slice(2, 4)), (slice(None), slice(None))]
    )
    id_map, segments = maskformer_panoptic(logits, masks, IS_THING)
    check_consistent(id_map, segments)
    assert summary(segments) == [(0, True, 8)]
    assert segments[0]["score"] == pytest.approx(0.9)
    assert (id_map[:, :2] == 1).all() and (id_map[:, 2:] == 0).all()

    id_map, segments = maskformer_panoptic(logits, masks, IS_THING, object_mask_threshold=0.6)
    check_consistent(id_map, segments)
    assert summary(segments) == [(0, True, 8), (1, True, 8)]
    assert (id_map[:, 2:] == 2).all()


def test_object_mask_threshold_is_strict():
    logits = class_logits([[0.90, 0.05, 0.03, 0.02]])
    masks = region_logits([(slice(None), slice(None))])
    score = logits.softmax(-1).max()
    assert maskformer_panoptic(logits, masks, IS_THING, object_mask_threshold=float(score))[1] == []
    below = float(torch.nextafter(score, torch.tensor(0.0)))  # the next float32 down
    assert summary(maskformer_panoptic(logits, masks, IS_THING, object_mask_threshold=below)[1]) == [
        (0, True, 16)
    ]


def test_overlap_threshold_drops_a_mostly_hidden_query():
    # q0 (0.9) covers columns 0-1, q1 (0.95) columns 1-3: q1 wins column 1, so q0 owns
    # 4 of its 8 pixels: 0.5 < 0.8 -> dropped, its column 0 left void.
    logits = class_logits([[0.90, 0.04, 0.03, 0.03], [0.02, 0.95, 0.02, 0.01]])
    masks = region_logits([(slice(None), slice(0, 2)), (slice(None), slice(1, 4))])
    id_map, segments = maskformer_panoptic(logits, masks, IS_THING)
    check_consistent(id_map, segments)
    assert summary(segments) == [(1, True, 12)]
    assert (id_map[:, 0] == 0).all() and (id_map[:, 1:] == 1).all()
    # 4 / 8 = 0.5 >= 0.5: kept (the rule keeps ratios equal to the threshold).
    id_map, segments = maskformer_panoptic(logits, masks, IS_THING, overlap_threshold=0.5)
    check_consistent(id_map, segments)
    assert summary(segments) == [(0, True, 4), (1, True, 12)]
    assert (id_map[:, 0] == 1).all() and (id_map[:, 1:] == 2).all()
    assert maskformer_panoptic(logits, masks, IS_THING, overlap_threshold=0.51)[1][0]["category_id"] == 1


def test_segment_needs_its_own_mask_above_half():
    # q1 (0.95) is on nowhere, yet owns the pixels where every mask is off (it has the
    # largest score x tiny mask): original area 0 -> no segment; those pixels stay void.
    logits = class_logits([[0.90, 0.04, 0.03, 0.03], [0.02, 0.95, 0.02, 0.01]])
    masks = region_logits([(slice(0, 2), slice(None)), (slice(0, 0), slice(None))])
    id_map, segments = maskformer_panoptic(logits, masks, IS_THING)
    check_consistent(id_map, segments)
    assert summary(segments) == [(0, True, 8)]
    assert (id_map[2:] == 0).all()


def test_stuff_queries_merge_and_thing_queries_stay_apart():
    logits = class_logits(
        [
            [0.03, 0.02, 0.90, 0.05],  # stuff class 2, columns 0-1
            [0.90, 0.03, 0.02, 0.05],  # thing class 0, column 2
            [0.02, 0.03, 0.85, 0.10],  # stuff class 2 again, column 3 rows 0-1
            [0.88, 0.02, 0.05, 0.05],  # thing class 0 again, column 3 rows 2-3
        ]
    )
    masks = region_logits(
        [
            (slice(None), slice(0, 2)),
            (slice(None), slice(2, 3)),
            (slice(0, 2), slice(3, 4)),
            (slice(2, 4), slice(3, 4)),
        ]
    )
    id_map, segments = maskformer_panoptic(logits, masks, IS_THING)
    check_consistent(id_map, segments)
    assert summary(segments) == [(2, False, 10), (0, True, 4), (0, True, 2)]
    assert segments[0]["score"] == pytest.approx(0.90)  # the first query's score
    expected = torch.tensor([[1, 1, 2, 1], [1, 1, 2, 1], [1, 1, 2, 3], [1, 1, 2, 3]], dtype=torch.int32)
    assert torch.equal(id_map, expected)


def test_no_kept_query_gives_an_all_void_map():
    logits = class_logits([[0.02, 0.02, 0.01, 0.95]])
    id_map, segments = maskformer_panoptic(logits, region_logits([(slice(None), slice(None))]), IS_THING)
    assert segments == [] and id_map.shape == (4, 4) and not id_map.any()


def test_maskformer_rule_rejects_bad_inputs():
    with pytest.raises(ValueError, match="is_thing"):
        maskformer_panoptic(class_logits([[0.9, 0.1]]), region_logits([(slice(None), slice(None))]), IS_THING)
    with pytest.raises(ValueError, match="Q×H×W"):
        maskformer_panoptic(class_logits([[0.9, 0.05, 0.03, 0.02]]), torch.zeros(2, 4, 4), IS_THING)


def test_half_precision_inputs_are_computed_in_fp32():
    logits = class_logits([[0.90, 0.05, 0.03, 0.02]])
    masks = region_logits([(slice(None), slice(0, 2))])
    full = maskformer_panoptic(logits, masks, IS_THING)
    half = maskformer_panoptic(logits.bfloat16(), masks.bfloat16(), IS_THING)
    assert torch.equal(full[0], half[0]) and summary(full[1]) == summary(half[1])


def test_panoptic_from_outputs_aligns_stride4_masks_per_image():
    # 5x6 images, stride-4 masks 2x2: q0 on the left cell column, q1 on the right. Upsampled
    # x4 to 8x8 the logits cross 0 between columns 3 and 4, then cropped to 5x6: q0 gets
    # columns 0-3, q1 columns 4-5 (a plain 2 -> 6 resize would split them 3 / 3).
    logits = class_logits([[0.90, 0.04, 0.03, 0.03], [0.03, 0.02, 0.90, 0.05]])
    cells = torch.tensor([[[10.0, -10.0], [10.0, -10.0]], [[-10.0, 10.0], [-10.0, 10.0]]])
    outputs = {"pred_logits": logits.expand(2, -1, -1), "pred_masks": cells.expand(2, -1, -1, -1)}
    results = panoptic_from_outputs(outputs, (5, 6), IS_THING)
    assert len(results) == 2
    for id_map, segments in results:
        check_consistent(id_map, segments)
        assert id_map.shape == (5, 6)
        assert summary(segments) == [(0, True, 20), (2, False, 10)]
        assert (id_map[:, :4] == 1).all() and (id_map[:, 4:] == 2).all()
    strict = PanopticInferenceConfig(object_mask_threshold=0.95)
    assert [s for _, s in panoptic_from_outputs(outputs, (5, 6), IS_THING, strict)] == [[], []]
    with pytest.raises(ValueError, match="MaskFormer outputs"):
        panoptic_from_outputs({"pred_logits": torch.zeros(1, 3), "pred_masks": cells[None]}, (8, 8), IS_THING)


# ---------------------------------------------------------------- mask-wise merging


def row_masks(spans, width=20, value=1.0):
    """Masks on a 1×width image: probability ``value`` on pixels [start, stop), 0 elsewhere."""
    masks = torch.zeros(len(spans), 1, width)
    for q, (start, stop) in enumerate(spans):
        masks[q, 0, start:stop] = value
    return masks


def probs_for(categories, values):
    """Sigmoid class probabilities: ``values[q]`` for ``categories[q]``, 0.01 elsewhere."""
    probs = torch.full((len(categories), 3), 0.01)
    for q, (c, v) in enumerate(zip(categories, values)):
        probs[q, c] = v
    return probs


def test_mask_wise_score_by_hand():
    # 6 pixels > 0.5 (four at 0.9, two at 0.7, sum 5.0); the rest 0.2 (outside the mask).
    probs = torch.tensor([[0.8, 0.1, 0.05]])
    masks = torch.full((1, 4, 4), 0.2)
    masks[0, 0, :4] = 0.9
    masks[0, 1, :2] = 0.7
    score, label, binary = mask_wise_scores(probs, masks)
    assert label.tolist() == [0] and int(binary.sum()) == 6
    assert score.item() == pytest.approx(0.8 * (5.0 / 7.0) ** 2)  # official: / (area + 1)
    plain = mask_wise_scores(probs, masks, mask_area_offset=0.0)[0]
    assert plain.item() == pytest.approx(0.8 * (5.0 / 6.0) ** 2)
    swapped = mask_wise_scores(probs, masks, alpha=2.0, beta=1.0, mask_area_offset=0.0)[0]
    assert swapped.item() == pytest.approx(0.64 * 5.0 / 6.0)
    id_map, segments = mask_wise_merge(probs, masks, IS_THING)
    check_consistent(id_map, segments)
    assert summary(segments) == [(0, True, 6)] and segments[0]["score"] == pytest.approx(20.0 / 49.0)
    # An empty mask scores 0, whatever the offset.
    assert mask_wise_scores(probs, torch.zeros(1, 4, 4), mask_area_offset=0.0)[0].item() == 0.0


def test_mask_threshold_is_strict():
    masks = torch.full((1, 1, 4), 0.5)
    masks[0, 0, 0] = 0.6
    assert int(mask_wise_scores(probs_for([0], [0.9]), masks)[2].sum()) == 1
    assert int(mask_wise_scores(probs_for([0], [0.9]), masks, mask_threshold=0.4)[2].sum()) == 4


def test_masks_are_painted_in_descending_score_order():
    # Three disjoint thing masks given in ascending score: ids follow the scores.
    probs = probs_for([0, 1, 0], [0.5, 0.7, 0.9])
    masks = row_masks([(0, 4), (4, 10), (10, 20)])
    id_map, segments = mask_wise_merge(probs, masks, IS_THING, mask_area_offset=0.0)
    check_consistent(id_map, segments)
    assert [s["score"] for s in segments] == pytest.approx([0.9, 0.7, 0.5])
    assert summary(segments) == [(0, True, 10), (1, True, 6), (0, True, 4)]
    assert id_map[0, 0] == 3 and id_map[0, 4] == 2 and id_map[0, 10] == 1


def test_confidence_threshold_boundary_and_stuff_threshold():
    probs = probs_for([0, 2], [0.9, 0.6])
    masks = row_masks([(0, 10), (10, 20)])
    scores = mask_wise_scores(probs, masks)[0].tolist()
    kept = mask_wise_merge(probs, masks, IS_THING, confidence_threshold=scores[0])[1]
    assert summary(kept) == [(0, True, 10)]  # a score equal to the threshold is kept
    above = math.nextafter(scores[0], 1.0)
    assert mask_wise_merge(probs, masks, IS_THING, confidence_threshold=above)[1] == []
    # Stuff gets its own threshold when set: here lower than the things'.
    both = mask_wise_merge(
        probs, masks, IS_THING, confidence_threshold=above, stuff_confidence_threshold=0.1
    )[1]
    assert summary(both) == [(2, False, 10)]
    # Defaults: 0.25 for both; 0.6 * (10/11)^2 = 0.496 passes, a 0.2-probability mask does not.
    weak = mask_wise_merge(probs_for([0, 2], [0.9, 0.2]), masks, IS_THING)[1]
    assert summary(weak) == [(0, True, 10)]


@pytest.mark.parametrize(
    ("start", "category", "kept"),
    [
        (6, 1, True),  # thing, 4 of 10 pixels already painted: 0.4 is not > 0.4
        (5, 1, False),  # thing, 5 of 10: 0.5 > 0.4
        (8, 2, True),  # stuff, 2 of 10: 0.2 is not > 0.2
        (7, 2, False),  # stuff, 3 of 10: 0.3 > 0.2
        (7, 1, True),  # ... which a thing would survive
    ],
)
def test_overlap_limits_for_things_and_stuff(start, category, kept):
    # A (thing, score 0.9) paints pixels 0-9 first; B (score 0.5) covers [start, start+10).
    probs = probs_for([0, category], [0.9, 0.5])
    masks = row_masks([(0, 10), (start, start + 10)])
    id_map, segments = mask_wise_merge(probs, masks, IS_THING, mask_area_offset=0.0)
    check_consistent(id_map, segments)
    if kept:
        assert summary(segments) == [(0, True, 10), (category, IS_THING[category], start)]
        assert (id_map[0, :10] == 1).all() and (id_map[0, 10 : start + 10] == 2).all()
    else:
        assert summary(segments) == [(0, True, 10)] and not id_map[0, 10:].any()


def test_overlap_limits_are_configurable():
    probs = probs_for([0, 1], [0.9, 0.5])
    masks = row_masks([(0, 10), (5, 15)])
    assert len(mask_wise_merge(probs, masks, IS_THING, thing_overlap=0.5, mask_area_offset=0.0)[1]) == 2
    # A limit of 1 keeps a fully covered mask, which then paints nothing: no segment.
    covered = row_masks([(0, 10), (2, 8)])
    assert len(mask_wise_merge(probs, covered, IS_THING, thing_overlap=1.0, mask_area_offset=0.0)[1]) == 1


def test_exponents_change_the_order():
    # Same pixels: q0 confident class (0.9) with a weak mask (0.6), q1 the reverse (0.6, 1.0).
    # Only the winner is painted (the loser is fully covered).
    probs = probs_for([0, 1], [0.9, 0.6])
    masks = torch.cat([row_masks([(0, 10)], value=0.6), row_masks([(0, 10)], value=1.0)])

    def winner(alpha, beta):
        segments = mask_wise_merge(
            probs, masks, IS_THING, alpha=alpha, beta=beta, confidence_threshold=0.0, mask_area_offset=0.0
        )[1]
        assert len(segments) == 1
        return segments[0]["category_id"], segments[0]["score"]

    assert winner(1.0, 1.0) == (1, pytest.approx(0.6))  # 0.54 vs 0.6
    assert winner(1.0, 0.0) == (0, pytest.approx(0.9))  # 0.9 vs 0.6
    assert winner(3.0, 1.0) == (0, pytest.approx(0.4374))  # 0.729·0.6 vs 0.216
    assert winner(1.0, 2.0) == (1, pytest.approx(0.6))  # 0.324 vs 0.6


def test_mask_wise_stuff_merges_and_things_stay_apart():
    probs = probs_for([2, 0, 2, 0], [0.9, 0.8, 0.7, 0.6])
    masks = row_masks([(0, 5), (5, 10), (10, 15), (15, 20)])
    id_map, segments = mask_wise_merge(probs, masks, IS_THING, mask_area_offset=0.0)
    check_consistent(id_map, segments)
    assert summary(segments) == [(2, False, 10), (0, True, 5), (0, True, 5)]
    assert id_map[0].tolist() == [1] * 5 + [2] * 5 + [1] * 5 + [3] * 5


def test_mask_wise_from_config_and_config_section():
    cfg = ModelConfig().panoptic
    assert (cfg.object_mask_threshold, cfg.overlap_threshold) == (0.8, 0.8)
    assert (cfg.class_exponent, cfg.mask_exponent, cfg.confidence_threshold) == (1.0, 2.0, 0.25)
    assert (cfg.thing_overlap, cfg.stuff_overlap, cfg.mask_threshold, cfg.mask_area_offset) == (
        0.4,
        0.2,
        0.5,
        1.0,
    )
    parsed = from_dict(ModelConfig, {"panoptic": {"thing_overlap": 0.5, "stuff_confidence_threshold": None}})
    assert parsed.panoptic.thing_overlap == 0.5 and parsed.panoptic.stuff_confidence_threshold is None
    with pytest.raises(ConfigError, match="model.panoptic.thing_overlapp"):
        from_dict(ModelConfig, {"panoptic": {"thing_overlapp": 0.5}}, "model")
    probs = probs_for([0, 1], [0.9, 0.5])
    masks = row_masks([(0, 10), (5, 15)])
    loose = PanopticInferenceConfig(thing_overlap=0.5, mask_area_offset=0.0)
    assert len(mask_wise_merge_from_config(probs, masks, IS_THING, loose)[1]) == 2
    assert len(mask_wise_merge_from_config(probs, masks, IS_THING, cfg)[1]) == 1


def test_mask_wise_rejects_bad_inputs():
    with pytest.raises(ValueError, match="is_thing"):
        mask_wise_merge(torch.ones(1, 2), torch.ones(1, 2, 2), IS_THING)
    with pytest.raises(ValueError, match=">= 0"):
        mask_wise_merge(torch.ones(1, 3), torch.ones(1, 2, 2), IS_THING, beta=-1.0)
