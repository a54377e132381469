"""``describe``: parameter counts per component and the training-memory estimate per worker."""

import os
import re
import time

import ops.torchvision_fix  # noqa: F401  (before timm)

# isort: split
import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d  # what timm.layers.freeze_batch_norm_2d makes

from launcher.cli import main
from launcher.config import load_config
from launcher.describe import count_parameters, describe_model, measure_activations
from launcher.loss_memory import MASKS_PER_IMAGE, _loss_bytes_at, measure_loss_activations
from launcher.saved_tensors import SavedTensors
from model.build import build_meta_model, build_model

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TINY = os.path.join(CONFIGS, "test_tiny.yaml")


def _tiny(*overrides: str):
    return load_config(TINY, list(overrides))


# The tiny config's ResNet with FrozenBN, whatever the demo chooses: the counts must
# include the frozen affine (buffers) in the total.
FROZEN = "model.backbone.freeze_bn=true"


def test_cli_prints_total_and_components_that_sum_to_it(capsys):
    assert main(["describe", "--config", TINY, "--set", FROZEN, "--set", "model.backbone.pretrained_path=/nowhere.pth"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Shapes only: the pretrained file is not read, and describe says so rather than imply it fits.
    assert "model.backbone.pretrained_path: /nowhere.pth is not read by describe" in lines[1], lines[:2]
    totals = [line for line in lines if line.startswith("total")]
    assert len(totals) == 1
    total = int(re.search(r"\(([\d,]+);", totals[0]).group(1).replace(",", ""))
    with torch.device("meta"):
        model = build_model(_tiny(FROZEN).model)
    trainable = sum(p.numel() for p in model.parameters())
    # FrozenBN's affine are buffers, yet weights of the model.
    frozen = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, FrozenBatchNorm2d))
    assert frozen > 0
    assert total == trainable + frozen
    assert f"trainable {trainable:,})" in totals[0]
    # Top-level components: two-space indent, name, millions, exact count in parentheses.
    components = [re.match(r"  (\w+) +[\d.]+M +\(([\d,]+)\)$", line) for line in lines]
    counts = {m.group(1): int(m.group(2).replace(",", "")) for m in components if m}
    assert set(counts) == {"backbone", "pixel_decoder", "predictor"}
    assert sum(counts.values()) == total
    assert any(line.strip().startswith("activations") and "measured" in line for line in lines)
    assert any(line.strip().startswith("total") and "estimate" in line for line in lines)


def test_memory_grows_with_batch_size():
    one, two, four = (describe_model(_tiny(f"data.batch_size={b}"))["memory"] for b in (1, 2, 4))
    for key in ("activations", "loss_activations", "total"):
        assert one[key] < two[key] < four[key], key
        # Linear in the batch, plus what does not depend on it (autocast's weight copies).
        assert four[key] - one[key] == pytest.approx(3 * (two[key] - one[key]), rel=0.02), key
    assert four["parameters"] == one["parameters"]


def test_loss_estimate_follows_the_masks_per_image(capsys):
    """The tiny config has 5 classes and 16 queries: 2 and 5 masks per image differ;
    beyond the classes it stops growing (an image cannot hold more masks than classes)."""
    two, five, nine = (describe_model(_tiny(), masks_per_image=n)["memory"] for n in (2, 5, 9))
    assert two["loss_activations"] < five["loss_activations"] == nine["loss_activations"]
    assert two["activations"] == five["activations"]
    assert main(["describe", "--config", TINY, "--masks-per-image", "3"]) == 0
    assert "assumes 3 masks per image" in capsys.readouterr().out
    assert main(["describe", "--config", TINY, "--masks-per-image", "0"]) == 2
    assert "--masks-per-image: expected a positive number of masks, got 0" in capsys.readouterr().err


def test_memory_shrinks_with_zero_stage():
    totals = [describe_model(_tiny(f"train.zero_stage={s}", "cluster.num_workers=4", FROZEN))["memory"]
              for s in range(4)]
    # Stages 1 and 2 hold the same (DeepSpeed reduces both bucket by bucket into partitions).
    assert totals[0]["total"] > totals[1]["total"] == totals[2]["total"] > totals[3]["total"]
    desc = describe_model(_tiny(FROZEN))
    trainable, frozen = desc["trainable"], desc["total"] - desc["trainable"]
    assert totals[1]["gradients"] == pytest.approx(trainable * 4 / 4) == totals[0]["gradients"] / 4
    # ... unless gradients accumulate over micro-steps: ZeRO-1 keeps them whole until the last.
    accumulating = describe_model(_tiny("train.zero_stage=1", "train.grad_accum_steps=2", "cluster.num_workers=4",
                                        FROZEN))["memory"]
    assert accumulating["gradients"] == totals[0]["gradients"]
    # Stage 3 partitions every trainable weight: 4 + 4 + 8 bytes per parameter over 4
    # workers (the fp32 partitions are the master weights: no copy, launcher.engine);
    # FrozenBN's affine are buffers, which every worker holds whole (4 bytes).
    stage3 = totals[3]
    assert frozen > 0
    assert stage3["parameters"] + stage3["gradients"] + stage3["optimizer"] == pytest.approx(
        trainable * 16 / 4 + frozen * 4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fake_trace_saves_what_a_real_forward_saves(precision):
    cfg = _tiny(f"train.precision={precision}")
    traced, _, _ = measure_activations(build_meta_model(cfg.model), 2, 64, precision)
    model = build_model(cfg.model).train()
    saved = SavedTensors(exclude=[*model.parameters(), *model.buffers()])
    dtype = torch.bfloat16 if precision == "bf16" else None
    with saved.hooks(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        model(torch.zeros(2, 3, 64, 64))
    # Exact in fp32; under bf16 the fake kernels keep BatchNorm's per-channel statistics in
    # bf16 where CPU keeps fp32 (a few KB).
    assert saved.total > 0 and traced == pytest.approx(saved.total, rel=0 if precision == "fp32" else 0.01)


def test_loss_extrapolation_matches_a_direct_measurement():
    cfg = _tiny()
    _, _, outputs = measure_activations(build_meta_model(cfg.model), 2, 96, "bf16")
    assert outputs["pred_masks"].shape[-1] == 24  # stride 4
    direct = _loss_bytes_at(cfg.model, outputs, side=24, ratio=4, generator=torch.Generator().manual_seed(0),
                            masks_per_image=MASKS_PER_IMAGE)
    assert measure_loss_activations(cfg.model, outputs, 96) == pytest.approx(direct, rel=1e-6)


def test_checkpointing_lowers_activations_and_reports_the_recompute():
    plain = describe_model(_tiny())["memory"]
    ckpt = describe_model(_tiny("model.backbone.grad_checkpointing=true"))["memory"]
    assert plain["recompute"] == 0 < ckpt["recompute"]
    assert ckpt["activations"] < plain["activations"]


def test_pft_decoder_checkpointing_is_measured():
    # The backbone is not checkpointed: a recompute term can only come from PFT's layers.
    sizes = ("model.pft.hidden_dim=32", "model.pft.nheads=2", "model.pft.dim_feedforward=64", "model.pft.dec_layers=2")
    plain = describe_model(_tiny("model.name=pft", *sizes))["memory"]
    ckpt = describe_model(_tiny("model.name=pft", *sizes, "model.pft.grad_checkpointing=true"))["memory"]
    assert plain["recompute"] == 0 < ckpt["recompute"]
    assert ckpt["activations"] < plain["activations"]


def test_pixel_decoder_checkpointing_is_measured():
    plain = describe_model(_tiny())["memory"]
    ckpt = describe_model(_tiny("model.pixel_decoder.grad_checkpointing=true"))["memory"]
    assert plain["recompute"] == 0 < ckpt["recompute"]
    assert ckpt["activations"] < plain["activations"]


def test_spy_sees_checkpoints_imported_by_name(monkeypatch):
    # A module that did ``from torch.utils.checkpoint import checkpoint`` (timm's features
    # wrapper does so with timm's helper) is measured too, and timm's helper calling
    # torch's counts its segment once.
    import types

    from timm.models import checkpoint as timm_checkpoint

    from launcher.describe import _largest_checkpointed_segment

    layer = torch.nn.Linear(8, 8)
    by_name = types.ModuleType("by_name_user")
    by_name.checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setitem(__import__("sys").modules, "by_name_user", by_name)
    x = torch.randn(4, 8, requires_grad=True)
    # Linear saves its input (4x8 fp32 = 128 bytes) for the weight gradient.
    for call in (lambda: by_name.checkpoint(layer, x, use_reentrant=False), lambda: timm_checkpoint(layer, x)):
        with _largest_checkpointed_segment(list(layer.parameters())) as largest:
            call()
        assert largest[0] == 4 * 8 * 4
    assert by_name.checkpoint is torch.utils.checkpoint.checkpoint  # restored afterwards


def test_cnn_presets_count_frozen_bn_and_match_the_paper():
    # FrozenBN turns the BN affine into buffers; the total still counts them, as the
    # papers' tables do (seed 002: R50 41M, R101 60M), and only they are untrainable.
    for name, paper in (("maskformer_r50_ade20k.yaml", 41e6), ("maskformer_r101_ade20k.yaml", 60e6)):
        model = build_meta_model(load_config(os.path.join(CONFIGS, name)).model)
        counts = count_parameters(model)
        bn_affine = sum(m.weight.numel() + m.bias.numel() for m in model.modules()
                        if isinstance(m, FrozenBatchNorm2d))
        assert bn_affine > 0 and counts["trainable"] + bn_affine == counts["total"], name
        assert abs(counts["total"] - paper) <= 0.05 * paper, f"{name}: {counts['total'] / 1e6:.2f}M"
        assert sum(counts["components"].values()) == counts["total"]


def test_swin_l_preset_is_described_quickly():
    cfg = load_config(os.path.join(CONFIGS, "maskformer_swin_l_ade20k.yaml"))
    start = time.perf_counter()
    desc = describe_model(cfg)
    seconds = time.perf_counter() - start
    memory = desc["memory"]
    print(f"swin-l: {desc['total']:,} params, {seconds:.1f} s, " +
          ", ".join(f"{k} {memory[k] / 2**30:.2f} GiB" for k in
                    ("parameters", "gradients", "optimizer", "activations", "loss_activations", "total")))
    assert memory["crop_size"] == 640 and memory["batch_size"] == 2
    assert memory["activations"] > memory["parameters"] > 0
    assert seconds < 20  # ~2-4 s; generous for a loaded CI machine


@pytest.mark.parametrize("preset", ["panoptic_segformer_r50_coco.yaml", "unept_r50_ade20k.yaml"])
def test_models_with_other_outputs_are_described(preset, capsys):
    # Panoptic SegFormer's thing/stuff logits, boxes and location-decoder outputs, and
    # UN-EPT's dense logit maps, go through the loss estimate like MaskFormer's masks.
    small = ["--set", "data.crop_size=256", "--set", "data.batch_size=1"]
    assert main(["describe", "--config", os.path.join(CONFIGS, preset), *small]) == 0
    out = capsys.readouterr().out
    loss = re.search(r"^  loss +([\d.]+) GiB", out, re.M)
    assert loss is not None and float(loss.group(1)) > 0, out
    # UN-EPT classifies pixels: no mask count enters its loss, and none is claimed.
    assert ("masks per image" in out) == ("unept" not in preset), out
    if "unept" in preset:  # its query grid sits on the model itself: named, not "other"
        assert re.search(r"^  query_embed +0\.9M", out, re.M) and "  other " not in out, out


def test_bf16_activations_leave_out_the_weight_copies_the_train_loop_recasts():
    """Below ZeRO-3 the train loop saves parameters, not their bf16 copies (ops/weight_recast.py):
    describe leaves those copies out, at most 2 bytes a parameter; under ZeRO-3 it counts them."""
    recast = describe_model(_tiny("train.precision=bf16", "train.zero_stage=1"))
    saved = describe_model(_tiny("train.precision=bf16", "train.zero_stage=3"))
    difference = saved["memory"]["activations"] - recast["memory"]["activations"]
    assert 0 < difference <= 2 * recast["total"]
