"""Parameter groups (backbone lr multiplier, no decay on norms/biases/embeddings) and the schedules
(poly, mmcv's step), with the step schedule's pre-flight checks."""

import pytest
import torch
from torch import nn

from launcher.config import ConfigError, TrainConfig, config_from_dict
from launcher.optim import build_optimizer, build_param_groups, build_scheduler, lr_factor
from launcher.preflight import check_lr_schedule


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


def step_config(**overrides) -> TrainConfig:
    settings = dict(lr=1.0, max_steps=100, lr_schedule="step", lr_steps=[30, 60], lr_step_factor=0.1)
    return TrainConfig(**{**settings, **overrides})


def test_step_schedule_has_mmcv_semantics():
    # mmcv's StepLrUpdaterHook: at iteration s >= step[i] (0-based) the lr is base * gamma ** (i + 1).
    cfg = step_config()
    check_lr_schedule(cfg)
    expected = {0: 1.0, 29: 1.0, 30: 0.1, 31: 0.1, 59: 0.1, 60: 0.01, 61: 0.01, 99: 0.01, 100: 0.01}
    for step, factor in expected.items():
        assert lr_factor(step, cfg) == pytest.approx(factor), step


def test_warmup_then_step():
    cfg = step_config(warmup_steps=10, lr_steps=[50], lr_step_factor=0.5)
    check_lr_schedule(cfg)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(4, cfg) == pytest.approx(0.5)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)  # warm-up over: the step schedule's base
    assert lr_factor(49, cfg) == pytest.approx(1.0)
    assert lr_factor(50, cfg) == pytest.approx(0.5)
    # A decay step right where the warm-up ends is allowed.
    cfg = step_config(warmup_steps=10, lr_steps=[10])
    check_lr_schedule(cfg)
    assert [lr_factor(s, cfg) for s in (9, 10)] == pytest.approx([1.0, 0.1])


def test_step_schedule_through_the_scheduler():
    cfg = step_config(lr=1e-3, max_steps=10, lr_steps=[4], backbone_lr_multiplier=0.1)
    optimizer = build_optimizer(Toy(), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    seen = []
    for _ in range(6):
        seen.append({g["name"]: g["lr"] for g in optimizer.param_groups})  # the lr this step uses
        optimizer.step()
        scheduler.step()
    assert [lrs["head"] for lrs in seen] == pytest.approx([1e-3] * 4 + [1e-4] * 2)
    assert [lrs["backbone"] for lrs in seen] == pytest.approx([1e-4] * 4 + [1e-5] * 2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(lr_steps=[]), r"train.lr_steps: train.lr_schedule=step needs at least one step, got \[\]"),
        (dict(lr_steps=[60, 30]), r"train.lr_steps: expected strictly increasing steps, got \[60, 30\]"),
        (dict(lr_steps=[30, 30]), r"train.lr_steps: expected strictly increasing steps, got \[30, 30\]"),
        (dict(lr_steps=[0, 30]), r"train.lr_steps: expected steps in \(0, train.max_steps=100\), got \[0, 30\]"),
        (dict(lr_steps=[-5]), r"train.lr_steps: expected steps in \(0, train.max_steps=100\), got \[-5\]"),
        (dict(lr_steps=[30, 100]), r"train.lr_steps: expected steps in \(0, train.max_steps=100\), got \[30, 100\]"),
        (dict(lr_steps=[5], warmup_steps=10), r"train.lr_steps: step 5 falls inside the warm-up"),
        (dict(lr_step_factor=0.0), r"train.lr_step_factor: expected a value in \(0, 1\], got 0.0"),
        (dict(lr_step_factor=1.5), r"train.lr_step_factor: expected a value in \(0, 1\], got 1.5"),
        (dict(lr_step_factor=-0.1), r"train.lr_step_factor: expected a value in \(0, 1\], got -0.1"),
        (dict(lr_schedule="poly"), r"train.lr_steps: \[30, 60\] is set but train.lr_schedule is 'poly'"),
    ],
)
def test_bad_step_schedules_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_lr_schedule(step_config(**overrides))
    assert "\n" not in str(err.value)


def test_schedule_keys_load_from_yaml():
    cfg = config_from_dict({"train": {"lr_schedule": "step", "lr_steps": [126000], "lr_step_factor": 0.1}})
    assert (cfg.train.lr_schedule, cfg.train.lr_steps, cfg.train.lr_step_factor) == ("step", [126000], 0.1)
    check_lr_schedule(cfg.train)
    check_lr_schedule(TrainConfig())  # the default (poly, no steps) passes
    with pytest.raises(ConfigError, match=r"train.lr_schedule: expected one of 'poly', 'step', got str 'cosine'"):
        config_from_dict({"train": {"lr_schedule": "cosine"}})


def test_lr_multipliers_by_name_fragment_longest_first():
    class Deformable(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(2, 2)
            self.sampling_offsets = nn.Linear(4, 4)
            self.sampling_offsets_extra = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

    cfg = TrainConfig(lr=1e-3, weight_decay=0.0, backbone_lr_multiplier=0.1,
                      lr_multipliers={"sampling_offsets": 0.1, "sampling_offsets_extra": 0.5})  # fmt: skip
    groups = {g["name"]: g for g in build_param_groups(Deformable(), cfg)}
    assert {name: g["lr"] for name, g in groups.items()} == pytest.approx(
        {"backbone": 1e-4, "head": 1e-3, "head_x0.1": 1e-4, "head_x0.5": 5e-4}
    )
    assert [p.shape for p in groups["head_x0.1"]["params"]] == [(4, 4), (4,)]
    # A typo would silently train at the full rate: it is refused.
    cfg.lr_multipliers = {"sampling_offset_typo": 0.1}
    with pytest.raises(ValueError, match="train.lr_multipliers: 'sampling_offset_typo' matches no trainable"):
        build_param_groups(Deformable(), cfg)


@pytest.mark.parametrize("multipliers", [{"x": 0.0}, {"x": -1.0}, {"": 0.1}])
def test_bad_lr_multipliers_are_named(multipliers):
    with pytest.raises(ConfigError, match="train.lr_multipliers: expected a non-empty name fragment"):
        check_lr_schedule(TrainConfig(lr_multipliers=multipliers))
    cfg = config_from_dict({"train": {"lr_multipliers": {"sampling_offsets": 0.1}}})
    assert cfg.train.lr_multipliers == {"sampling_offsets": 0.1}
