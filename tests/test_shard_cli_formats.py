"""``python -m data_pipeline shard --format <dataset>`` end to end on fixture trees."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_formats import (  # tests/ is on sys.path
    ade_tree,
    folder_tree,
    labels_like,
    panoptic_tree,
    pascal_tree,
    write_image,
    write_label,
)

from data_pipeline.cli import main
from data_pipeline.config import DataConfig
from data_pipeline.loader import build_eval_loader, decode_sample
from data_pipeline.loader_io import ShardReadError
from data_pipeline.manifest import load_manifest
from data_pipeline.shard_writer import decode_panoptic

REPO = Path(__file__).resolve().parents[1]


def shard(fmt: str, root: Path, split: str, out: Path, *extra: str) -> int:
    return main(["shard", "--format", fmt, "--root", str(root), "--split", split, "--out", str(out), *extra])


def members(tar_path: str) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_ade20k_shards_jpeg_bytes_and_loads_with_reduce_zero_label(tmp_path, capsys):
    base = ade_tree(tmp_path / "ade")
    assert (
        shard("ade20k", tmp_path / "ade", "train", tmp_path / "out", "--max-count", "1", "--workers", "2")
        == 0
    )
    manifest = load_manifest(tmp_path / "out/train-manifest.json")
    assert manifest.format == "ade20k" and manifest.num_samples == 2 and len(manifest.shards) == 2
    assert manifest.source["reduce_zero_label"] is True and len(manifest.classes) == 151
    raw = members(manifest.shard_paths()[1])
    assert sorted(raw) == ["train_00000001.jpg", "train_00000001.json", "train_00000001.pan.png",
                           "train_00000001.seg.png"]  # fmt: skip
    assert raw["train_00000001.jpg"] == (base / "images/training/ADE_train_00000002.jpg").read_bytes()
    sample = {"__key__": "train_00000001", "__url__": "x", **{k.split(".", 1)[1]: v for k, v in raw.items()}}
    image, labels = decode_sample(sample, reduce_zero=True)
    assert tuple(image.shape) == (3, 6, 8)
    stored = np.resize(np.array([0, 1, 150, 7]), 48).reshape(6, 8)
    np.testing.assert_array_equal(labels.numpy(), np.where(stored == 0, 255, stored - 1))
    assert "wrote 2 train samples" in capsys.readouterr().out


def test_pascal_context_and_folder_shard(tmp_path):
    pascal_tree(tmp_path / "voc")
    assert shard("pascal_context", tmp_path / "voc", "train", tmp_path / "out", "--num-samples", "1") == 0
    assert load_manifest(tmp_path / "out/train-manifest.json").num_samples == 1
    folder_tree(tmp_path / "plain", ["a", "b", "c"])
    assert shard("folder", tmp_path / "plain", "train", tmp_path / "out2") == 0
    raw = members(load_manifest(tmp_path / "out2/train-manifest.json").shard_paths()[0])
    # b.png (second by name) is a PNG dataset image: re-encoded losslessly as .png.
    assert "train_00000001.png" in raw and "train_00000000.jpg" in raw
    assert Image.open(io.BytesIO(raw["train_00000001.png"])).size == (8, 6)


def test_coco_panoptic_shards_ids_and_segments(tmp_path):
    _, ids = panoptic_tree(tmp_path / "coco")
    assert shard("coco_panoptic", tmp_path / "coco", "val", tmp_path / "out") == 0
    manifest = load_manifest(tmp_path / "out/val-manifest.json")
    assert manifest.thing_classes == [0, 1] and manifest.source["split_folder"] == "val2017"
    raw = members(manifest.shard_paths()[0])
    np.testing.assert_array_equal(
        decode_panoptic(np.asarray(Image.open(io.BytesIO(raw["val_00000000.pan.png"])))), ids
    )
    meta = json.loads(raw["val_00000000.json"])
    assert [(s["id"], s["iscrowd"]) for s in meta["segments_info"]] == [(5, 0), (70000, 0), (300, 1)]
    assert raw["val_00000000.jpg"] == (tmp_path / "coco/val2017/000000000285.jpg").read_bytes()
    # COCO's own ids are recorded: the image's, and each class's category id.
    assert meta["image_id"] == 285 and manifest.category_ids == [1, 3, 184]
    assert load_manifest(tmp_path / "out/val-manifest.json").to_json()["category_ids"] == [1, 3, 184]
    # export-panoptic names the ground truth as predict names predictions: files by source
    # stem, ids the dataset's own (predict: test_panoptic_end_to_end.py).
    assert main(["export-panoptic", str(tmp_path / "out/val-manifest.json"), "--out", str(tmp_path / "gt")]) == 0
    exported = json.loads((tmp_path / "gt/panoptic.json").read_text())
    assert [(a["image_id"], a["file_name"]) for a in exported["annotations"]] == [(285, "000000000285.png")]
    assert [(s["id"], s["category_id"]) for s in exported["annotations"][0]["segments_info"]] == [
        (5, 1), (70000, 184), (300, 3)]  # fmt: skip
    assert sorted((c["id"], c["name"]) for c in exported["categories"]) == [(1, "person"), (3, "car"),
                                                                           (184, "tree-merged")]  # fmt: skip
    np.testing.assert_array_equal(decode_panoptic(np.asarray(Image.open(tmp_path / "gt/panoptic/000000000285.png"))),
                                  ids)
    # ... so these files pair with COCO's own JSON and PNGs, as a perfect prediction.
    from launcher.cli import main as launcher_main

    coco = tmp_path / "coco/annotations"
    assert launcher_main(["eval-panoptic", "--gt-json", str(coco / "panoptic_val2017.json"), "--gt-dir",
                          str(coco / "panoptic_val2017"), "--pred-json", str(tmp_path / "gt/panoptic.json"),
                          "--pred-dir", str(tmp_path / "gt/panoptic"), "--json", str(tmp_path / "pq.json")]) == 0  # fmt: skip
    results = json.loads((tmp_path / "pq.json").read_text())
    assert results["All"]["pq"] == 1.0 and results["All"]["n"] == 2, results  # person and tree; crowd car: none


@pytest.mark.parametrize(
    "fmt, make, message",
    [
        ("ade20k", None, "--root is required for --format ade20k"),
        ("cityscapes", "empty", "leftImg8bit/train: Cityscapes train leftImg8bit folder not found"),
        ("ade20k", "range", "label value 151 out of range"),
    ],
)
def test_cli_reader_errors_are_one_line_exit_2(tmp_path, capsys, fmt, make, message):
    argv = ["shard", "--format", fmt, "--split", "train", "--out", str(tmp_path / "out")]
    if make == "empty":
        (tmp_path / "data").mkdir()
    elif make == "range":
        base = ade_tree(tmp_path / "data")
        Image.fromarray(np.full((6, 8), 151, np.uint8)).save(
            base / "annotations/training/ADE_train_00000002.png"
        )
    if make is not None:
        argv += ["--root", str(tmp_path / "data")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m data_pipeline: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out/train-manifest.json").exists()


# ------------------------------------------------- source file names (keys stay positions)


def ade_val_tree(root: Path) -> Path:
    """Two ADE20K validation images and their annotations, named as in the real dataset."""
    base = root / "ADEChallengeData2016"
    for i, (height, width) in enumerate([(6, 8), (5, 7)], start=1):
        write_image(base / f"images/validation/ADE_val_{i:08d}.jpg", height, width, seed=i)
        write_label(base / f"annotations/validation/ADE_val_{i:08d}.png", labels_like((height, width), [0, i, 150]))
    return base


def _predict(monkeypatch, manifest: Path, out: Path, *overrides: str) -> list[str]:
    """``launcher predict``'s file writing, with a stand-in model that predicts class 1 everywhere."""
    import launcher.predict as predict
    from launcher.config import load_config

    def constant(model, images, *args, **kwargs):
        scores = torch.zeros(images.shape[0], 150, *images.shape[-2:])
        scores[:, 1] = 1
        return scores

    monkeypatch.setattr(predict, "predict_semantic_scores", constant)
    cfg = load_config(str(REPO / "configs/test_tiny.yaml"),
                      [f"data.val_manifest={manifest}", "model.num_classes=150", *overrides])  # fmt: skip
    predict.write_predictions(cfg, torch.nn.Identity(), str(out), num=8)
    return sorted(p.name for p in (out / "labels").iterdir())


def test_source_file_names_reach_the_loader_errors_and_predict(tmp_path, monkeypatch):
    from launcher.eval_semantic import evaluate_label_folders

    base = ade_val_tree(tmp_path / "ade")
    assert shard("ade20k", tmp_path / "ade", "val", tmp_path / "out") == 0
    manifest = load_manifest(tmp_path / "out/val-manifest.json")
    raw = members(manifest.shard_paths()[0])
    assert json.loads(raw["val_00000000.json"])["source"] == "ADE_val_00000001"  # key unchanged

    batch = next(iter(build_eval_loader(DataConfig(val_manifest=str(manifest.path), reduce_zero_label=True), 0, 1)))
    assert batch["keys"] == ["val_00000000", "val_00000001"]
    assert batch["sources"] == ["ADE_val_00000001", "ADE_val_00000002"]

    sample = {"__key__": "val_00000000", "__url__": "x", **{k.split(".", 1)[1]: v for k, v in raw.items()
                                                           if k.startswith("val_00000000")}}  # fmt: skip
    sample["seg.png"] = b"not a png"
    with pytest.raises(ShardReadError) as err:
        decode_sample(sample)
    assert str(err.value) == "shard x: sample val_00000000 (ADE_val_00000001): .seg.png is not a decodable PNG"

    # predict names its files after the source images, so eval-semantic pairs its labels/
    # with the dataset's own annotation folder (the README's example).
    pred = tmp_path / "pred"
    names = _predict(monkeypatch, manifest.path, pred, "data.reduce_zero_label=true")
    annotations = base / "annotations/validation"
    assert names == sorted(p.name for p in annotations.iterdir()) == ["ADE_val_00000001.png", "ADE_val_00000002.png"]
    assert sorted(p.name for p in (pred / "ground_truth").iterdir()) == names
    assert sorted(p.name for p in pred.glob("*.png")) == names  # the overlays
    against_dataset = evaluate_label_folders(str(pred / "labels"), str(annotations), 150,
                                             reduce_zero_label=True, progress=False)  # fmt: skip
    against_exported = evaluate_label_folders(str(pred / "labels"), str(pred / "ground_truth"), 150, progress=False)
    assert against_dataset["images"] == 2 and against_dataset["pixels"] == 48 + 35 - 16 - 12  # label 0 ignored
    assert against_dataset == against_exported


def test_predict_names_files_by_key_for_shards_without_source_names(dataset, tmp_path, monkeypatch):
    # Synthetic samples, like shards written before sources were recorded, have none.
    names = _predict(monkeypatch, dataset / "val-manifest.json", tmp_path / "pred", "model.num_classes=5")
    assert names == [f"val_{i:08d}.png" for i in range(6)]


# ------------------------------------------------------------ every file is accounted for


@pytest.mark.parametrize("fmt", ["ade20k", "folder"])
def test_image_extensions_match_in_any_case_and_png_images_are_kept(tmp_path, fmt):
    if fmt == "ade20k":
        images = ade_tree(tmp_path / "data") / "images/training"
        labels = images.parent.parent / "annotations/training"
    else:
        folder_tree(tmp_path / "data", ["a", "b", "c"])
        images, labels = tmp_path / "data/images/train", tmp_path / "data/masks/train"
    first = sorted(images.iterdir())[0]
    first.rename(first.with_suffix(".JPG"))
    write_image(images / "zz_converted.png", 4, 4)
    write_label(labels / "zz_converted.png", labels_like((4, 4), [1]))
    assert shard(fmt, tmp_path / "data", "train", tmp_path / "out") == 0
    assert load_manifest(tmp_path / "out/train-manifest.json").num_samples == 3


def test_labels_without_images_are_an_error_and_other_files_a_warning(tmp_path, capsys):
    base = ade_tree(tmp_path / "data")
    write_label(base / "annotations/training/ADE_train_00000009.png", labels_like((6, 8), [1]))
    assert shard("ade20k", tmp_path / "data", "train", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ADE_train_00000009.png: label without an image, expected one named" in err
    (base / "annotations/training/ADE_train_00000009.png").unlink()
    # Hidden files (macOS's ._X copies, .DS_Store) are no one's data: neither error nor warning.
    (base / "annotations/training/._ADE_train_00000009.png").write_bytes(b"\0\5\x16\7")
    (base / "images/training/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    assert shard("ade20k", tmp_path / "data", "train", tmp_path / "out0") == 0
    assert "warning" not in capsys.readouterr().err
    (base / "images/training/notes.txt").write_text("not an image")
    (base / "images/training/ADE_train_00000003.gif").write_bytes(b"GIF89a")
    assert shard("ade20k", tmp_path / "data", "train", tmp_path / "out") == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warning == [f"warning: {base / 'images/training'}: left out 2 files that are not .jpg/.jpeg/.png "
                       "images: ADE_train_00000003.gif, notes.txt"]  # fmt: skip


def test_cityscapes_other_gtfine_files_are_not_labels_but_labelids_need_an_image(tmp_path, capsys):
    stem = "aachen_000000_000019"
    write_image(tmp_path / f"leftImg8bit/train/aachen/{stem}_leftImg8bit.png", 6, 8)
    write_label(tmp_path / f"gtFine/train/aachen/{stem}_gtFine_labelIds.png", labels_like((6, 8), [7]))
    write_label(tmp_path / f"gtFine/train/aachen/{stem}_gtFine_instanceIds.png", labels_like((6, 8), [7]))
    assert shard("cityscapes", tmp_path, "train", tmp_path / "out") == 0
    assert "warning" not in capsys.readouterr().err
    write_label(tmp_path / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png", labels_like((6, 8), [7]))
    assert shard("cityscapes", tmp_path, "train", tmp_path / "out2") == 2
    assert "aachen_000001_000019_gtFine_labelIds.png: label without an image" in capsys.readouterr().err


def test_folder_without_classes_txt_warns_with_the_inferred_count(tmp_path, capsys):
    folder_tree(tmp_path / "plain")
    assert shard("folder", tmp_path / "plain", "train", tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'plain/classes.txt'} not found: inferred 3 classes" in err
    assert "write classes.txt (one class name per line" in err
    (tmp_path / "plain/classes.txt").write_text("a\nb\nc\n")
    assert shard("folder", tmp_path / "plain", "train", tmp_path / "out2") == 0
    assert "warning" not in capsys.readouterr().err


def test_coco_panoptic_names_what_its_json_leaves_out(tmp_path, capsys):
    panoptic_tree(tmp_path / "coco")
    write_image(tmp_path / "coco/val2017/000000000999.jpg", 6, 8)  # in the folder, not in the JSON
    assert shard("coco_panoptic", tmp_path / "coco", "val", tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'coco/val2017'}: left out 1 file that panoptic_val2017.json does not name: " \
           "000000000999.jpg" in err


def test_prediction_file_names_never_collide():
    from data_pipeline.sample_members import output_stem

    used: set[str] = set()
    names = [output_stem(source, key, used) for source, key in
             [("x", "val_00000000"), ("x", "val_00000001"), (None, "val_00000002"), ("val_00000001", "val_00000003")]]
    # A repeated stem falls back to the key, in one batch or across batches; a stem that
    # equals a key already used is made unique too.
    assert names == ["x", "val_00000001", "val_00000002", "val_00000003"]
    assert output_stem("val_00000003", "val_00000003", used) == "val_00000003_"
    assert len(used) == 5


def test_a_source_name_that_is_no_file_name_is_left_out_with_a_warning(capsys):
    from data_pipeline.sample_encode import encode_sample
    from data_pipeline.sample_members import sample_source

    class Sample:
        image = np.zeros((4, 4, 3), np.uint8)
        semantic = np.zeros((4, 4), np.uint8)
        panoptic = np.zeros((4, 4), np.int32)
        segments: list = []
        source_name = "two\nlines"

    assert sample_source(encode_sample(Sample(), "train_00000000")) is None
    assert "warning: sample train_00000000: its source file name is not recorded" in capsys.readouterr().err
    Sample.source_name = "back\\slash"  # a valid Linux file name
    assert sample_source(encode_sample(Sample(), "train_00000001")) == "back\\slash"


def test_panoptic_predictions_and_exported_ground_truth_pair_by_source_name(tmp_path, monkeypatch):
    import launcher.panoptic_eval as panoptic_eval
    from launcher.config import load_config
    from launcher.eval_panoptic import evaluate_panoptic

    _, ids = panoptic_tree(tmp_path / "coco")
    assert shard("coco_panoptic", tmp_path / "coco", "val", tmp_path / "out") == 0
    manifest = tmp_path / "out/val-manifest.json"
    assert main(["export-panoptic", str(manifest), "--out", str(tmp_path / "gt")]) == 0

    def one_stuff_segment(model, images, sizes, cfg, is_thing):  # stand-in model: all "tree-merged"
        return [(torch.ones(h, w, dtype=torch.int64), [{"id": 1, "category_id": 2, "score": 1.0}]) for h, w in sizes]

    monkeypatch.setattr(panoptic_eval, "predict_panoptic", one_stuff_segment)
    cfg = load_config(str(REPO / "configs/test_tiny_panoptic.yaml"), [f"data.val_manifest={manifest}",
                                                                       "model.num_classes=3"])  # fmt: skip
    json_path, count, _ = panoptic_eval.write_panoptic_predictions(cfg, torch.nn.Identity(), str(tmp_path / "pred"), 1)
    predicted = json.loads(Path(json_path).read_text())
    # files by source stem; image and category ids COCO's own (class 2 is category 184)
    assert count == 1 and [(a["image_id"], a["file_name"]) for a in predicted["annotations"]] == [
        (285, "000000000285.png")]  # fmt: skip
    assert [s["category_id"] for s in predicted["annotations"][0]["segments_info"]] == [184]
    assert sorted(c["id"] for c in predicted["categories"]) == [1, 3, 184]
    assert (tmp_path / "pred/overlays/000000000285.png").is_file()
    coco = tmp_path / "coco/annotations"
    for gt_json, gt_dir in ((tmp_path / "gt/panoptic.json", tmp_path / "gt/panoptic"),
                            (coco / "panoptic_val2017.json", coco / "panoptic_val2017")):  # fmt: skip
        results = evaluate_panoptic(str(gt_json), str(gt_dir), json_path, str(tmp_path / "pred/panoptic"))
        tree = next(c for c in results["per_class"] if c["name"] == "tree-merged")
        assert results["images"] == 1 and (tree["fp"], tree["fn"]) == (1, 1), results  # IoU 10/36: no match
