"""The paper presets have the papers' sizes: MaskFormer totals within 5% of seed 002's
ADE20K table (models built on the meta device: shapes only, no memory, < 1 s each)."""

import os

import ops.torchvision_fix  # noqa: F401  (before timm)

# isort: split
import pytest
import torch

from launcher.config import load_config
from model.build import build_model

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# Seed 002, "Semantic segmentation on ADE20K val with 150 categories", #params.
PAPER_PARAMS = {
    "maskformer_r50_ade20k.yaml": 41e6,
    "maskformer_r101_ade20k.yaml": 60e6,
    "maskformer_swin_t_ade20k.yaml": 42e6,
    "maskformer_swin_s_ade20k.yaml": 63e6,
    "maskformer_swin_b_ade20k.yaml": 102e6,
    "maskformer_swin_l_ade20k.yaml": 212e6,
}


def _meta_model(name: str) -> torch.nn.Module:
    cfg = load_config(os.path.join(CONFIGS, name))
    assert cfg.model.num_classes == 150 and cfg.data.reduce_zero_label
    with torch.device("meta"):
        return build_model(cfg.model)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_maskformer_presets_match_the_paper(name):
    model = _meta_model(name)
    total = _count(model)
    print(f"{name}: {total:,} parameters (paper {PAPER_PARAMS[name] / 1e6:.0f}M)")
    assert abs(total - PAPER_PARAMS[name]) <= 0.05 * PAPER_PARAMS[name], f"{name}: {total / 1e6:.2f}M"
    assert sum(_count(child) for child in model.children()) == total


def test_vit_l_preset():
    # No paper reports MaskFormer on ViT-L: the backbone alone is ViT-L/16's ~303M,
    # plus ViTDet's pyramid and the MaskFormer heads.
    model = _meta_model("maskformer_vit_l_ade20k.yaml")
    total, backbone = _count(model), _count(model.backbone)
    print(f"maskformer_vit_l_ade20k.yaml: {total:,} parameters (backbone {backbone:,})")
    assert 300e6 < _count(model.backbone.body) < 306e6
    assert model.backbone.strides == [4, 8, 16, 32]
    assert total - backbone < 15e6  # pixel decoder + transformer decoder on 256-channel maps
