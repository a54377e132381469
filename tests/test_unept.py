"""UN-EPT (seed 001): output shapes, boundary targets from label maps, the logit shift of
boundary refinement, the losses and a one-batch overfit on CPU."""

import ops.torchvision_fix  # noqa: F401  (before timm)

# isort: split
import os
import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt
from test_overfit import one_batch  # tests/ is on sys.path under pytest

from data_pipeline.boundary_targets import DIRECTION_VECTORS, boundary_targets, direction_bin
from launcher.config import load_config
from launcher.describe import describe_model
from launcher.evaluate import ConfusionMatrix
from launcher.preflight import check_lr_schedule
from model.build import build_criterion, build_model
from model.config import BackboneConfig, ModelConfig, UNEPTConfig
from model.inference import semantic_segmentation
from model.unept_criterion import targets_to_semantic
from model.unept_heads import refine_logits

LEFT, UP, RIGHT, DOWN = 0, 2, 4, 6
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def tiny_config(backbone: str = "test_resnet", **unept) -> ModelConfig:
    out_indices = [-1] if "vit" in backbone else [2, 3, 4]
    settings = dict(
        hidden_dim=32,
        nheads=2,
        num_points=4,
        enc_layers=1,
        dec_layers=1,
        dim_feedforward=64,
        dropout=0.0,
        query_grid=8,
    )
    return ModelConfig(
        name="unept",
        num_classes=4,
        # Trained from scratch: frozen BN would pin a random network's identity statistics.
        backbone=BackboneConfig(name=backbone, out_indices=out_indices, freeze_bn=False, pyramid_channels=32),
        unept=UNEPTConfig(**{**settings, **unept}),
    )


def targets_of(label_maps: torch.Tensor) -> list[dict]:
    targets = []
    for label_map in label_maps:
        labels = label_map.unique()
        labels = labels[labels != 255]
        targets.append({"labels": labels, "masks": label_map[None] == labels[:, None, None]})
    return targets


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_output_shapes(backbone):
    torch.manual_seed(0)
    model = build_model(tiny_config(backbone))
    assert model.backbone.strides == [8, 16, 32]  # the ViT pyramid loses its stride-4 level
    if backbone == "test_vit":
        assert len(model.backbone.pyramid.levels) == 3
    images = torch.rand(2, 3, 60, 76) * 255  # not multiples of 8: stride-8 grid is 8×10
    outputs = model(images)
    assert outputs["sem_logits"].shape == (2, 4, 60, 76)
    assert outputs["coarse_logits"].shape == (2, 4, 60, 76)
    assert outputs["edge_logits"].shape == (2, 2, 8, 10)
    assert outputs["dir_logits"].shape == (2, 8, 8, 10)
    model.eval()
    with torch.no_grad():
        prediction = semantic_segmentation(model(images), (60, 76), rule="unept")
    assert prediction.shape == (2, 60, 76) and int(prediction.max()) < 4


def test_dilated_r50_gives_three_stride_8_maps():
    """The official backbone: mmseg's dilated ResNetV1c = timm's resnet50c, output_stride 8."""
    torch.manual_seed(0)
    cfg = tiny_config("resnet50c")
    cfg.backbone.timm_kwargs = {"output_stride": 8}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resnet50c *is* UN-EPT's V1c: no MaskFormer "c"-stem warning
        model = build_model(cfg)
    assert model.backbone.strides == [8, 8, 8] and model.backbone.channels == [512, 1024, 2048]
    assert model.backbone.pyramid is None and model.backbone.size_divisibility == 8
    # Deep stem 32-32-64, and mmseg's contract_dilation: res4/res5 dilated 2/4, each
    # stage's first block at the previous dilation.
    body = model.backbone.body
    assert [m.out_channels for m in body.conv1 if isinstance(m, torch.nn.Conv2d)] == [32, 32, 64]
    assert [b.conv2.dilation[0] for b in body.layer3] == [1, 2, 2, 2, 2, 2]
    assert [b.conv2.dilation[0] for b in body.layer4] == [2, 4, 4]
    levels = []
    model.backbone.register_forward_hook(lambda module, args, out: levels.extend(out))
    model.eval()
    images = torch.rand(1, 3, 44, 60) * 255  # not multiples of 8: a 6×8 grid on every level
    with torch.no_grad():
        outputs = model(images)
    assert [tuple(f.shape) for f in levels] == [(1, 512, 6, 8), (1, 1024, 6, 8), (1, 2048, 6, 8)]
    assert outputs["sem_logits"].shape == outputs["coarse_logits"].shape == (1, 4, 44, 60)
    assert outputs["edge_logits"].shape == (1, 2, 6, 8) and outputs["dir_logits"].shape == (1, 8, 6, 8)
    assert torch.isfinite(outputs["sem_logits"]).all()


def test_only_unept_reads_equal_strides():
    cfg = tiny_config()
    cfg.name = "maskformer"
    cfg.backbone.timm_kwargs = {"output_stride": 8}
    with pytest.raises(ValueError, match=r"strides \[8, 8, 8\]; model.name=maskformer needs strictly increasing"):
        build_model(cfg)


def test_backbone_must_give_num_levels_maps():
    cfg = tiny_config()
    cfg.backbone.out_indices = [1, 2, 3, 4]
    with pytest.raises(ValueError, match="num_levels"):
        build_model(cfg)


def test_direction_bins_follow_the_vector_table():
    for index, (dy, dx) in enumerate(DIRECTION_VECTORS):
        assert direction_bin(dy, dx) == index


def test_vertical_split_gives_a_band_and_outward_directions():
    sem = torch.full((12, 20), 1)
    sem[:, 10:] = 2
    edge, direction = boundary_targets(sem, radius=3)
    band = (edge == 1).all(0)
    assert band.nonzero().flatten().tolist() == [7, 8, 9, 10, 11, 12]  # 3 pixels each side
    assert (edge[:, :7] == 0).all() and (edge[:, 13:] == 0).all()
    # Pointing away from the other segment: left of the boundary left, right of it right.
    assert (direction[:, 7:10] == LEFT).all() and (direction[:, 10:13] == RIGHT).all()
    assert (direction[:, :7] == 255).all() and (direction[:, 13:] == 255).all()


def test_horizontal_split_points_up_and_down_and_batches():
    sem = torch.zeros(2, 10, 6, dtype=torch.long)
    sem[:, 5:] = 3
    sem[1] = 7  # one class only: no boundary at all
    edge, direction = boundary_targets(sem, radius=2)
    assert (edge[0, 3:7] == 1).all() and (edge[0, :3] == 0).all() and (edge[0, 7:] == 0).all()
    assert (direction[0, 3:5] == UP).all() and (direction[0, 5:7] == DOWN).all()
    assert (edge[1] == 0).all() and (direction[1] == 255).all()


def test_ignore_pixels_make_no_edges():
    sem = torch.full((10, 10), 4)
    sem[:, 4:6] = 255  # an ignored band (or crop padding) between two parts of one class
    sem[8:, :] = 255
    edge, direction = boundary_targets(sem, radius=3)
    assert (edge[sem == 255] == 255).all() and (edge[sem != 255] == 0).all()
    assert (direction == 255).all()
    sem[:, 6:] = 5  # a real label change across the ignored band: edges within 3 pixels
    edge, _ = boundary_targets(sem, radius=3)
    assert (edge[:8, 3] == 1).all() and (edge[:8, 6] == 1).all() and (edge[:8, 0] == 0).all()


def test_edges_match_a_euclidean_distance_transform():
    rng = np.random.default_rng(0)
    sem = rng.integers(0, 3, size=(6, 7)).repeat(6, 0).repeat(6, 1)  # 36×42, blocks of 6
    sem[rng.random(sem.shape) < 0.05] = 255
    radius = 4
    expected = np.zeros(sem.shape, dtype=bool)
    for c in range(3):
        others = (sem != c) & (sem != 255)  # the nearest *different valid* label
        distance = distance_transform_edt(~others) if others.any() else np.full(sem.shape, np.inf)
        expected |= (sem == c) & (distance <= radius)
    edge, _ = boundary_targets(torch.from_numpy(sem), radius=radius)
    assert torch.equal(edge == 1, torch.from_numpy(expected))
    assert (edge[torch.from_numpy(sem == 255)] == 255).all()


def test_refinement_reads_logits_along_the_predicted_direction():
    logits = torch.arange(2 * 5 * 6, dtype=torch.float32).view(1, 2, 5, 6)
    edge = torch.zeros(1, 2, 5, 6)
    edge[0, 1, 2, 2] = 5.0  # (2, 2) and (1, 5) are edges
    edge[0, 1, 1, 5] = 5.0
    direction = torch.zeros(1, 8, 5, 6)
    direction[0, RIGHT, 2, 2] = 1.0  # (2, 2) looks right
    direction[0, RIGHT, 1, 5] = 1.0  # (1, 5) looks right, off the image: clamped
    direction[0, DOWN, 0, 0] = 1.0  # not an edge: ignored
    refined = refine_logits(logits, edge, direction, distance=2)
    expected = logits.clone()
    expected[0, :, 2, 2] = logits[0, :, 2, 4]
    expected[0, :, 1, 5] = logits[0, :, 1, 5]
    assert torch.equal(refined, expected)
    direction[0, UP, 2, 2] = 2.0  # now up: one pixel
    refined = refine_logits(logits, edge, direction, distance=1)
    assert torch.equal(refined[0, :, 2, 2], logits[0, :, 1, 2])
    assert torch.equal(refined[0, :, 0, 0], logits[0, :, 0, 0])


def test_targets_round_trip_to_the_label_map():
    sem = torch.tensor([[[0, 0, 2], [255, 2, 2]], [[1, 1, 1], [1, 255, 3]]])
    assert torch.equal(targets_to_semantic(targets_of(sem), (2, 3)), sem)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 2, 3, dtype=torch.bool)}]
    assert (targets_to_semantic(empty, (2, 3)) == 255).all()


def test_losses_are_finite_without_edges_or_labels():
    torch.manual_seed(0)
    cfg = tiny_config()
    model, criterion = build_model(cfg), build_criterion(cfg)
    sem = torch.full((2, 32, 32), 255)
    sem[0] = 1  # one image of a single class (no edge), one all ignored
    losses = criterion(model(torch.rand(2, 3, 32, 32) * 255), targets_of(sem))
    assert set(losses) == {"loss_ce", "loss_refined", "loss_edge", "loss_dir"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_dir"] == 0 and losses["loss_ce"] > 0


def test_tiny_unept_overfits_one_batch():
    """Bands of colour, as tests/test_overfit.py: 2 images 64×64, AdamW lr 1e-3."""
    torch.manual_seed(0)
    images, sem, targets = one_batch()
    cfg = tiny_config()
    model, criterion = build_model(cfg), build_criterion(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    history = []
    for _ in range(STEPS):
        losses = criterion(model(images), targets)
        history.append({k: v.item() for k, v in losses.items()})
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    first, last = sum(history[0].values()), sum(history[-1].values())
    assert last < first / 4, f"loss {first:.3f} -> {last:.3f}: {history[0]} -> {history[-1]}"
    assert history[-1]["loss_edge"] < history[0]["loss_edge"] / 2
    model.eval()
    with torch.no_grad():
        prediction = semantic_segmentation(model(images), (64, 64), rule="unept")
    confusion = ConfusionMatrix(4)
    confusion.update(prediction, sem)
    assert confusion.results()["miou"] > 0.9


STEPS = 60


@pytest.mark.parametrize("dataset,classes,crop", [("ade20k", 150, 480), ("cityscapes", 19, 768)])
@pytest.mark.parametrize("backbone", ["r50", "deit_b"])
def test_presets_describe(backbone, dataset, classes, crop):
    cfg = load_config(os.path.join(CONFIGS, f"unept_{backbone}_{dataset}.yaml"))
    u = cfg.model.unept
    assert (cfg.model.name, cfg.model.num_classes, cfg.data.crop_size) == ("unept", classes, crop)
    assert (u.num_levels, u.num_points, u.nheads, u.hidden_dim, u.query_grid) == (3, 16, 8, 256, crop // 8)
    # R50: the official dilated ResNetV1c (res3..res5 at stride 8); DeiT-B undoes that key.
    if backbone == "r50":
        assert (cfg.model.backbone.name, cfg.model.backbone.timm_kwargs) == ("resnet50c", {"output_stride": 8})
    with torch.device("meta"):
        strides = build_model(cfg.model).backbone.strides
    assert strides == ([8, 8, 8] if backbone == "r50" else [8, 16, 32])
    # The official step schedule: x0.1 at 126k of 160k (Cityscapes: the same fraction of 80k).
    t = cfg.train
    steps, max_steps = ([126000], 160000) if dataset == "ade20k" else ([63000], 80000)
    assert (t.lr_schedule, t.lr_steps, t.lr_step_factor, t.max_steps) == ("step", steps, 0.1, max_steps)
    check_lr_schedule(t)
    cfg.data.crop_size, cfg.data.batch_size = 64, 1  # the fake-tensor trace at a small size
    desc = describe_model(cfg)
    backbone_params = desc["components"]["backbone"]
    # Head: 2+2 deformable layers, projections, 60² or 96² query embeddings, heads (~8-10M).
    assert 6e6 < desc["total"] - backbone_params < 12e6
    # R50: 23.53M, timm's resnet50c (the V1c deep stem: 19k more than resnet50's 7x7 stem;
    # dilation adds no weights).
    assert (20e6 < backbone_params < 26e6) if backbone == "r50" else (85e6 < backbone_params < 92e6)
    assert desc["memory"]["activations"] > 0 and desc["memory"]["loss_activations"] > 0
