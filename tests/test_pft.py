import ops.torchvision_fix  # noqa: F401  (before timm)

# isort: split
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from model.build import build_criterion, build_model
from model.config import BackboneConfig, LossConfig, ModelConfig, PFTDecoderConfig, PixelDecoderConfig
from model.matcher import FixedMatcher
from model.pft import PFT
from model.pft_decoder import PFTPredictor, pft_mask_logits


def tiny_cfg(num_classes: int = 5, **pft) -> ModelConfig:
    return ModelConfig(
        name="pft",
        num_classes=num_classes,
        backbone=BackboneConfig(name="test_resnet"),
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32),
        pft=PFTDecoderConfig(**{"hidden_dim": 32, "nheads": 2, "dim_feedforward": 64, "dec_layers": 2, **pft}),
        loss=LossConfig(focal_ce_weight=1.0),
    )


def test_output_shapes_aux_outputs_and_losses():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg)
    assert isinstance(model, PFT)
    outputs = model(torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8))
    assert outputs["pred_logits"].shape == (2, 5)  # one logit per category query
    # In training the masks come as their factors: one embedding and one map per scale.
    assert "pred_masks" not in outputs
    assert [tuple(m.shape) for m in outputs["mask_features"]] == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6),
                                                                 (2, 32, 2, 3)]  # fmt: skip
    assert [tuple(e.shape) for e in outputs["mask_embed"]] == [(2, 5, 32)] * 4
    assert pft_mask_logits(outputs["mask_embed"], outputs["mask_features"]).shape == (2, 5, 16, 24)  # stride 4
    assert len(outputs["aux_outputs"]) == 1  # dec_layers - 1
    aux = outputs["aux_outputs"][0]
    assert aux.keys() == {"pred_logits", "mask_embed"} and aux["pred_logits"].shape == (2, 5)
    assert [tuple(m.weight.shape) for m in model.predictor.class_embed] == [(1, 32)] * 4
    assert not torch.equal(aux["pred_logits"], outputs["pred_logits"])

    sem = torch.zeros(2, 64, 96, dtype=torch.long)
    sem[:, 10:40, 20:70] = 3
    targets = [{"labels": torch.tensor([0, 3]), "masks": s[None] == torch.tensor([0, 3])[:, None, None]} for s in sem]
    losses = build_criterion(cfg)(outputs, targets)
    names = ("loss_ce", "loss_focal_ce", "loss_focal", "loss_dice")
    assert set(losses) == {n + s for n in names for s in ("", "_0")}
    sum(losses.values()).backward()
    # Layer 0's cross-scale attention sees all-zero queries (zero init, zero-bias value
    # projections as in nn.MultiheadAttention), so its q/k weights get gradient from layer 1 on.
    trained = (
        "predictor.query_pos.0.weight",
        "predictor.layers.0.scale_attn.v_proj.bias",
        "predictor.layers.1.scale_attn.q_proj.weight",
        "backbone.body.conv1.0.weight",
    )
    for name in trained:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # Every pixel-decoder weight takes part (unused parameters upset ZeRO).
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []

    no_ds = build_model(tiny_cfg(deep_supervision=False)).eval()(torch.zeros(1, 3, 64, 64))
    assert no_ds["aux_outputs"] == [] and no_ds["pred_masks"].shape == (1, 5, 16, 16)


def test_bf16_autocast_gives_fp32_class_losses_on_the_single_logit():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model, criterion = build_model(cfg), build_criterion(cfg)
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    sem = torch.zeros(64, 64, dtype=torch.long)
    sem[:, 30:] = 2
    target = {"labels": torch.tensor([0, 2]), "masks": sem[None] == torch.tensor([0, 2])[:, None, None]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images)
        assert outputs["pred_logits"].dtype == torch.bfloat16 and outputs["pred_logits"].shape == (1, 5)
        losses = criterion(outputs, [target])
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
    # By hand: BCE of the 5 logits against "class present" (classes 0 and 2), / 2 masks.
    present = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]])
    bce = F.binary_cross_entropy_with_logits(outputs["pred_logits"].float(), present, reduction="sum") / 2
    torch.testing.assert_close(losses["loss_ce"], bce)


def test_heads_run_on_every_layer_only_in_training(monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(dec_layers=3))
    calls = []
    real = model.predictor.predict
    monkeypatch.setattr(model.predictor, "predict", lambda *a: calls.append(1) or real(*a))
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        train = model(images)
        assert len(calls) == 3 and len(train["aux_outputs"]) == 2
        calls.clear()
        evaluated = model.eval()(images)
    # Evaluation: the last layer's heads only (no 4 scales × K stride-4 masks per earlier
    # layer), and the same final prediction as in training (dropout 0, frozen BN), whose
    # masks are the product of the factors it hands over.
    assert len(calls) == 1 and evaluated["aux_outputs"] == []
    assert "mask_embed" not in evaluated and "mask_features" not in evaluated
    torch.testing.assert_close(evaluated["pred_logits"], train["pred_logits"])
    torch.testing.assert_close(evaluated["pred_masks"], pft_mask_logits(train["mask_embed"], train["mask_features"]))


def test_queries_start_at_zero_and_positional_encodings_are_shared_across_depths():
    model = build_model(tiny_cfg(dec_layers=3))
    predictor = model.predictor
    seen: dict[int, tuple] = {}

    def record(index):
        def hook(module, args):
            seen[index] = args

        return hook

    for i, layer in enumerate(predictor.layers):
        layer.register_forward_pre_hook(record(i))
    self_attn_inputs = {}
    predictor.layers[0].self_attn[2].register_forward_pre_hook(lambda m, a: self_attn_inputs.update(q=a[0], v=a[2]))
    model(torch.zeros(2, 3, 64, 64))

    n = predictor.num_scales
    assert n == 4
    # First layer: Q_s = 0 for every scale, so its self-attention's values are 0 and its
    # queries are the positional encodings alone.
    for q in seen[0][:n]:
        assert q.shape == (2, 5, 32) and q.abs().max() == 0
    assert self_attn_inputs["v"].abs().max() == 0
    torch.testing.assert_close(self_attn_inputs["q"][1], predictor.query_pos[2].weight)
    # Every layer receives the very same P_s Parameter objects (shared across depths)...
    for i in range(3):
        for s in range(n):
            assert seen[i][n + s] is predictor.query_pos[s].weight
    # ... and no layer owns a positional table of its own.
    assert not any(isinstance(m, torch.nn.Embedding) for m in predictor.layers.modules())


def test_sine_encoding_on_pixel_keys_only_and_no_pixel_to_pixel_attention():
    model = build_model(tiny_cfg(dec_layers=1))
    predictor = model.predictor
    calls = []
    layer = predictor.layers[0]
    for name, attn in [("self", layer.self_attn[0]), ("scale", layer.scale_attn), ("cross", layer.cross_attn[0])]:
        attn.register_forward_pre_hook(lambda m, a, name=name: calls.append((name, [t.shape[1] for t in a])))
    captured = {}
    layer.cross_attn[1].register_forward_pre_hook(lambda m, a: captured.update(k=a[1], v=a[2]))
    model(torch.zeros(1, 3, 64, 64))
    # Query lengths: K per scale, 4K across scales; only the cross-attention reads pixels,
    # and always with the K queries as its queries (HW never attends to HW).
    assert calls == [("self", [5, 5, 5]), ("scale", [20, 20, 20]), ("cross", [5, 256, 256])]
    # Keys = pixel tokens + fixed sine encoding of the stride-8 map, values = pixel tokens.
    pos = predictor.pe_layer(torch.zeros(1, 32, 8, 8)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(captured["k"] - captured["v"], pos)
    assert list(predictor.pe_layer.parameters()) == []  # the sine encoding is fixed, not learned


@dataclass
class _Decoded:
    mask_features: torch.Tensor
    multi_scale_features: list[torch.Tensor]


class _StandInPixelDecoder(torch.nn.Module):
    """Returns fixed maps: stride 4/8/16/32 of a 32×32 input."""

    def __init__(self, maps):
        super().__init__()
        self.maps = maps

    def forward(self, features):
        return _Decoded(self.maps[0], list(self.maps))


class _FixedQueries(torch.nn.Module):
    """Stands in for a scale's final LayerNorm: the heads see these queries, whatever the layers did."""

    def __init__(self, queries: torch.Tensor) -> None:
        super().__init__()
        self.queries = queries

    def forward(self, x):
        return self.queries.expand(x.shape[0], -1, -1)


def test_logit_averaging_and_sigmoid_semantics_by_hand():
    torch.manual_seed(0)
    channels, classes, hidden = 3, 2, 8
    maps = [torch.randn(1, channels, 8 // 2**s, 8 // 2**s) for s in range(4)]  # 8×8 ... 1×1
    predictor = PFTPredictor([channels] * 4, [channels] * 4, classes, hidden_dim=hidden, nheads=2, dec_layers=2)
    # Per-scale class logits: class 0 is +6 at stride 4 and -6 elsewhere: mean logit -3
    # (p = 0.047) but mean probability 0.251. Class 1 is -1.2 everywhere (p = 0.231).
    # Averaging in logit space then sigmoid ranks class 1 first; averaging probabilities
    # would rank class 0 first.
    scale_logits = torch.tensor([[6.0, -1.2], [-6.0, -1.2], [-6.0, -1.2], [-6.0, -1.2]])
    head_bias = [0.5, 0.0, -0.5, 1.0]  # each scale's Linear(C, 1) has a bias of its own
    mask_vectors = torch.randn(4, channels)
    with torch.no_grad():
        for s in range(4):
            # Query i carries its logit (minus the head's bias) in channel 0; the head reads it.
            queries = torch.zeros(1, classes, hidden)
            queries[0, :, 0] = scale_logits[s] - head_bias[s]
            predictor.decoder_norm[s] = _FixedQueries(queries)
            predictor.class_embed[s].weight.zero_()
            predictor.class_embed[s].weight[0, 0] = 1.0
            predictor.class_embed[s].bias.fill_(head_bias[s])
            last = predictor.mask_embed[s].layers[-1]
            last.weight.zero_()
            last.bias.copy_(mask_vectors[s])
    model = PFT(torch.nn.Identity(), _StandInPixelDecoder(maps), predictor, [0.0] * 3, [1.0] * 3)
    outputs = model(torch.zeros(1, 3, 32, 32))

    expected_logits = scale_logits.mean(0)[None]  # B×K: one logit per category query
    per_scale = [torch.einsum("c,bchw->bhw", mask_vectors[s], maps[s])[:, None] for s in range(4)]
    per_scale = [F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False) for m in per_scale]
    expected_masks = torch.stack(per_scale).mean(0).expand(1, classes, 8, 8)
    assert len(outputs["aux_outputs"]) == 1
    for out in [outputs, *outputs["aux_outputs"]]:
        torch.testing.assert_close(out["pred_logits"], expected_logits)
        torch.testing.assert_close(pft_mask_logits(out["mask_embed"], outputs["mask_features"]), expected_masks)
    outputs = model.eval()(torch.zeros(1, 3, 32, 32))
    torch.testing.assert_close(outputs["pred_masks"], expected_masks)

    # PFT's rule: p_i = sigmoid of the averaged logit of query i, score = p_i * sigmoid(m_i).
    p = outputs["pred_logits"][0].detach().sigmoid().tolist()
    assert p == pytest.approx([1 / (1 + math.exp(3)), 1 / (1 + math.exp(1.2))], rel=1e-5)
    prob_average = scale_logits.sigmoid().mean(0)
    assert prob_average.argmax() == 0  # the test discriminates the two orders
    # The formula itself until model.inference's PFT rule takes B×K logits.
    scores = outputs["pred_logits"].sigmoid()[:, :, None, None] * outputs["pred_masks"].sigmoid()
    assert (scores.argmax(1) == 1).all()


def test_fixed_assignment_puts_class_i_on_query_i():
    cfg = tiny_cfg(num_classes=4)
    criterion = build_criterion(cfg)
    assert isinstance(criterion.matcher, FixedMatcher)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :4], masks[1, 4:] = True, True
    target = {"labels": torch.tensor([3, 1]), "masks": masks}
    logits = torch.randn(1, 4)
    pred = torch.full((1, 4, 8, 8), -20.0)
    outputs = {"pred_logits": logits, "pred_masks": pred}
    [(rows, cols)] = criterion.matcher(outputs, [target])
    assert rows.tolist() == [1, 3] and cols.tolist() == [1, 0]
    # Class targets: "class i is in the image" for query i.
    assert criterion.matched_queries(logits, [(rows, cols)]).tolist() == [[0.0, 1.0, 0.0, 1.0]]
    # Query 3 predicts class 3's mask and query 1 class 1's: perfect; swapped: not.
    pred[0, 3], pred[0, 1] = masks[0].float() * 40 - 20, masks[1].float() * 40 - 20
    assert criterion(outputs, [target])["loss_dice"] < 1e-6
    swapped = {"pred_logits": logits, "pred_masks": pred[:, [0, 3, 2, 1]]}
    assert criterion(swapped, [target])["loss_dice"] > 0.5
    with pytest.raises(ValueError, match="several target masks"):
        criterion.matcher(outputs, [{"labels": torch.tensor([1, 1]), "masks": masks}])
    with pytest.raises(ValueError, match="no query"):
        criterion.matcher(outputs, [{"labels": torch.tensor([4]), "masks": masks[:1]}])


def test_grad_checkpointing_is_reentrant_and_changes_nothing(monkeypatch):
    # The decoder calls torch.utils.checkpoint.checkpoint through the module attribute, so
    # patching the attribute (as launcher/describe.py's measurement does) sees every layer.
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_cfg(grad_checkpointing=enabled))
        out = model(images)
        masks = pft_mask_logits(out["mask_embed"], out["mask_features"])
        (masks.square().mean() + out["pred_logits"].square().mean()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert calls == [True, True]  # one call per layer, reentrant (ZeRO-3)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
