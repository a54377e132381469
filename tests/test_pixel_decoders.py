import ops.torchvision_fix  # noqa: F401  (before timm)

# isort: split
import dataclasses

import pytest
import torch

from model.backbone import build_backbone
from model.config import BackboneConfig, ModelConfig, PixelDecoderConfig, TransformerDecoderConfig
from model.maskformer import MaskFormer
from model.msdeform_pixel_decoder import MSDeformAttnPixelDecoder
from model.pixel_decoder import BasePixelDecoder, PixelDecoderOutput, build_pixel_decoder
from model.transformer_decoder import build_transformer_predictor
from ops import recompute
from tests.test_recompute import spy_checkpoint_calls

CHANNELS = [32, 48, 192, 96]  # timm's test_resnet at strides 4/8/16/32
STRIDES = [4, 8, 16, 32]


def tiny_cfg(name: str) -> PixelDecoderConfig:
    return PixelDecoderConfig(
        name=name,
        conv_dim=32,
        mask_dim=16,
        encoder_layers=2,
        encoder_nheads=4,
        encoder_dim_feedforward=64,
        encoder_num_points=2,
    )


def as_if_trained(decoder: torch.nn.Module) -> torch.nn.Module:
    """Give the zero-initialised query projections of every MSDeformAttn random values:
    at init the deformable attention ignores its query (Deformable DETR), so the level
    embeddings get gradient only from the second step on."""
    with torch.no_grad():
        for name, param in decoder.named_parameters():
            if name.endswith(("sampling_offsets.weight", "attention_weights.weight")):
                param.normal_(std=0.1)
    return decoder


def random_features(height=64, width=96, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, height // s, width // s, generator=g) for c, s in zip(CHANNELS, STRIDES)]


@pytest.mark.parametrize("name", ["fpn", "msdeformattn"])
def test_output_shapes_strides_and_channels(name):
    decoder = build_pixel_decoder(tiny_cfg(name), CHANNELS)
    assert isinstance(decoder, {"fpn": BasePixelDecoder, "msdeformattn": MSDeformAttnPixelDecoder}[name])
    features = random_features()
    out = decoder(features)
    assert isinstance(out, PixelDecoderOutput)
    assert out.mask_features.shape == (2, 16, 16, 24)  # stride 4, mask_dim
    assert [tuple(f.shape) for f in out.multi_scale_features] == [
        (2, 32, 64 // s, 96 // s) for s in STRIDES
    ]  # finest first, conv_dim
    if name == "fpn":
        # MaskFormer's decoder attends to the backbone's res5, untouched.
        assert out.transformer_feature is features[-1] and decoder.transformer_channels == 96
    else:
        # The encoder's stride-32 output (also the coarsest multi-scale feature).
        assert out.transformer_feature.shape == (2, 32, 2, 3) and decoder.transformer_channels == 32
        assert out.transformer_feature is out.multi_scale_features[-1]


@pytest.mark.parametrize("name", ["fpn", "msdeformattn"])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    decoder = as_if_trained(build_pixel_decoder(tiny_cfg(name), CHANNELS))
    out = decoder(random_features())
    # Random weighting: a plain sum after a normalisation layer has zero gradient.
    maps = [out.mask_features, *out.multi_scale_features]
    loss = sum((m * torch.randn_like(m)).sum() for m in maps)
    loss.backward()
    for pname, param in decoder.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, pname


# (torch checkpoint segments, per-sample segments): the pyramid levels are per sample.
@pytest.mark.parametrize("name, segments", [("fpn", (0, 3)), ("msdeformattn", (2, 1))])
@pytest.mark.parametrize("features_require_grad", [True, False])
def test_grad_checkpointing_recomputes_segments_with_the_same_grads(name, segments, features_require_grad,
                                                                     monkeypatch):
    """FPN: the 3 levels below the coarsest, one image at a time; msdeformattn: 2 encoder
    layers + the FPN step (one image at a time).
    With features that do not require grad (a frozen backbone) the decoder's own
    parameters still get their gradients."""
    calls = spy_checkpoint_calls(monkeypatch)
    per_sample = []
    original = recompute._PerSampleCheckpoint.apply
    monkeypatch.setattr(recompute._PerSampleCheckpoint, "apply", lambda *a: per_sample.append(1) or original(*a))
    results = {}
    for enabled in (False, True):
        torch.manual_seed(0)
        decoder = as_if_trained(build_pixel_decoder(
            dataclasses.replace(tiny_cfg(name), grad_checkpointing=enabled), CHANNELS))
        features = [f.requires_grad_(features_require_grad) for f in random_features()]
        out = decoder(features)
        maps = [out.mask_features, *out.multi_scale_features]
        torch.manual_seed(1)
        sum((m * torch.randn_like(m)).sum() for m in maps).backward()
        grads = {n: p.grad for n, p in decoder.named_parameters()}
        if features_require_grad:
            grads.update({f"feature{i}": f.grad for i, f in enumerate(features)})
        results[enabled] = (maps, grads)
    assert calls == [True] * segments[0]  # reentrant (ZeRO-3), one call per segment
    assert len(per_sample) == segments[1]
    for plain, recomputed in zip(results[False][0], results[True][0]):
        torch.testing.assert_close(recomputed, plain)
    # Per-sample segments sum each weight gradient over the images in another order: fp32
    # rounding, relative to the gradients' scale (they agree to 1e-13 in fp64).
    scale = max(float(g.abs().max()) for g in results[False][1].values() if g is not None)
    for key, grad in results[False][1].items():
        assert grad is not None and results[True][1][key] is not None, key
        torch.testing.assert_close(results[True][1][key], grad, rtol=1e-4, atol=1e-6 * scale,
                                   msg=lambda m, key=key: f"{key}: {m}")


def test_msdeformattn_mixes_scales():
    # Each token's deformable attention reads every level: changing only the stride-32
    # input changes the encoder's stride-8 output (an FPN-free check of cross-scale flow).
    torch.manual_seed(0)
    decoder = build_pixel_decoder(tiny_cfg("msdeformattn"), CHANNELS).eval()
    features = random_features()
    with torch.no_grad():
        a = decoder(features).multi_scale_features[1]
        # Random, not constant: GroupNorm after the input projection removes a constant shift.
        features[-1] = features[-1] + torch.randn_like(features[-1])
        b = decoder(features).multi_scale_features[1]
    assert (a - b).abs().amax() > 1e-3


def test_bf16_autocast_forward_is_close_to_fp32():
    torch.manual_seed(0)
    decoder = build_pixel_decoder(tiny_cfg("msdeformattn"), CHANNELS).eval()
    features = random_features(batch=1)
    with torch.no_grad():
        ref = decoder(features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = decoder(features)
    pairs = zip([out.mask_features, *out.multi_scale_features], [ref.mask_features, *ref.multi_scale_features])
    for got, want in pairs:
        assert torch.isfinite(got).all()
        # bf16 keeps ~3 significant digits; 2 encoder layers and the convs accumulate that.
        assert (got.float() - want).abs().mean() < 0.02 * want.abs().mean()  # measured ~0.006


def _maskformer(pixel_decoder_name: str) -> MaskFormer:
    cfg = ModelConfig(
        num_classes=4,
        backbone=BackboneConfig(name="test_resnet"),
        pixel_decoder=tiny_cfg(pixel_decoder_name),
        decoder=TransformerDecoderConfig(num_queries=8, hidden_dim=32, nheads=2, dim_feedforward=64, dec_layers=2),
    )
    backbone = build_backbone(cfg.backbone)
    pixel_decoder = build_pixel_decoder(cfg.pixel_decoder, backbone.channels)
    # The transformer's input channels come from the pixel decoder (res5 for the FPN,
    # conv_dim for the deformable encoder).
    predictor = build_transformer_predictor(
        cfg.decoder, pixel_decoder.transformer_channels, cfg.num_classes, cfg.pixel_decoder.mask_dim
    )
    return MaskFormer(backbone, pixel_decoder, predictor, cfg.pixel_mean, cfg.pixel_std)


def test_maskformer_runs_with_msdeformattn_pixel_decoder_fp32_and_bf16():
    torch.manual_seed(0)
    model = _maskformer("msdeformattn")
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    outputs = model(images)
    assert outputs["pred_logits"].shape == (2, 8, 5)
    assert outputs["pred_masks"].shape == (2, 8, 16, 24)
    (outputs["pred_masks"].float().square().mean() + outputs["pred_logits"].float().square().mean()).backward()
    assert model.pixel_decoder.encoder[0].self_attn.sampling_offsets.weight.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images)
    assert torch.isfinite(outputs["pred_masks"].float()).all() and outputs["pred_masks"].shape == (2, 8, 16, 24)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"model\.pixel_decoder\.name='bogus' is not supported"):
        build_pixel_decoder(PixelDecoderConfig(name="bogus"), CHANNELS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"model\.pixel_decoder\.encoder_nheads=3"):
        build_pixel_decoder(PixelDecoderConfig(name="msdeformattn", conv_dim=32, encoder_nheads=3), CHANNELS)
    with pytest.raises(ValueError, match=r"model\.backbone\.out_indices"):
        build_pixel_decoder(PixelDecoderConfig(name="msdeformattn"), [96])


def test_msdeformattn_parameter_count_matches_mask2former_r50():
    # Mask2Former's pixel decoder over ResNet-50 (conv_dim 256, 6 layers, 8 heads, 4 points,
    # FFN 1024, 3 levels), counted from its module definitions:
    #   input projections 1x1 conv + GN:  (512 + 1024 + 2048) * 256 + 3 * (256 + 512)
    #   per encoder layer: offsets 256*192+192, weights 256*96+96, value/output proj
    #     2 * (256*256+256), FFN 256*1024+1024 + 1024*256+256, 2 LayerNorms 2*512
    #   level embeddings 3*256; res2 lateral 1x1 (no bias) + GN, 3x3 output conv (no bias)
    #   + GN; mask_features 1x1 conv 256*256+256.
    per_layer = (256 * 192 + 192) + (256 * 96 + 96) + 2 * (256 * 256 + 256) + (256 * 1024 + 1024) + (1024 * 256 + 256)
    expected = (
        (512 + 1024 + 2048) * 256
        + 3 * (256 + 512)
        + 6 * (per_layer + 2 * 512)
        + 3 * 256
        + (256 * 256 + 512)
        + (256 * 256 * 9 + 512)
        + (256 * 256 + 256)
    )
    with torch.device("meta"):
        decoder = build_pixel_decoder(PixelDecoderConfig(name="msdeformattn"), [256, 512, 1024, 2048])
    assert sum(p.numel() for p in decoder.parameters()) == expected  # 6,035,904
