"""The semantic-only datasets as thin definitions over ``paired``: layout, labels, classes.

Labels are sharded as each dataset defines them where a training config can undo the
convention at load time (ADE20K and Pascal-Context keep label 0 = "other"/background and
expect ``data.reduce_zero_label: true``, so the manifest lists that class first), and
mapped here where the stored ids are not training ids at all (Cityscapes labelIds ->
19 train ids, COCO-Stuff's 182 ids with gaps -> 171 contiguous classes). Every Source
records the root, the split folder and that convention in its options (manifest
"source").
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from data_pipeline.formats import class_names
from data_pipeline.formats.common import (
    IGNORE,
    FormatError,
    read_index_label,
    require_dir,
    require_file,
    warn,
)
from data_pipeline.formats.paired import LabelSpec, Layout, make_lut, pair_files, paired_source
from data_pipeline.shard_writer import Source

PathLike = str | os.PathLike[str]

# cityscapesScripts labels.py: labelId -> trainId for the 19 evaluated classes.
CITYSCAPES_TRAIN_IDS: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CITYSCAPES_NUM_LABEL_IDS = 34  # labelIds 0..33

# COCO category ids 1..182 that no annotation uses (thing ids skipped by COCO 2017).
COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
# stuffthingmaps pixel = COCO-Stuff id - 1; the 171 used ones in order -> 0..170, as in
# mmsegmentation's tools/dataset_converters/coco_stuff164k.py (clsID_to_trID).
COCO_STUFF_IDS: dict[int, int] = {
    pixel: i for i, pixel in enumerate(cid - 1 for cid in range(1, 183) if cid not in COCO_UNUSED_IDS)
}
COCO_STUFF_NUM_VALUES = 182

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# ADE20K and COCO-Stuff ship JPEGs; a PNG (or .JPG) someone converted or renamed is still
# that image, so it is sharded too (re-encoded losslessly) rather than left out.
PHOTOS = Layout(IMAGE_SUFFIXES, lambda p: p.with_suffix(".png"))


def _split_folder(split: str, aliases: dict[str, str]) -> str:
    return aliases.get(split, split)


def ade20k_source(root: PathLike, split: str, num_samples: int | None = None) -> Source:
    """``ADEChallengeData2016/{images,annotations}/{training,validation}``; split train/val."""
    base = require_dir(Path(root) / "ADEChallengeData2016", "ADE20K ADEChallengeData2016")
    folder = _split_folder(split, {"train": "training", "val": "validation"})
    images = require_dir(base / "images" / folder, f"ADE20K {split} images")
    labels = require_dir(base / "annotations" / folder, f"ADE20K {split} annotations")
    pairs = pair_files(images, labels, PHOTOS)
    options = {"root": str(root), "split_folder": folder, "labels": "0 = other, 1..150 = classes",
               "reduce_zero_label": True}  # fmt: skip
    spec = LabelSpec(num_values=151, void=(0, IGNORE))
    return paired_source("ade20k", ["other", *class_names.ADE20K], pairs, spec, options, num_samples)


def cityscapes_source(root: PathLike, split: str, num_samples: int | None = None) -> Source:
    """``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` + ``gtFine/...`` labelIds -> train ids."""
    images = require_dir(Path(root) / "leftImg8bit" / split, f"Cityscapes {split} leftImg8bit")
    labels = require_dir(Path(root) / "gtFine" / split, f"Cityscapes {split} gtFine")
    suffix = "_leftimg8bit.png"
    # gtFine also holds *_color.png, *_instanceIds.png and polygons: only labelIds are labels here.
    layout = Layout((suffix,), lambda p: p.with_name(p.name[: -len(suffix)] + "_gtFine_labelIds.png"),
                    label_endings=("_gtfine_labelids.png",), depth="*/*")  # fmt: skip
    pairs = pair_files(images, labels, layout)
    options = {"root": str(root), "split_folder": split,
               "labels": "gtFine labelIds mapped to the 19 train ids, others 255",
               "reduce_zero_label": False}  # fmt: skip
    spec = LabelSpec(num_values=CITYSCAPES_NUM_LABEL_IDS, lut=make_lut(CITYSCAPES_TRAIN_IDS))
    return paired_source("cityscapes", list(class_names.CITYSCAPES), pairs, spec, options, num_samples)


def coco_stuff_source(root: PathLike, split: str, num_samples: int | None = None) -> Source:
    """COCO-Stuff 164k: ``images/<split>2017`` + ``stuffthingmaps_trainval2017/<split>2017``."""
    folder = _split_folder(split, {"train": "train2017", "val": "val2017"})
    images = require_dir(Path(root) / "images" / folder, f"COCO-Stuff {split} images")
    labels = require_dir(Path(root) / "stuffthingmaps_trainval2017" / folder, f"COCO-Stuff {split} labels")
    pairs = pair_files(images, labels, PHOTOS)
    options = {"root": str(root), "split_folder": folder,
               "labels": "stuffthingmaps (id - 1) mapped to 171 contiguous classes, unused ids 255",
               "reduce_zero_label": False}  # fmt: skip
    spec = LabelSpec(num_values=COCO_STUFF_NUM_VALUES, lut=make_lut(COCO_STUFF_IDS))
    return paired_source("coco_stuff", list(class_names.COCO_STUFF), pairs, spec, options, num_samples)


def pascal_context_source(root: PathLike, split: str, num_samples: int | None = None) -> Source:
    """mmsegmentation's Pascal-Context 59 layout under ``VOCdevkit/VOC2010``; stems from ImageSets."""
    base = require_dir(Path(root) / "VOCdevkit" / "VOC2010", "Pascal-Context VOCdevkit/VOC2010")
    images = require_dir(base / "JPEGImages", "Pascal-Context JPEGImages")
    labels = require_dir(base / "SegmentationClassContext", "Pascal-Context SegmentationClassContext")
    listing = require_file(base / "ImageSets" / "SegmentationContext" / f"{split}.txt", f"{split} split list")
    stems = sorted({line.strip() for line in listing.read_text().splitlines() if line.strip()})
    if not stems:
        raise FormatError(f"{listing}: empty split list, expected one image stem per line")
    # JPEGImages holds every VOC image, most of them in no Context split: only the listed
    # ones matter, found by stem with the extension in any case (.jpg, .JPG, .jpeg, .png).
    by_stem = {(p.stem, p.suffix.lower()): p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    pairs = []
    for stem in stems:
        label = labels / f"{stem}.png"
        found = [by_stem[stem, ext] for ext in IMAGE_SUFFIXES if (stem, ext) in by_stem]
        image = found[0] if found else require_file(images / f"{stem}.jpg", f"image listed in {listing.name}")
        if len(found) > 1:
            raise FormatError(f"{found[0]}: {listing.name} lists {stem!r}, which {found[1].name} has as "
                              "its stem too; keep one of them")  # fmt: skip
        if not label.is_file():
            raise FormatError(f"{image}: no label, expected {label}")
        pairs.append((str(image), str(label)))
    options = {"root": str(root), "split_folder": f"ImageSets/SegmentationContext/{split}.txt",
               "labels": "0 = background, 1..59 = classes", "reduce_zero_label": True}  # fmt: skip
    spec = LabelSpec(num_values=60, void=(0, IGNORE))
    classes = ["background", *class_names.PASCAL_CONTEXT_59]
    return paired_source("pascal_context", classes, pairs, spec, options, num_samples)


def _folder_classes(root: Path, pairs: list[tuple[str, str]]) -> tuple[list[str], str]:
    """Names from ``classes.txt`` if present, else ``class_0..class_{max}`` from a scan."""
    listing = root / "classes.txt"
    if listing.is_file():
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not 1 <= len(names) <= IGNORE:
            raise FormatError(f"{listing}: expected 1..{IGNORE} class names, one per line, got {len(names)}")
        return names, str(listing)
    top = 0
    for image, label in pairs:
        try:
            shape = Image.open(image).size[::-1]
        except OSError as exn:
            raise FormatError(f"{image}: cannot read image: {exn}") from None
        values = read_index_label(Path(label), shape)
        values = values[values != IGNORE]
        top = max(top, int(values.max()) if values.size else 0)
    return [f"class_{i}" for i in range(top + 1)], "inferred (max label + 1)"


def _warn_inferred(root: Path, split: str, classes: list[str]) -> None:
    """Each split infers its own count, and training refuses manifests that disagree."""
    warn(f"{root / 'classes.txt'} not found: inferred {len(classes)} classes (largest label in the {split} "
         f"masks + 1); another split may infer a different count, which training refuses - write "
         "classes.txt (one class name per line, line i = label value i) so every split agrees")  # fmt: skip


def folder_source(root: PathLike, split: str, num_samples: int | None = None) -> Source:
    """``ROOT/images/<split>/*.{jpg,jpeg,png}`` + ``ROOT/masks/<split>/<stem>.png`` index masks.

    Classes come from ``ROOT/classes.txt`` (one name per line, index = label value) or,
    without it, from the largest label found (which reads every mask once up front).
    """
    base = require_dir(Path(root), "dataset root")
    images = require_dir(base / "images" / split, f"{split} images")
    masks = require_dir(base / "masks" / split, f"{split} masks")
    pairs = pair_files(images, masks, PHOTOS)
    classes, origin = _folder_classes(base, pairs)
    if origin.startswith("inferred"):
        _warn_inferred(base, split, classes)
    options = {"root": str(root), "split_folder": split, "classes_from": origin,
               "labels": "as stored, 255 = ignore", "reduce_zero_label": False}  # fmt: skip
    spec = LabelSpec(num_values=len(classes))
    return paired_source("folder", classes, pairs, spec, options, num_samples)
