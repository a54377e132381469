import ops.torchvision_fix  # noqa: F401  (before timm)

# isort: split
import math

import pytest
import torch
import torch.nn.functional as F

from model import build_criterion, build_model, semantic_segmentation
from model.config import (
    BackboneConfig,
    ModelConfig,
    PFTDecoderConfig,
    PixelDecoderConfig,
    TransformerDecoderConfig,
)
from model.inference import semantic_inference
from model.maskformer import MaskFormer, NormalizedInput
from model.position_encoding import PositionEmbeddingSine


def tiny_cfg(num_classes: int = 4, **decoder) -> ModelConfig:
    return ModelConfig(
        num_classes=num_classes,
        backbone=BackboneConfig(name="test_resnet"),
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32),
        decoder=TransformerDecoderConfig(
            **{"num_queries": 8, "hidden_dim": 32, "nheads": 2, "dim_feedforward": 64, "dec_layers": 3, **decoder}
        ),
    )


def test_output_shapes_and_aux_outputs():
    model = build_model(tiny_cfg())
    assert isinstance(model, MaskFormer)
    outputs = model(torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8))
    assert outputs["pred_logits"].shape == (2, 8, 5)
    assert outputs["pred_masks"].shape == (2, 8, 16, 24)  # stride 4
    assert len(outputs["aux_outputs"]) == 2  # dec_layers - 1
    for aux in outputs["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 8, 5) and aux["pred_masks"].shape == (2, 8, 16, 24)
    assert not torch.equal(outputs["aux_outputs"][-1]["pred_logits"], outputs["pred_logits"])


def test_heads_run_on_every_layer_only_in_training():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(dropout=0.0))
    seen = []
    model.predictor.mask_embed.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        train = model(images)
        evaluated = model.eval()(images)
    # The mask head saw 3 layers in training, only the last one at evaluation.
    assert seen == [3, 1] and len(train["aux_outputs"]) == 2 and evaluated["aux_outputs"] == []
    torch.testing.assert_close(evaluated["pred_logits"], train["pred_logits"])
    torch.testing.assert_close(evaluated["pred_masks"], train["pred_masks"])


def test_uint8_and_float_inputs_are_normalised_the_same():
    model = build_model(tiny_cfg()).eval()
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        a, b = model(images), model(images.float())
    torch.testing.assert_close(a["pred_masks"], b["pred_masks"])
    # Constants come from the config, not from checkpoints.
    assert "pixel_mean" not in model.state_dict() and "pixel_std" not in model.state_dict()
    with pytest.raises(ValueError, match="MaskFormer expects B×3×H×W"):
        model(torch.zeros(3, 64, 64))
    # PFT shares the same input handling (model.maskformer.NormalizedInput).
    pft = build_model(ModelConfig(
        name="pft", num_classes=3, backbone=BackboneConfig(name="test_resnet"),
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32),
        pft=PFTDecoderConfig(hidden_dim=32, nheads=2, dim_feedforward=64, dec_layers=1),
    )).eval()
    assert isinstance(pft, NormalizedInput) and "pixel_mean" not in pft.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(pft(images)["pred_masks"], pft(images.float())["pred_masks"])
    with pytest.raises(ValueError, match="PFT expects B×3×H×W"):
        pft(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="model.pixel_mean"):
        build_model(ModelConfig(backbone=BackboneConfig(name="test_resnet"), pixel_mean=[0.0]))


def test_input_projection_only_when_channels_differ():
    # test_resnet's stride-32 map has 96 channels.
    assert isinstance(build_model(tiny_cfg(hidden_dim=32)).predictor.input_proj, torch.nn.Conv2d)
    assert isinstance(build_model(tiny_cfg(hidden_dim=96, nheads=4)).predictor.input_proj, torch.nn.Identity)
    assert isinstance(
        build_model(tiny_cfg(hidden_dim=96, nheads=4, enforce_input_project=True)).predictor.input_proj,
        torch.nn.Conv2d,
    )


def test_queries_start_as_zeros_and_embeddings_are_positional():
    # Paper: "The N query embeddings are initialized as zero vectors"; the learned
    # embeddings are added to queries/keys only. So the first self-attention's values are 0.
    model = build_model(tiny_cfg())
    seen = {}

    def hook(module, args):
        query, key, value = args[:3]
        seen["value"], seen["query"] = value, query

    model.predictor.decoder.layers[0].self_attn.register_forward_pre_hook(hook)
    model(torch.zeros(2, 3, 64, 64))
    assert seen["value"].abs().max() == 0
    torch.testing.assert_close(seen["query"][0], model.predictor.query_embed.weight)


def test_pre_norm_variant_runs():
    outputs = build_model(tiny_cfg(pre_norm=True))(torch.zeros(1, 3, 64, 64))
    assert torch.isfinite(outputs["pred_masks"]).all()


def test_unknown_model_name_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"model\.name='mask3former' is not supported; supported values: maskformer"):
        build_model(ModelConfig(name="mask3former"))
    with pytest.raises(ValueError, match=r"model\.name="):
        build_criterion(ModelConfig(name="mask3former"))


@pytest.mark.parametrize(
    "backbone,out_indices,timm_kwargs,paper_millions",
    [
        ("resnet50", [1, 2, 3, 4], {}, 41),
        ("resnet101", [1, 2, 3, 4], {}, 60),
        ("swin_tiny_patch4_window7_224", [0, 1, 2, 3], {"img_size": 512}, 42),
    ],
)
def test_parameter_counts_match_the_paper(backbone, out_indices, timm_kwargs, paper_millions):
    # MaskFormer's ADE20K table (150 classes, 100 queries, 6 layers, hidden 256): a
    # structural check of the whole network. Built on the meta device: no memory, ~0.1 s.
    cfg = ModelConfig(backbone=BackboneConfig(name=backbone, out_indices=out_indices, timm_kwargs=timm_kwargs))
    with torch.device("meta"):
        model = build_model(cfg)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions == pytest.approx(paper_millions, abs=0.5)


def test_position_encoding_matches_detr_formula():
    pos = PositionEmbeddingSine(num_pos_feats=4, normalize=True)(torch.zeros(1, 7, 2, 3))
    assert pos.shape == (1, 8, 2, 3) and pos.dtype == torch.float32
    # Channel 4 + 2k (+1) = sin (cos) of x-coordinate / 10000^(2k/4); x normalised to (0, 2π].
    x = 2 / 3 * 2 * math.pi  # second column of three
    torch.testing.assert_close(pos[0, 4, 1, 1], torch.tensor(math.sin(x)))
    torch.testing.assert_close(pos[0, 7, 1, 1], torch.tensor(math.cos(x / 100.0)))
    y = 1 / 2 * 2 * math.pi  # first row of two
    torch.testing.assert_close(pos[0, 1, 0, 2], torch.tensor(math.cos(y)), atol=1e-5, rtol=0)


def test_semantic_inference_is_the_papers_marginalisation():
    # 2 queries, K = 2 classes + "no object", 2 pixels (a, b).
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.5, 0.4]])
    mask_probs = torch.tensor([[0.9, 0.1], [0.5, 0.8]])
    pred_logits = probs.log()[None]
    pred_masks = torch.logit(mask_probs).view(1, 2, 1, 2)
    scores = semantic_inference(pred_logits, pred_masks)
    # sum_i p_i(c) m_i[h, w], "no object" dropped and NOT renormalised:
    # a: c0 = .6*.9 + .1*.5 = .59, c1 = .3*.9 + .5*.5 = .52; b: c0 = .6*.1 + .1*.8 = .14, c1 = .3*.1 + .5*.8 = .43
    expected = torch.tensor([[[0.59, 0.14]], [[0.52, 0.43]]])[None]
    torch.testing.assert_close(scores, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        labels = semantic_segmentation({"pred_logits": pred_logits.bfloat16(), "pred_masks": pred_masks}, (1, 2))
    assert labels.dtype == torch.int64 and labels.tolist() == [[[0, 1]]]


def test_semantic_segmentation_upsamples_mask_logits_to_the_image_size():
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 5, 4), "pred_masks": torch.randn(2, 5, 4, 6) * 4}
    labels = semantic_segmentation(outputs, torch.Size([16, 24]))
    assert labels.shape == (2, 16, 24) and labels.dtype == torch.int64
    upsampled = F.interpolate(outputs["pred_masks"], size=(16, 24), mode="bilinear", align_corners=False)
    assert torch.equal(labels, semantic_inference(outputs["pred_logits"], upsampled).argmax(1))
    assert labels.min() >= 0 and labels.max() <= 2  # never the "no object" index


def _rectangles_batch(size: int = 64):
    """Two images, each with a red class-1 and a blue class-2 rectangle on noise."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=g)
    semantic = torch.zeros(2, size, size, dtype=torch.long)
    semantic[0, 8:32, 8:40] = 1
    semantic[0, 36:60, 24:56] = 2
    semantic[1, 4:28, 30:60] = 2
    semantic[1, 34:58, 6:30] = 1
    colours = {1: (200, 40, 40), 2: (40, 40, 200)}
    targets = []
    for b in range(2):
        for cls, rgb in colours.items():
            images[b][:, semantic[b] == cls] = torch.tensor(rgb, dtype=torch.uint8)[:, None]
        labels = semantic[b].unique()
        targets.append({"labels": labels, "masks": semantic[b][None] == labels[:, None, None]})
    return images, targets, semantic


def test_one_batch_overfit():
    # The model really learns: on a fixed batch, 60 AdamW steps under bf16 autocast
    # bring the summed loss (with deep supervision) down by > 5x and segment the batch.
    torch.manual_seed(0)
    cfg = tiny_cfg(num_classes=3, dropout=0.0, dec_layers=2)
    cfg.backbone.freeze_bn = False  # trained from scratch: frozen BN would pin random-init statistics
    model, criterion = build_model(cfg), build_criterion(cfg)
    images, targets, semantic = _rectangles_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    history = []
    for _ in range(60):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model(images)
        loss = sum(criterion(outputs, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < history[0] / 5, history[::10]
    model.eval()
    with torch.no_grad():
        accuracy = (semantic_segmentation(model(images), images.shape[-2:]) == semantic).float().mean()
    assert accuracy > 0.95, history[::10]


def test_decoder_grad_checkpointing_recomputes_each_layer_with_the_same_grads(monkeypatch):
    reentrant_flags = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda fn, *a, **kw: reentrant_flags.append(kw.get("use_reentrant")) or original(fn, *a, **kw))
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    results = {}
    for checkpointed in (False, True):
        torch.manual_seed(1)  # same weights and, with dropout 0.1, the same masks
        model = build_model(tiny_cfg(grad_checkpointing=checkpointed))
        outputs = model(pixels)
        loss = outputs["pred_logits"].logsumexp(-1).mean() + outputs["pred_masks"].sigmoid().mean()
        loss.backward()
        results[checkpointed] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert reentrant_flags == [True, True, True]  # dec_layers=3, reentrant for ZeRO-3
    assert results[True].keys() == results[False].keys()
    for name, grad in results[False].items():
        torch.testing.assert_close(results[True][name], grad, msg=name)
