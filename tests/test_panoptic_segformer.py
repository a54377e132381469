"""Panoptic SegFormer (seed 004): shapes, attention-map fusion, query decoupling, boxes, overfit."""

import ops.torchvision_fix  # noqa: F401  (before timm)

# isort: split
import os

import pytest
import torch

from launcher.config import load_config
from model.build import build_criterion, build_model
from model.config import BackboneConfig, ModelConfig, PanopticSegFormerConfig
from model.panoptic_segformer import panoptic_segformer_panoptic, query_class_probs
from model.psf_criterion import PanopticSegFormerCriterion, decouple_targets
from model.psf_decoders import fuse_attention_maps
from ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou, masks_to_boxes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THINGS, STUFF = [1, 2], [0, 3]  # 4 classes: 2 things, 2 stuff


def tiny_cfg(**overrides) -> ModelConfig:
    psf = dict(thing_classes=THINGS, num_queries=6, hidden_dim=32, nheads=2, dim_feedforward=64, dropout=0.0,
               encoder_layers=1, location_layers=2, thing_mask_layers=2, stuff_mask_layers=3)  # fmt: skip
    psf.update(overrides)
    return ModelConfig(
        name="panoptic_segformer",
        num_classes=4,
        # Trained from scratch: frozen BN would pin a random network's identity statistics.
        backbone=BackboneConfig(name="test_resnet", out_indices=[2, 3, 4], freeze_bn=False),
        panoptic_segformer=PanopticSegFormerConfig(**psf),
    )


def test_shapes_train_and_eval():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    images = torch.rand(2, 3, 64, 96) * 255
    out = model(images)
    assert out["pred_thing_logits"].shape == (2, 6, 2)
    assert out["pred_stuff_logits"].shape == (2, 2)
    assert out["pred_masks"].shape == (2, 8, 8, 12)  # 6 thing + 2 stuff queries, stride 8
    # Deep supervision: every layer's masks (2 thing, 3 stuff layers; the final masks are
    # the extra attention map's), the stuff class heads but the last (the final's).
    assert [o["masks"].shape for o in out["thing_aux_outputs"]] == [(2, 6, 8, 12)] * 2
    assert [o["masks"].shape for o in out["stuff_aux_outputs"]] == [(2, 2, 8, 12)] * 3
    assert [o["logits"].shape for o in out["stuff_aux_outputs"][:2]] == [(2, 2, 1)] * 2
    assert "logits" not in out["stuff_aux_outputs"][2] and "logits" not in out["thing_aux_outputs"][1]
    assert len(out["loc_outputs"]) == 2  # a box and a class head on every location-decoder layer
    boxes = out["loc_outputs"][-1]["pred_boxes"]
    assert boxes.shape == (2, 6, 4) and bool(((boxes >= 0) & (boxes <= 1)).all())
    # The things' class scores are the location decoder's last class head (official get_bboxes).
    assert out["pred_thing_logits"] is out["loc_outputs"][-1]["pred_box_logits"]
    # Every parameter gets a gradient from one training loss (ZeRO dislikes idle weights).
    sum(build_criterion(tiny_cfg())(out, [_targets_at(64, 96)] * 2).values()).backward()
    idle = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not idle, idle
    model.eval()
    with torch.no_grad():
        evaluated = model(images)
    # Inference reads the last mask layers and the last location class head.
    assert set(evaluated) == {"pred_thing_logits", "pred_stuff_logits", "pred_masks"}
    results = panoptic_segformer_panoptic(evaluated, (64, 96), model.thing_classes, model.stuff_classes)
    assert len(results) == 2 and results[0][0].shape == (64, 96)


def _targets_at(height: int, width: int) -> dict:
    masks = torch.zeros(3, height, width, dtype=torch.bool)
    masks[0, : height // 2] = True  # stuff class 0
    masks[1, height // 2 :, : width // 2] = True  # thing class 1
    masks[2, height // 2 :, width // 2 :] = True  # thing class 2
    return {"labels": torch.tensor([0, 1, 2]), "masks": masks}


def test_extra_level_feeds_the_encoder_and_location_decoder_not_the_mask_decoders():
    torch.manual_seed(0)
    images = torch.rand(1, 3, 64, 96) * 255
    seen = {}
    for extra in (True, False):
        model = build_model(tiny_cfg(extra_level=extra)).eval()
        with torch.no_grad():
            shapes = model.pixel_decoder(model.backbone(model.normalize(images)))[2]
            out = model(images)
        seen[extra] = shapes
        assert out["pred_masks"].shape == (1, 8, 8, 12)  # masks stay at stride 8 either way
        assert model.predictor.location_decoder.layers[0].cross_attn.n_levels == len(shapes)
    # Coarse to fine: the stride-64 level (a 3x3 stride-2 conv of the stride-32 map) first.
    assert seen[False] == [(2, 3), (4, 6), (8, 12)] and seen[True] == [(1, 2), (2, 3), (4, 6), (8, 12)]


def test_presets_have_the_papers_parameter_counts():
    """Panoptic SegFormer's COCO table: R50 51M, Swin-L 221M parameters (the official head:
    4-level encoder, box refinement, 4 thing + 6 stuff mask-decoder layers; 50.7M and
    220.7M here without its two unused head kinds); within 2%."""
    for name, paper in (
        ("panoptic_segformer_r50_coco.yaml", 51e6),
        ("panoptic_segformer_swin_l_coco.yaml", 221e6),
    ):
        cfg = load_config(os.path.join(REPO, "configs", name))
        with torch.device("meta"):
            model = build_model(cfg.model)
        total = sum(p.numel() for p in model.parameters())
        assert abs(total - paper) <= 0.02 * paper, (
            f"{name}: {total / 1e6:.2f}M vs the paper's {paper / 1e6:.0f}M"
        )
        # The seed's single-decoder, three-level variant is clearly smaller: the counts above
        # measure the official head, not the backbone alone.
        cfg.model.panoptic_segformer.extra_level = False
        cfg.model.panoptic_segformer.stuff_mask_layers = 1
        with torch.device("meta"):
            smaller = sum(p.numel() for p in build_model(cfg.model).parameters())
        assert total - smaller > 8e6


def test_backbone_must_start_at_stride_8():
    cfg = tiny_cfg()
    cfg.backbone.out_indices = [1, 2, 3, 4]  # stride 4 first
    with pytest.raises(ValueError, match="strides 8/16/32"):
        build_model(cfg)


def test_fuse_attention_maps_splits_reshapes_upsamples_and_concatenates():
    shapes = [(1, 2), (2, 4)]  # coarse to fine, 2 + 8 tokens
    batch, heads, queries = 1, 2, 3
    logits = torch.zeros(batch, heads, queries, 10)
    fine = torch.arange(8, dtype=torch.float32).view(2, 4)
    logits[0, 1, 2, 2:] = fine.flatten()  # head 1, query 2, fine level: row-major H×W
    logits[0, 0, 1, :2] = torch.tensor([5.0, 5.0])  # head 0, query 1, coarse level: constant
    fused = fuse_attention_maps(logits, shapes)
    assert fused.shape == (batch, queries, 2 * heads, 2, 4)  # levels·heads channels at the finest size
    # Channel order: level-major (coarse heads first), then heads.
    assert torch.equal(fused[0, 2, 3], fine)  # fine level, head 1: reshaped, not upsampled
    assert torch.allclose(fused[0, 1, 0], torch.full((2, 4), 5.0))  # coarse level upsampled
    assert fused[0, 2, :3].abs().sum() == 0 and fused[0, 1, 1:].abs().sum() == 0
    with pytest.raises(ValueError, match="tokens"):
        fuse_attention_maps(logits[..., :9], shapes)


def test_masks_to_boxes_on_hand_built_masks():
    masks = torch.zeros(3, 4, 8, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True  # x 2..5, y 1..2
    masks[1, 0, 7] = True  # one pixel in the top-right corner
    boxes = masks_to_boxes(masks)
    expected_xyxy = torch.tensor(
        [[2 / 8, 1 / 4, 6 / 8, 3 / 4], [7 / 8, 0.0, 1.0, 1 / 4], [0.0, 0.0, 0.0, 0.0]]
    )
    assert torch.allclose(box_cxcywh_to_xyxy(boxes), expected_xyxy)
    assert torch.allclose(boxes[0], torch.tensor([0.5, 0.5, 0.5, 0.5]))


def test_generalized_box_iou_on_hand_built_boxes():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0], [0.5, 0.0, 1.5, 1.0]])
    giou = generalized_box_iou(a[:, None], b[None])[0]
    # identical: 1; disjoint, hull 3 and union 2: 0 - 1/3; half overlap: IoU 1/3, hull = union.
    assert torch.allclose(giou, torch.tensor([1.0, -1 / 3, 1 / 3]))
    assert torch.allclose(generalized_box_iou(a.expand(3, -1), b), giou)  # element-wise form


def _targets():
    masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    # On the stride-8 grid, so a stride-8 prediction can fit them.
    masks[0, :8] = True  # stuff class 3
    masks[1, 8:16, 0:16] = True  # thing class 2
    masks[2, 16:24, 16:32] = True  # thing class 1
    masks[3, 24:] = True  # stuff class 3 again: merged into one stuff target
    return {"labels": torch.tensor([3, 2, 1, 3]), "masks": masks}


def test_decouple_targets_gives_stuff_query_k_stuff_class_k():
    target = _targets()
    dec = decouple_targets(target, THINGS, STUFF)
    assert dec.thing_labels.tolist() == [1, 0]  # classes 2, 1 -> thing indices 1, 0
    assert torch.equal(dec.thing_masks, target["masks"][1:3])
    assert dec.stuff_present.tolist() == [0.0, 1.0]  # stuff query 0 = class 0 (absent), 1 = class 3
    assert not dec.stuff_masks[0].any()
    assert torch.equal(dec.stuff_masks[1], target["masks"][0] | target["masks"][3])
    assert dec.thing_boxes.shape == (2, 4)


def _perfect_outputs(target, thing_order, stuff_swap=False):
    """Outputs whose thing query thing_order[j] predicts thing target j (mask, box, class)."""
    dec = decouple_targets(target, THINGS, STUFF)
    num_queries, size = 4, 32
    masks = torch.full((1, num_queries + 2, size // 8, size // 8), -20.0)
    thing_logits = torch.full((1, num_queries, 2), -10.0)
    boxes = torch.full((1, num_queries, 4), 0.5)
    for j, q in enumerate(thing_order):
        small = torch.nn.functional.interpolate(dec.thing_masks[j][None, None].float(), size=(4, 4))[0, 0]
        masks[0, q] = small * 40 - 20
        thing_logits[0, q, dec.thing_labels[j]] = 10.0
        boxes[0, q] = dec.thing_boxes[j]
    stuff = (
        torch.nn.functional.interpolate(dec.stuff_masks[1][None, None].float(), size=(4, 4))[0, 0] * 40 - 20
    )
    masks[0, num_queries + (0 if stuff_swap else 1)] = stuff
    stuff_logits = torch.tensor([[-10.0, 10.0]])
    loc = [{"pred_boxes": boxes, "pred_box_logits": thing_logits.clone()}]
    return {"pred_thing_logits": thing_logits, "pred_stuff_logits": stuff_logits, "pred_masks": masks,
            "loc_outputs": loc}  # fmt: skip


def test_hungarian_matching_of_things_and_fixed_stuff_assignment():
    target = _targets()
    criterion = PanopticSegFormerCriterion(4, tiny_cfg().panoptic_segformer)
    dec = decouple_targets(target, THINGS, STUFF)
    outputs = _perfect_outputs(target, thing_order=[3, 1])
    rows, cols = criterion.match(outputs["pred_thing_logits"], outputs["loc_outputs"][-1]["pred_boxes"],
                                 outputs["pred_masks"][:, :4], [dec])[0]  # fmt: skip
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 3, 1: 1}
    losses = criterion(outputs, [target])
    assert losses["loss_box_l1"] < 1e-5 and losses["loss_giou"] < 1e-5
    # Bilinear upsampling of the stride-8 logits softens the edges: small, not 0.
    assert losses["loss_thing_dice"] < 0.3 and losses["loss_stuff_dice"] < 0.3
    # The stuff class-3 mask on stuff query 0 (class 0) is wrong whatever matching could do.
    swapped = criterion(_perfect_outputs(target, thing_order=[3, 1], stuff_swap=True), [target])
    # 2 x dice ~ 2, times the stuff share of the masks (1 stuff of 3: the official balance).
    assert swapped["loss_stuff_dice"] > 0.6
    # The official balance: thing terms x n_thing / (n_thing + n_stuff), stuff terms x
    # n_stuff / (...): here 2 things and 1 stuff class present.
    dec = [decouple_targets(target, THINGS, STUFF)]
    outputs = _perfect_outputs(target, thing_order=[3, 1])
    indices = criterion.match(outputs["pred_thing_logits"], outputs["loc_outputs"][0]["pred_boxes"],
                              outputs["pred_masks"][:, :4], dec)  # fmt: skip
    stuff = {"logits": outputs["pred_stuff_logits"][..., None], "masks": outputs["pred_masks"][:, 4:]}
    raw_stuff = criterion._stuff_layer(stuff, dec, (32, 32), 1.0, "")["loss_stuff_dice"]
    raw_thing = criterion._thing_layer(
        {"masks": outputs["pred_masks"][:, :4]}, dec, indices, (32, 32), 2.0, ""
    )
    assert losses["loss_stuff_dice"] == pytest.approx(float(raw_stuff) / 3, rel=1e-5)
    assert losses["loss_thing_dice"] == pytest.approx(float(raw_thing["loss_thing_dice"]) * 2 / 3, rel=1e-5)


def test_earlier_location_layers_are_matched_on_their_own_and_mask_layers_regress_boxes():
    target = _targets()
    criterion = PanopticSegFormerCriterion(4, tiny_cfg().panoptic_segformer)
    final = _perfect_outputs(target, thing_order=[3, 1])
    earlier = _perfect_outputs(target, thing_order=[0, 2])["loc_outputs"][0]  # other queries
    outputs = {**final, "loc_outputs": [earlier, final["loc_outputs"][0]]}
    losses = criterion(outputs, [target])
    # The official loss_single: an earlier layer gets its own Hungarian matching, so its
    # perfect boxes on queries 0 and 2 cost nothing although the final matching is 3 and 1.
    assert losses["loss_box_l1_loc0"] < 1e-5 and losses["loss_giou_loc0"] < 1e-5
    # ... and the final matching applied to the earlier layer would have been wrong.
    dec = [decouple_targets(target, THINGS, STUFF)]
    shared = criterion.match(
        final["pred_thing_logits"], final["loc_outputs"][0]["pred_boxes"], final["pred_masks"][:, :4], dec
    )
    assert shared[0][0].tolist() == [1, 3]
    assert criterion._location_layer(earlier, dec, shared, 2.0, "")["loss_box_l1"] > 0.1


def test_query_class_probs_places_stuff_query_k_in_its_class_column():
    outputs = {"pred_thing_logits": torch.zeros(1, 3, 2), "pred_stuff_logits": torch.tensor([[10.0, -10.0]])}
    probs = query_class_probs(outputs, THINGS, STUFF)
    assert probs.shape == (1, 5, 4)
    assert (
        torch.allclose(probs[0, :3][:, THINGS], torch.full((3, 2), 0.5)) and probs[0, :3][:, STUFF].sum() == 0
    )
    assert probs[0, 3, 0] > 0.99 and probs[0, 3, 1:].sum() == 0  # stuff query 0 = class 0
    assert probs[0, 4, 3] < 0.01 and probs[0, 4, :3].sum() == 0  # stuff query 1 = class 3


def test_things_enter_the_merge_as_the_official_top_k_query_class_pairs():
    from model.config import PanopticInferenceConfig
    from model.panoptic_segformer import thing_detections

    # A 16x8 image (2x1 stride-8 cells), 3 thing queries of classes (1, 2): query 0 on the
    # top cell, scoring high for both classes; query 1 on the bottom cell, class 2 only;
    # query 2 scores nothing. Stuff queries score nothing.
    thing = torch.tensor([[[4.0, 3.0], [-9.0, 2.0], [-9.0, -9.0]]])
    masks = torch.full((1, 5, 2, 1), -9.0)
    masks[0, 0, 0], masks[0, 1, 1] = 9.0, 9.0
    outputs = {"pred_thing_logits": thing, "pred_stuff_logits": torch.full((1, 2), -9.0), "pred_masks": masks}

    def categories(limit):
        cfg = PanopticInferenceConfig(max_thing_detections=limit)
        return sorted(s["category_id"] for s in panoptic_segformer_panoptic(outputs, (16, 8), THINGS, STUFF, cfg)[0][1])

    # The top 2 (query, class) pairs are query 0 twice (as class 1, then as class 2, which
    # finds its pixels painted): query 1 is left out; a third pair brings it in.
    assert categories(2) == [1] and categories(3) == [1, 2]
    assert categories(0) == [1, 2]  # 0: every query with its best class
    probs = query_class_probs(outputs, THINGS, STUFF)[0, :3]
    rows, picked = thing_detections(probs, torch.arange(3.0).view(3, 1, 1), THINGS, 2)
    assert picked.flatten().tolist() == [0.0, 0.0]  # query 0's mask, twice
    assert rows[0, 1] == probs[0, 1] and rows[1, 2] == probs[0, 2] and rows.count_nonzero() == 2


def test_tiny_model_overfits_one_batch():
    """A fixed number of seeded steps, no clock: the summed loss falls by a clear factor."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model, criterion = build_model(cfg), build_criterion(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    target = _targets()
    palette = torch.tensor([[40, 40, 40], [220, 30, 30], [30, 200, 40], [40, 60, 230]], dtype=torch.float32)
    label_map = torch.zeros(32, 32, dtype=torch.long)
    for label, mask in zip(target["labels"], target["masks"]):
        label_map[mask] = label
    images = palette[label_map].permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    targets = [target, target]
    model.train()
    history = []
    for _ in range(60):
        losses = criterion(model(images), targets)
        total = sum(losses.values())
        history.append(total.item())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert history[-1] < history[0] / 3, f"loss {history[0]:.3f} -> {history[-1]:.3f}"
