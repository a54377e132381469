import ops.torchvision_fix  # noqa: F401  (before timm)

# isort: split
import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import model.pft_decoder as pft_decoder
from model.build import build_criterion, build_model
from model.config import BackboneConfig, LossConfig, ModelConfig, PFTDecoderConfig, PixelDecoderConfig
from model.matcher import FixedMatcher
from model.pft import PFT
from model.pft_decoder import PFTPredictor

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


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
    assert outputs["pred_logits"].shape == (2, 5, 6)  # K queries × (K + 1)
    assert outputs["pred_masks"].shape == (2, 5, 16, 24)  # stride 4
    assert len(outputs["aux_outputs"]) == 1  # dec_layers - 1
    aux = outputs["aux_outputs"][0]
    assert aux["pred_logits"].shape == (2, 5, 6) and aux["pred_masks"].shape == (2, 5, 16, 24)
    assert not torch.equal(aux["pred_logits"], outputs["pred_logits"])

    sem = torch.zeros(2, 64, 96, dtype=torch.long)
    sem[:, 10:40, 20:70] = 3
    targets = [{"labels": torch.tensor([0, 3]), "masks": s[None] == torch.tensor([0, 3])[:, None, None]} for s in sem]
    losses = build_criterion(cfg)(outputs, targets)
    names = ("loss_ce", "loss_focal_ce", "loss_focal", "loss_dice")
    assert set(losses) == {n + s for n in names for s in ("", "_0")}
    sum(losses.values()).backward()
    for name in ("predictor.query_pos.0.weight", "predictor.layers.0.scale_attn.q_proj.weight", "backbone.body.conv1.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # Every pixel-decoder weight takes part (unused parameters upset ZeRO).
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []

    no_ds = build_model(tiny_cfg(deep_supervision=False))(torch.zeros(1, 3, 64, 64))
    assert no_ds["aux_outputs"] == [] and no_ds["pred_masks"].shape == (1, 5, 16, 16)


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


def test_logit_averaging_and_sigmoid_semantics_by_hand():
    torch.manual_seed(0)
    channels, classes = 3, 2
    maps = [torch.randn(1, channels, 8 // 2**s, 8 // 2**s) for s in range(4)]  # 8×8 ... 1×1
    predictor = PFTPredictor([channels] * 4, [channels] * 4, classes, hidden_dim=8, nheads=2, dec_layers=2)
    # Class 0's logit is +6 at stride 4 and -6 elsewhere: mean logit -3 (p = 0.047) but mean
    # probability 0.251. Class 1 has -1.2 everywhere (p = 0.231). Averaging in logit space
    # then sigmoid ranks class 1 first; averaging probabilities would rank class 0 first.
    class_bias = [[6.0, -1.2, 0.5], [-6.0, -1.2, 0.0], [-6.0, -1.2, -0.5], [-6.0, -1.2, 1.0]]
    mask_vectors = torch.randn(4, channels)
    with torch.no_grad():
        for s in range(4):
            predictor.class_embed[s].weight.zero_()
            predictor.class_embed[s].bias.copy_(torch.tensor(class_bias[s]))
            last = predictor.mask_embed[s].layers[-1]
            last.weight.zero_()
            last.bias.copy_(mask_vectors[s])
    model = PFT(torch.nn.Identity(), _StandInPixelDecoder(maps), predictor, [0.0] * 3, [1.0] * 3)
    outputs = model(torch.zeros(1, 3, 32, 32))

    expected_logits = torch.tensor(class_bias).mean(0).expand(1, classes, 3)
    per_scale = [torch.einsum("c,bchw->bhw", mask_vectors[s], maps[s])[:, None] for s in range(4)]
    per_scale = [F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False) for m in per_scale]
    expected_masks = torch.stack(per_scale).mean(0).expand(1, classes, 8, 8)
    for out in [outputs, *outputs["aux_outputs"]]:
        torch.testing.assert_close(out["pred_logits"], expected_logits)
        torch.testing.assert_close(out["pred_masks"], expected_masks)

    # PFT's rule: p_i = sigmoid(l_ii) of the averaged logits, score = p_i * sigmoid(m_i).
    p = outputs["pred_logits"][0].detach().diagonal().sigmoid().tolist()
    assert p == pytest.approx([1 / (1 + math.exp(3)), 1 / (1 + math.exp(1.2))], rel=1e-5)
    prob_average = torch.tensor(class_bias)[:, :classes].sigmoid().mean(0)
    assert prob_average.argmax() == 0  # the test discriminates the two orders
    from model.inference import pft_semantic_inference

    semantic = pft_semantic_inference(outputs["pred_logits"], outputs["pred_masks"]).argmax(1)
    assert (semantic == 1).all()


def test_fixed_assignment_puts_class_i_on_query_i():
    cfg = tiny_cfg(num_classes=4)
    criterion = build_criterion(cfg)
    assert isinstance(criterion.matcher, FixedMatcher)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :4], masks[1, 4:] = True, True
    target = {"labels": torch.tensor([3, 1]), "masks": masks}
    logits = torch.randn(1, 4, 5)
    pred = torch.full((1, 4, 8, 8), -20.0)
    outputs = {"pred_logits": logits, "pred_masks": pred}
    [(rows, cols)] = criterion.matcher(outputs, [target])
    assert rows.tolist() == [1, 3] and cols.tolist() == [1, 0]
    assert criterion.target_classes(logits, [target], [(rows, cols)]).tolist() == [[4, 1, 4, 3]]
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
    calls = []
    real = pft_decoder.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(pft_decoder, "checkpoint", spy)
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_cfg(grad_checkpointing=enabled))
        out = model(images)
        (out["pred_masks"].square().mean() + out["pred_logits"].square().mean()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert calls == [True, True]  # one call per layer, reentrant (ZeRO-3)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


PAPER_PARAMS = {"r50": 74, "r101": 93, "swin_t": 74, "swin_s": 96, "swin_b": 133, "swin_l": 242}
PAPER_CROP = {"r50": 512, "r101": 512, "swin_t": 512, "swin_s": 512, "swin_b": 640, "swin_l": 640}


@pytest.mark.parametrize("preset", [*PAPER_PARAMS, "vit_l"])
def test_preset_parameter_counts_match_the_paper(preset):
    base = os.path.join(CONFIGS, f"maskformer_{preset}_ade20k.yaml")
    if not os.path.exists(base):
        pytest.skip(f"{base} (the MaskFormer preset the PFT preset builds on) does not exist yet")
    from launcher.config import load_config

    cfg = load_config(os.path.join(CONFIGS, f"pft_{preset}_ade20k.yaml"))
    assert cfg.model.name == "pft" and cfg.model.num_classes == 150
    with torch.device("meta"):
        model = build_model(cfg.model)
    total = sum(p.numel() for p in model.parameters()) / 1e6
    if preset in PAPER_PARAMS:  # the paper has no PFT ViT-L entry
        assert cfg.data.crop_size == PAPER_CROP[preset] and cfg.train.max_steps == 160_000
        assert abs(total / PAPER_PARAMS[preset] - 1) <= 0.05, f"{total:.1f}M vs {PAPER_PARAMS[preset]}M"
