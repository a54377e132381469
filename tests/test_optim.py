"""Parameter groups (backbone lr multiplier, no decay on norms/biases/embeddings) and the schedule."""

import pytest
import torch
from torch import nn

from launcher.config import TrainConfig
from launcher.optim import build_optimizer, build_param_groups, build_scheduler, lr_factor


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.query_embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 2)
        self.norm = nn.LayerNorm(4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))


def test_groups():
    cfg = TrainConfig(lr=1e-3, weight_decay=0.05, backbone_lr_multiplier=0.1)
    groups = {g["name"]: g for g in build_param_groups(Toy(), cfg)}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert groups["head"]["weight_decay"] == 0.05
    # MaskFormer's rule: conv weight and bias decay; BatchNorm weight and bias don't
    assert len(groups["backbone"]["params"]) == 2 and len(groups["backbone_no_decay"]["params"]) == 2
    # head: Linear weight and bias decay; LayerNorm, the query embedding and pos_embed don't
    assert len(groups["head"]["params"]) == 2 and len(groups["head_no_decay"]["params"]) == 4


def test_warmup_then_poly():
    cfg = TrainConfig(lr=1.0, max_steps=100, warmup_steps=10, poly_power=0.9)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(50, cfg) == pytest.approx(0.5**0.9)
    assert lr_factor(100, cfg) == 0.0
    model = Toy()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, TrainConfig(lr=1.0, max_steps=100, backbone_lr_multiplier=0.1))
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["head"] == pytest.approx(0.5**0.9)
    assert lrs["backbone"] == pytest.approx(0.1 * 0.5**0.9)
    assert isinstance(optimizer, torch.optim.AdamW)
