"""The paper presets have the papers' sizes: MaskFormer and PFT totals within 5% of the
ADE20K tables of seeds 002 and 000 (models built on the meta device: shapes only, no
memory, < 1 s each). Totals are printed (``pytest -s``) for the record."""

import os

import ops.torchvision_fix  # noqa: F401  (before timm)

# isort: split
import pytest
import torch

from launcher.config import load_config
from launcher.describe import count_parameters
from model.build import build_model

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# "#params." of the ADE20K tables: seed 002 (MaskFormer) and seed 000 (PFT).
PAPER_PARAMS = {
    "maskformer_r50_ade20k.yaml": 41e6,
    "maskformer_r101_ade20k.yaml": 60e6,
    "maskformer_swin_t_ade20k.yaml": 42e6,
    "maskformer_swin_s_ade20k.yaml": 63e6,
    "maskformer_swin_b_ade20k.yaml": 102e6,
    "maskformer_swin_l_ade20k.yaml": 212e6,
    "pft_r50_ade20k.yaml": 74e6,
    "pft_r101_ade20k.yaml": 93e6,
    "pft_swin_t_ade20k.yaml": 74e6,
    "pft_swin_s_ade20k.yaml": 96e6,
    "pft_swin_b_ade20k.yaml": 133e6,
    "pft_swin_l_ade20k.yaml": 242e6,
}
# Seed 000's training setting per backbone (crop 640 for the IN-22K Swin-B/L, else 512;
# 160k iterations everywhere).
PFT_CROP = {"r50": 512, "r101": 512, "swin_t": 512, "swin_s": 512, "swin_b": 640, "swin_l": 640}
# ViT-L/16 without its classification head: 303.3M (timm's vit_large_patch16_224 has
# 304.3M with the 1000-class head). No paper reports either model on ViT-L.
VIT_L_PARAMS = 303.3e6


def _meta_model(name: str) -> torch.nn.Module:
    cfg = load_config(os.path.join(CONFIGS, name))
    assert cfg.model.num_classes == 150 and cfg.data.reduce_zero_label
    with torch.device("meta"):
        return build_model(cfg.model)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_presets_match_the_paper(name):
    model = _meta_model(name)
    total = _count(model)
    paper = PAPER_PARAMS[name]
    print(f"{name}: {total:,} parameters (paper {paper / 1e6:.0f}M, {100 * (total / paper - 1):+.1f}%)")
    assert abs(total - paper) <= 0.05 * paper, f"{name}: {total / 1e6:.2f}M vs {paper / 1e6:.0f}M"
    assert sum(_count(child) for child in model.children()) == total


@pytest.mark.parametrize("preset", sorted(PFT_CROP))
def test_pft_presets_use_the_papers_setting(preset):
    cfg = load_config(os.path.join(CONFIGS, f"pft_{preset}_ade20k.yaml"))
    assert cfg.model.name == "pft" and cfg.model.num_classes == 150
    assert cfg.data.crop_size == PFT_CROP[preset] and cfg.train.max_steps == 160_000


@pytest.mark.parametrize("family", ["maskformer", "pft"])
def test_vit_l_presets(family):
    name = f"{family}_vit_l_ade20k.yaml"
    model = _meta_model(name)
    total, backbone, body = _count(model), _count(model.backbone), _count(model.backbone.body)
    print(f"{name}: {total:,} parameters (ViT-L body {body:,}, backbone with pyramid {backbone:,})")
    assert abs(body / VIT_L_PARAMS - 1) <= 0.01, f"ViT-L body {body / 1e6:.2f}M vs {VIT_L_PARAMS / 1e6:.1f}M"
    assert model.backbone.strides == [4, 8, 16, 32]
    # Pixel decoder + MaskFormer's decoder (~10M) or PFT's four per-scale decoders (~40M)
    # on the pyramid's 256-channel maps.
    heads = total - backbone
    assert heads < (15e6 if family == "maskformer" else 50e6), f"{name}: heads {heads / 1e6:.1f}M"


README = os.path.join(os.path.dirname(CONFIGS), "README.md")
TABLE_BACKBONES = {"R50": "r50", "R101": "r101", "Swin-T": "swin_t", "Swin-S": "swin_s", "Swin-B": "swin_b",
                   "Swin-L": "swin_l", "ViT-L": "vit_l"}


def test_readme_table_matches_describe():
    # The README's preset table shows what `describe` prints (its "total" line, frozen BN
    # affine included, in M with one decimal), so count as describe does.
    with open(README) as f:
        rows = [line.split("|")[1:-1] for line in f if line.startswith("| ") and line.split("|")[1].strip() in TABLE_BACKBONES]
    assert len(rows) == len(TABLE_BACKBONES)
    for backbone, maskformer, _, pft, _ in (map(str.strip, row) for row in rows):
        for family, shown in (("maskformer", maskformer), ("pft", pft)):
            total = count_parameters(_meta_model(f"{family}_{TABLE_BACKBONES[backbone]}_ade20k.yaml"))["total"]
            assert shown == f"{total / 1e6:.1f}M", f"README {family} {backbone}: {shown} vs describe {total / 1e6:.1f}M"
