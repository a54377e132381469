"""A tiny MaskFormer and a tiny PFT each overfit one batch to mIoU 1.0: the whole chain —
model, matcher / fixed assignment, every loss, inference rule, confusion matrix — works.

The rectangles span the image (bands): their edges are straight lines at arbitrary
positions. Interior rectangle *corners* would also be learnt, but slowly — bilinear
upsampling of stride-4 logits rounds a corner off until the logits around it grow
large — which would cost a CPU test several times its budget for no extra coverage.
"""

import ops.torchvision_fix  # noqa: F401  (before timm)

# isort: split
import time

import pytest
import torch

from launcher.evaluate import ConfusionMatrix
from model.build import build_criterion, build_model
from model.config import (
    BackboneConfig,
    LossConfig,
    ModelConfig,
    PFTDecoderConfig,
    PixelDecoderConfig,
    TransformerDecoderConfig,
)
from model.inference import pft_semantic_inference, semantic_segmentation

NUM_CLASSES = 4
TIME_LIMIT_S = 20.0


def one_batch() -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """2 images 64×64 of coloured bands (class 0 = background), their label maps and targets."""
    sem = torch.zeros(2, 64, 64, dtype=torch.long)
    sem[0, 0:18] = 1
    sem[0, 18:45] = 2
    sem[1, :, 0:22] = 3
    sem[1, :, 50:64] = 1
    palette = torch.tensor([[40, 40, 40], [220, 30, 30], [30, 200, 40], [40, 60, 230]], dtype=torch.float32)
    images = palette[sem].permute(0, 3, 1, 2)
    targets = []
    for label_map in sem:
        labels = label_map.unique()
        targets.append({"labels": labels, "masks": label_map[None] == labels[:, None, None]})
    return images, sem, targets


def predict(name: str, outputs: dict, size: tuple[int, int]) -> torch.Tensor:
    if name == "pft":
        masks = torch.nn.functional.interpolate(outputs["pred_masks"], size=size, mode="bilinear", align_corners=False)
        return pft_semantic_inference(outputs["pred_logits"], masks).argmax(1)
    return semantic_segmentation(outputs, size)


@pytest.mark.parametrize("name", ["maskformer", "pft"])
def test_tiny_model_overfits_one_batch(name):
    torch.manual_seed(0)
    cfg = ModelConfig(
        name=name,
        num_classes=NUM_CLASSES,
        backbone=BackboneConfig(name="test_resnet"),
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32),
        decoder=TransformerDecoderConfig(
            num_queries=8, hidden_dim=32, nheads=2, dim_feedforward=64, dec_layers=1, dropout=0.0
        ),
        pft=PFTDecoderConfig(hidden_dim=32, nheads=2, dim_feedforward=64, dec_layers=1),
        loss=LossConfig(focal_ce_weight=1.0 if name == "pft" else 0.0),
    )
    model, criterion = build_model(cfg), build_criterion(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    images, label_maps, targets = one_batch()
    start = time.perf_counter()
    miou, steps = 0.0, 0
    while time.perf_counter() - start < TIME_LIMIT_S and miou < 1.0:
        model.train()
        for _ in range(10):
            losses = criterion(model(images), targets)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
        steps += 10
        model.eval()
        with torch.no_grad():
            prediction = predict(name, model(images), (64, 64))
        confusion = ConfusionMatrix(NUM_CLASSES)
        confusion.update(prediction, label_maps)
        miou = confusion.results()["miou"]
    elapsed = time.perf_counter() - start
    assert miou == 1.0, f"{name}: mIoU {miou:.4f} after {steps} steps ({elapsed:.1f} s)"
    assert elapsed < TIME_LIMIT_S
