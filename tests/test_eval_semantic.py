"""``eval-semantic``: mIoU of folders of PNG label maps, hand-checked, and its errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launcher.eval_semantic import eval_semantic_command, evaluate_label_folders


def _write(path: Path, array, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array, dtype=np.uint8))
    if mode == "P":
        image = image.convert("P")  # palette index = value: PIL maps L -> P with an identity palette
    image.save(path)


# Two images, K = 3. Pixels (gt, pred): image a: (0,0) (0,1) (1,1) (1,1); image b: (2,2) (2,0)
# (ignored, 200) (0,0). Confusion rows gt / columns pred: [[2,1,0],[0,2,0],[1,0,1]].
# IoU0 = 2/(3+3-2) = 1/2, IoU1 = 2/(2+3-2) = 2/3, IoU2 = 1/(2+1-1) = 1/2 -> mIoU 5/9; accuracy 5/7.
GT = {"a": [[0, 0], [1, 1]], "sub/b": [[2, 2], [255, 0]]}
PRED = {"a": [[0, 1], [1, 1]], "b": [[2, 0], [200, 0]]}


@pytest.fixture
def folders(tmp_path):
    for name, array in GT.items():
        _write(tmp_path / "gt" / f"{name}.png", array)
    for name, array in PRED.items():
        _write(tmp_path / "pred" / f"{name}.png", array)
    return tmp_path / "pred", tmp_path / "gt"


def test_perfect_prediction_scores_one(tmp_path):
    gt = np.array([[0, 1, 2], [255, 1, 0]])
    _write(tmp_path / "gt" / "x.png", gt, mode="P")
    _write(tmp_path / "pred" / "x.png", np.where(gt == 255, 1, gt))
    results = evaluate_label_folders(str(tmp_path / "pred"), str(tmp_path / "gt"), 3, progress=False)
    assert results["miou"] == pytest.approx(1.0) and results["pixel_accuracy"] == pytest.approx(1.0)
    assert results["pixels"] == 5 and results["images"] == 1


def test_known_confusion_gives_the_hand_computed_numbers(folders, tmp_path, capsys):
    pred, gt = folders
    json_path = tmp_path / "out.json"
    assert eval_semantic_command(str(pred), str(gt), 3, json_path=str(json_path)) == 0
    printed = capsys.readouterr().out
    assert "mIoU 0.5556" in printed and "pixel accuracy 0.7143" in printed
    results = json.loads(json_path.read_text())
    assert results["miou"] == pytest.approx(5 / 9)
    assert results["per_class_iou"] == pytest.approx([1 / 2, 2 / 3, 1 / 2])
    assert results["pixel_accuracy"] == pytest.approx(5 / 7) and results["pixels"] == 7


def test_reduce_zero_label_applies_to_the_ground_truth_only(tmp_path):
    for name, array in GT.items():  # ADE20K style: 0 = other, classes stored + 1
        a = np.asarray(array)
        _write(tmp_path / "gt" / f"{name}.png", np.where(a == 255, 0, a + 1))
    for name, array in PRED.items():
        _write(tmp_path / "pred" / f"{name}.png", array)
    results = evaluate_label_folders(str(tmp_path / "pred"), str(tmp_path / "gt"), 3,
                                     reduce_zero_label=True, progress=False)
    assert results["miou"] == pytest.approx(5 / 9)


def test_predictions_without_ground_truth_are_skipped_with_a_warning(folders, capsys):
    pred, gt = folders
    _write(pred / "extra.png", [[0]])
    results = evaluate_label_folders(str(pred), str(gt), 3, progress=False)
    assert results["miou"] == pytest.approx(5 / 9) and results["skipped_predictions"] == 1
    assert "1 prediction in" in capsys.readouterr().err


def test_ground_truth_without_prediction_is_an_error(folders):
    pred, gt = folders
    (pred / "b.png").unlink()
    with pytest.raises(ValueError, match=r"sub/b.png has no prediction b.png"):
        evaluate_label_folders(str(pred), str(gt), 3, progress=False)


@pytest.mark.parametrize("where, name, array, message", [
    ("pred", "b", [[2, 0, 1], [0, 0, 1]], r"pred/b.png: size 3x2 \(W x H\) differs"),
    ("pred", "b", np.zeros((2, 2, 3)), r"pred/b.png: PIL mode RGB, expected a single-channel"),
    ("gt", "sub/b", np.zeros((2, 2, 3)), r"gt/sub/b.png: PIL mode RGB"),
    ("gt", "sub/b", [[2, 3], [255, 0]], r"gt/sub/b.png: ground-truth label 3 is outside \[0, 3\)"),
    ("pred", "b", [[2, 0], [0, 255]], r"pred/b.png: predicted label 255 at a labelled pixel"),
    ("pred", "a2", [[0]], r"two files share the stem 'a'"),
])
def test_bad_files_are_named(folders, where, name, array, message):
    pred, gt = folders
    root = pred if where == "pred" else gt
    if name == "a2":
        _write(root / "nested" / "a.png", array)
    else:
        _write(root / f"{name}.png", array)
    with pytest.raises(ValueError, match=message):
        evaluate_label_folders(str(pred), str(gt), 3, progress=False)


def test_empty_or_missing_folders_and_bad_arguments(folders, tmp_path):
    pred, gt = folders
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="ground-truth folder .*empty holds no .png"):
        evaluate_label_folders(str(pred), str(tmp_path / "empty"), 3, progress=False)
    with pytest.raises(ValueError, match="prediction folder .*nowhere does not exist"):
        evaluate_label_folders(str(tmp_path / "nowhere"), str(gt), 3, progress=False)
    with pytest.raises(ValueError, match="--ignore-index 2 is a class index"):
        evaluate_label_folders(str(pred), str(gt), 3, ignore_index=2, progress=False)


def test_a_predict_output_folder_and_a_too_small_class_count_are_explained(folders, tmp_path):
    pred, gt = folders
    out = tmp_path / "predictions"  # what `launcher predict` writes: overlays, labels/, ground_truth/
    for name, array in PRED.items():
        _write(out / "labels" / f"{name}.png", array)
        _write(out / "ground_truth" / f"{name}.png", array)
    # A dataset root that merely holds labels/ and ground_truth/ folders is scored as given ...
    assert evaluate_label_folders(str(out / "labels"), str(gt), 3, progress=False)["images"] == 2
    with pytest.raises(ValueError, match="two files share the stem"):
        evaluate_label_folders(str(out), str(gt), 3, progress=False)
    # ... while predict's layout (overlays on top) or its record names the folders to pass.
    for name, array in PRED.items():
        _write(out / f"{name}.png", array)
    with pytest.raises(ValueError, match=r"`launcher predict` output folder; pass --pred-dir .*predictions/labels"):
        evaluate_label_folders(str(out), str(gt), 3, progress=False)
    # ADE20K-style labels 1..K without --reduce-zero-label: label K is one past the classes.
    with pytest.raises(ValueError, match=r"label 2 is outside \[0, 2\).*too small, or .*--reduce-zero-label"):
        evaluate_label_folders(str(pred), str(gt), 2, progress=False)
    _write(gt / "a.png", [[0, 0], [3, 3]])  # label 3 with K = 2: no zero-label story fits
    with pytest.raises(ValueError, match=r"label 3 is outside \[0, 2\) .*\(is --num-classes 2 too small\?\)"):
        evaluate_label_folders(str(pred), str(gt), 2, progress=False)


def test_json_goes_into_a_new_folder(folders, tmp_path):
    pred, gt = folders
    target = tmp_path / "new" / "results.json"
    assert eval_semantic_command(str(pred), str(gt), 3, json_path=str(target)) == 0
    assert json.loads(target.read_text())["images"] == 2
