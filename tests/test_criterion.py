import ops.torchvision_fix  # noqa: F401  (before timm)

# isort: split
import math

import pytest
import torch
import torch.nn.functional as F

from model.build import build_criterion, build_model
from model.config import (
    BackboneConfig,
    LossConfig,
    ModelConfig,
    PFTDecoderConfig,
    PixelDecoderConfig,
    TransformerDecoderConfig,
)
from model.criterion import SetCriterion
from model.matcher import FixedMatcher, HungarianMatcher
from model.pft_decoder import pft_mask_logits
from ops.losses import binary_ce_loss, dice_loss, focal_ce_loss, sigmoid_focal_loss
from ops.mask_product import average_over_scales, matched_mask_logits
from ops.point_sampling import calculate_uncertainty, get_uncertain_point_coords_with_randomness, point_sample


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_focal_loss_hand_values():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.0]])
    targets = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    p2, pm1 = _sigmoid(2.0), _sigmoid(-1.0)
    row0 = (0.25 * 0.25 * math.log(2) + 0.25 * (1 - p2) ** 2 * -math.log(p2)) / 2
    row1 = (0.25 * (1 - pm1) ** 2 * -math.log(pm1) + 0.75 * 0.25 * math.log(2)) / 2
    # Pixel mean per mask, sum over masks, divided by num_masks.
    assert float(sigmoid_focal_loss(logits, targets, num_masks=4)) == pytest.approx((row0 + row1) / 4, rel=1e-5)
    # gamma=0, alpha<0: plain binary cross-entropy.
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    assert float(sigmoid_focal_loss(logits, targets, 2, alpha=-1, gamma=0)) == pytest.approx(float(bce), rel=1e-6)


def test_dice_loss_hand_values():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [30.0, 30.0, -30.0, -30.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    # row 0: p = 0.5 each -> 1 - (2*1 + 1) / (2 + 2 + 1) = 0.4; row 1: perfect -> 0
    assert float(dice_loss(logits, targets, num_masks=1)) == pytest.approx(0.4, abs=1e-6)
    assert float(dice_loss(logits, targets, num_masks=2)) == pytest.approx(0.2, abs=1e-6)
    # Accepts N×H×W masks (flattened inside) and bool targets.
    assert float(dice_loss(logits.view(2, 2, 2), targets.view(2, 2, 2).bool(), 1)) == pytest.approx(0.4, abs=1e-6)


def _criterion(num_classes: int = 3, **kwargs) -> SetCriterion:
    return SetCriterion(num_classes, HungarianMatcher(), **kwargs)


def test_classification_loss_uses_the_no_object_weight():
    # 1 image, 2 queries, K = 2. Query 0 predicts target 0 (class 1) well; query 1 is
    # unmatched and must predict "no object" (index 2) with weight 0.1.
    logits = torch.tensor([[[0.1, 2.0, -1.0], [0.3, -0.2, 0.5]]])
    masks = torch.tensor([[[[9.0, -9.0]], [[-9.0, -9.0]]]])  # 2 queries of 1×2 pixels
    target = {"labels": torch.tensor([1]), "masks": torch.tensor([[[True, False]]])}
    losses = _criterion(2, class_weight=2.0, no_object_weight=0.1)({"pred_logits": logits, "pred_masks": masks}, [target])
    logp = logits[0].log_softmax(-1)
    expected = (1.0 * -logp[0, 1] + 0.1 * -logp[1, 2]) / (1.0 + 0.1)
    torch.testing.assert_close(losses["loss_ce"], 2.0 * expected)


def _targets_12x12() -> list[dict]:
    """Two 12×12 images with 2 and 1 target masks (classes 0, 1 and 0)."""
    targets = []
    for n in (2, 1):
        masks = torch.zeros(n, 12, 12, dtype=torch.bool)
        masks[0, 2:9, 1:7] = True
        if n == 2:
            masks[1, 8:, 5:] = True
        targets.append({"labels": torch.arange(n), "masks": masks})
    return targets


def test_mask_losses_are_at_target_resolution_and_normalised():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 4)
    pred_masks = torch.randn(2, 4, 3, 3, requires_grad=True)  # stride 4 predictions of 12×12 images
    targets = _targets_12x12()
    criterion = _criterion(3, focal_weight=20.0, dice_weight=3.0)
    outputs = {"pred_logits": logits, "pred_masks": pred_masks}
    losses = criterion(outputs, targets)
    indices = criterion.matcher(outputs, targets)
    src = torch.cat([pred_masks[b, i] for b, (i, _) in enumerate(indices)])
    src = F.interpolate(src[:, None], size=(12, 12), mode="bilinear", align_corners=False)[:, 0]
    tgt = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)])
    expected_focal, expected_dice = 20.0 * sigmoid_focal_loss(src, tgt, 3), 3.0 * dice_loss(src, tgt, 3)
    torch.testing.assert_close(losses["loss_focal"], expected_focal)
    torch.testing.assert_close(losses["loss_dice"], expected_dice)
    # The fused loss recomputes the upsampling in backward: same gradients as autograd's.
    (grad,) = torch.autograd.grad(losses["loss_focal"] + 2 * losses["loss_dice"], pred_masks)
    (expected_grad,) = torch.autograd.grad(expected_focal + 2 * expected_dice, pred_masks)
    torch.testing.assert_close(grad, expected_grad)


def _tiny_model_cfg(**decoder) -> ModelConfig:
    return ModelConfig(
        num_classes=4,
        backbone=BackboneConfig(name="test_resnet"),
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32),
        decoder=TransformerDecoderConfig(
            **{"num_queries": 6, "hidden_dim": 32, "nheads": 2, "dim_feedforward": 64, "dec_layers": 3, **decoder}
        ),
    )


def _targets(batch: int, size: int = 64) -> list[dict]:
    targets = []
    for b in range(batch):
        sem = torch.zeros(size, size, dtype=torch.long)
        sem[4 + b : 30, 10:40] = 1 + b % 3
        labels = sem.unique()
        targets.append({"labels": labels, "masks": sem[None] == labels[:, None, None]})
    return targets


def test_bf16_autocast_gives_fp32_losses_with_gradients_and_deep_supervision_keys():
    torch.manual_seed(0)
    cfg = _tiny_model_cfg()
    model, criterion = build_model(cfg), build_criterion(cfg)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images)
        assert outputs["pred_masks"].dtype == torch.bfloat16  # autocast really is on
        losses = criterion(outputs, _targets(2))
    names = ["loss_ce", "loss_focal", "loss_dice"]
    assert set(losses) == {f"{n}{s}" for n in names for s in ("", "_0", "_1")}
    for name, value in losses.items():
        assert value.dtype == torch.float32 and value.dim() == 0 and value.requires_grad, name
        assert torch.isfinite(value), name
    sum(losses.values()).backward()
    for name in ("backbone.body.conv1.0.weight", "predictor.class_embed.weight", "predictor.query_embed.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def _tiny_pft_cfg() -> ModelConfig:
    return ModelConfig(
        name="pft",
        num_classes=4,
        backbone=BackboneConfig(name="test_resnet"),
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32),
        pft=PFTDecoderConfig(hidden_dim=32, nheads=2, dim_feedforward=64, dec_layers=2),
        loss=LossConfig(focal_ce_weight=1.0),
    )


def _full_masks(layer: dict, mask_features: list) -> torch.Tensor:
    """A training layer's pred_masks: the model's (MaskFormer), or formed from its factors
    (PFT, which forms none in training)."""
    return layer["pred_masks"] if "pred_masks" in layer else pft_mask_logits(layer["mask_embed"], mask_features)


@pytest.mark.parametrize("make_cfg", [_tiny_model_cfg, _tiny_pft_cfg], ids=["maskformer", "pft"])
def test_matched_masks_from_the_factors_give_the_losses_and_gradients_of_the_gather(make_cfg):
    """MaskFormer and PFT hand the criterion the factors of pred_masks in training (PFT's
    per scale, and no pred_masks): the mask losses take the matched rows of their products
    again, and the full product's gradient is never formed (its backward does not run)."""
    torch.manual_seed(0)
    cfg = make_cfg()
    model, criterion = build_model(cfg).double(), build_criterion(cfg)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    targets = _targets(2)
    results = []
    for factors in (True, False):
        torch.manual_seed(1)  # the same drop-path and dropout draws
        outputs = model(images)
        layers = (outputs, *outputs["aux_outputs"])
        assert ("mask_features" in outputs) and all("mask_embed" in o for o in outputs["aux_outputs"])
        assert ("pred_masks" in outputs) == (cfg.name == "maskformer")
        if not factors:  # the reference: losses gathered from the full products
            features = outputs.pop("mask_features")
            for layer in layers:
                layer["pred_masks"] = _full_masks(layer, features)
        full_product_grads = []
        for layer in layers:
            if "pred_masks" in layer:
                layer["pred_masks"].register_hook(full_product_grads.append)
        losses = criterion(outputs, targets)
        model.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        assert len(full_product_grads) == (0 if factors else len(layers))
        results.append((losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (losses, grads), (losses_ref, grads_ref) = results
    assert losses.keys() == losses_ref.keys() and grads.keys() == grads_ref.keys()
    for name in losses:
        torch.testing.assert_close(losses[name], losses_ref[name], rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-10, atol=1e-12, msg=name)
    model.eval()
    assert "mask_features" not in model(images) and "mask_embed" not in model(images)


@pytest.mark.parametrize("make_cfg", [_tiny_model_cfg, _tiny_pft_cfg], ids=["maskformer", "pft"])
def test_matched_masks_under_bf16_autocast_are_the_rows_the_model_returned(make_cfg):
    """Under autocast the model's mask products (and PFT's upsampling and average) ran in
    bf16; the criterion runs with autocast off and must take the matched rows in that dtype
    too, so its masks are the ones in pred_masks (to one bf16 rounding: the GEMM sums fewer rows)."""
    torch.manual_seed(0)
    cfg = make_cfg()
    model = build_model(cfg).train()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images)
        full = _full_masks(outputs, outputs["mask_features"])
    # The criterion takes pred_masks' dtype, or where there are none (PFT) the embeddings'.
    assert full.dtype == torch.bfloat16 and outputs["mask_embed"][0].dtype == torch.bfloat16
    indices = build_criterion(cfg).matcher(outputs, _targets(2))
    queries = [i for i, _ in indices]
    picked = matched_mask_logits(outputs["mask_embed"], outputs["mask_features"], queries, full.dtype)
    gathered = torch.cat([full[b, q] for b, q in enumerate(queries)])
    assert picked.dtype == torch.bfloat16 and picked.shape == gathered.shape and picked.shape[0] > 0
    torch.testing.assert_close(picked.float(), gathered.float(), rtol=2**-7, atol=1e-3)


def test_no_aux_losses_without_deep_supervision():
    cfg = _tiny_model_cfg(deep_supervision=False)
    outputs = build_model(cfg)(torch.zeros(1, 3, 64, 64))
    assert outputs["aux_outputs"] == []
    assert set(build_criterion(cfg)(outputs, _targets(1))) == {"loss_ce", "loss_focal", "loss_dice"}


def test_images_without_masks_still_backpropagate():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    masks = torch.randn(2, 3, 2, 2, requires_grad=True)
    empty = {"labels": torch.empty(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}
    losses = _criterion(3)({"pred_logits": logits, "pred_masks": masks}, [empty, empty])
    assert losses["loss_focal"].item() == 0 and losses["loss_dice"].item() == 0
    # every query must predict "no object": CE = mean of -log p(no object)
    torch.testing.assert_close(losses["loss_ce"], -logits.log_softmax(-1)[..., 3].mean())
    sum(losses.values()).backward()
    assert masks.grad is not None and logits.grad is not None
    # From the factors of the masks (MaskFormer in training), the same: zero mask losses
    # whose gradients still reach both factors.
    embed, features = torch.randn(2, 3, 5, requires_grad=True), torch.randn(2, 5, 2, 2, requires_grad=True)
    outputs = {"pred_logits": logits, "pred_masks": torch.einsum("bqc,bchw->bqhw", embed, features),
               "mask_embed": [embed], "mask_features": [features]}
    losses = _criterion(3)(outputs, [empty, empty])
    assert losses["loss_focal"].item() == 0 and losses["loss_dice"].item() == 0
    sum(losses.values()).backward()
    assert embed.grad is not None and features.grad is not None
    # PFT's per-scale factors, whose coarser products are upsampled: the same.
    embeds = [torch.randn(2, 3, c, requires_grad=True) for c in (5, 4)]
    features = [torch.randn(2, 5, 4, 4, requires_grad=True), torch.randn(2, 4, 2, 2, requires_grad=True)]
    products = [torch.einsum("bqc,bchw->bqhw", e, f) for e, f in zip(embeds, features)]
    outputs = {"pred_logits": logits, "pred_masks": average_over_scales(products, (4, 4)),
               "mask_embed": embeds, "mask_features": features}
    losses = _criterion(3)(outputs, [empty, empty])
    assert losses["loss_focal"].item() == 0 and losses["loss_dice"].item() == 0
    sum(losses.values()).backward()
    assert all(x.grad is not None for x in (*embeds, *features))


def test_num_masks_is_averaged_over_ranks(monkeypatch):
    # Simulate 2 ranks: this one holds 3 masks, the other 7 -> every rank divides by 5.
    import torch.distributed as dist

    def fake_all_reduce(tensor):
        tensor += 7

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    criterion = _criterion(3)
    targets = [{"labels": torch.tensor([0, 1, 2]), "masks": torch.zeros(3, 4, 4, dtype=torch.bool)}]
    assert criterion.num_masks(targets, torch.device("cpu")) == 5.0
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: None)
    monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    assert criterion.num_masks(targets, torch.device("cpu")) == 1.0  # 3 / 8 clamped to 1


def _focal_term(x: float, t: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = _sigmoid(x)
    if t:
        return alpha * (1 - p) ** gamma * -math.log(p)
    return (1 - alpha) * p**gamma * -math.log(1 - p)


def _bce_term(x: float, t: float) -> float:
    return -math.log(_sigmoid(x)) if t else -math.log(1 - _sigmoid(x))


def test_pft_class_losses_hand_values():
    # 2 images, K = 3 category queries, one logit each; target = "class i is in the image".
    logits = torch.tensor([[0.0, 2.0, -1.0], [0.5, -3.0, 1.5]])
    present = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    pairs = list(zip(logits.flatten().tolist(), present.flatten().tolist()))
    # Both summed over all B×K logits and divided by the number of masks (3 here).
    bce = sum(_bce_term(x, t) for x, t in pairs) / 3
    focal = sum(_focal_term(x, t) for x, t in pairs) / 3
    assert float(binary_ce_loss(logits, present, num_masks=3)) == pytest.approx(bce, rel=1e-5)
    assert float(focal_ce_loss(logits, present, num_masks=3)) == pytest.approx(focal, rel=1e-5)
    # gamma 0 and no alpha: the focal-CE is the BCE.
    assert float(focal_ce_loss(logits, present, 3, alpha=-1, gamma=0)) == pytest.approx(bce, rel=1e-6)
    with pytest.raises(ValueError, match="targets of shape"):
        binary_ce_loss(logits, present[:, :2], 1)


def test_sigmoid_class_loss_in_the_criterion():
    # PFT's fixed assignment: the class-1 and class-2 masks make queries 1 and 2 positive,
    # query 0 (class absent) negative; weights apply; no "no object" column anywhere.
    logits = torch.tensor([[0.3, 2.0, -1.0]], requires_grad=True)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2], masks[1, 2:] = True, True
    target = {"labels": torch.tensor([2, 1]), "masks": masks}
    outputs = {"pred_logits": logits, "pred_masks": torch.zeros(1, 3, 1, 1, requires_grad=True)}
    criterion = SetCriterion(3, FixedMatcher(), class_loss="sigmoid", class_weight=1.5, focal_ce_weight=2.0)
    losses = criterion(outputs, [target])
    terms = [(0.3, 0), (2.0, 1), (-1.0, 1)]
    expected_bce = sum(_bce_term(x, t) for x, t in terms) / 2  # two masks
    expected_focal = sum(_focal_term(x, t) for x, t in terms) / 2
    assert losses["loss_ce"].item() == pytest.approx(1.5 * expected_bce, rel=1e-5)
    assert losses["loss_focal_ce"].item() == pytest.approx(2.0 * expected_focal, rel=1e-5)
    sum(losses.values()).backward()
    assert logits.grad is not None and logits.grad[0, 0] > 0 > logits.grad[0, 2]  # absent down, present up
    # focal-CE is off at weight 0; the class flavour must fit the logits' shape.
    assert "loss_focal_ce" not in SetCriterion(3, FixedMatcher(), class_loss="sigmoid")(outputs, [target])
    with pytest.raises(ValueError, match=r"B×Q \(one logit per query\)"):
        criterion({"pred_logits": torch.zeros(1, 3, 4), "pred_masks": outputs["pred_masks"]}, [target])
    with pytest.raises(ValueError, match=r"B×Q×\(K\+1\)"):
        SetCriterion(3, FixedMatcher())(outputs, [target])


def test_class_loss_flavour_follows_the_model_and_focal_ce_is_pft_only():
    assert build_criterion(ModelConfig(name="pft")).class_loss == "sigmoid"
    assert build_criterion(ModelConfig(name="maskformer")).class_loss == "softmax"
    with pytest.raises(ValueError, match="model.loss.focal_ce_weight"):
        _criterion(3, focal_ce_weight=1.0)
    with pytest.raises(ValueError, match="class_loss"):
        SetCriterion(3, FixedMatcher(), class_loss="softmax_ce")


def test_point_sample_matches_grid_sample_on_a_hand_case():
    image = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    points = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.5, 0.25]]])  # (x, y)
    values = point_sample(image, points)
    torch.testing.assert_close(values, torch.tensor([[[0.0, 1.0, 1.5, 2.0, 0.5]]]))
    grid = (2 * points - 1)[:, :, None]
    torch.testing.assert_close(values, F.grid_sample(image, grid, align_corners=False)[..., 0])
    assert point_sample(image.bool(), points).dtype == torch.float32  # bool targets are sampled as floats


def test_uncertain_points_are_the_most_uncertain_candidates():
    torch.manual_seed(1)
    logits = torch.randn(2, 1, 8, 8) * 5
    torch.manual_seed(0)
    chosen = get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 10, 3.0, 1.0)
    torch.manual_seed(0)
    candidates = torch.rand(2, 30, 2)  # the same draws the function made
    uncertainty = calculate_uncertainty(point_sample(logits, candidates))[:, 0]
    assert chosen.shape == (2, 10, 2)
    for b in range(2):
        top = candidates[b, uncertainty[b].topk(10).indices]
        assert sorted(map(tuple, chosen[b].tolist())) == sorted(map(tuple, top.tolist()))
        picked = calculate_uncertainty(point_sample(logits[b : b + 1], chosen[b : b + 1]))
        assert picked.min() >= uncertainty[b].sort(descending=True).values[10]
    # With a ratio < 1 the rest are uniform points: 4 uncertain + 6 random here.
    mixed = get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 10, 3.0, 0.4)
    assert mixed.shape == (2, 10, 2) and (mixed >= 0).all() and (mixed <= 1).all()
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 10, 3.0, 1.5)


def test_point_sampled_mask_losses():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 4)
    pred_masks = torch.randn(2, 4, 3, 3) * 3
    targets = _targets_12x12()
    criterion = _criterion(3, num_points=20, oversample_ratio=3.0, importance_sample_ratio=0.75)
    outputs = {"pred_logits": logits, "pred_masks": pred_masks}
    torch.manual_seed(5)
    losses = criterion(outputs, targets)

    indices = criterion.matcher(outputs, targets)  # Hungarian, draws no random numbers
    src = torch.cat([pred_masks[b, i] for b, (i, _) in enumerate(indices)])[:, None]
    tgt = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)]).float()[:, None]
    torch.manual_seed(5)
    points = get_uncertain_point_coords_with_randomness(src, calculate_uncertainty, 20, 3.0, 0.75)
    src_points, tgt_points = point_sample(src, points)[:, 0], point_sample(tgt, points)[:, 0]
    assert src_points.shape == (3, 20)
    torch.testing.assert_close(losses["loss_focal"], 20.0 * sigmoid_focal_loss(src_points, tgt_points, 3))
    torch.testing.assert_close(losses["loss_dice"], 1.0 * dice_loss(src_points, tgt_points, 3))
    with pytest.raises(ValueError, match="model.loss.num_points"):
        _criterion(3, num_points=-1)
