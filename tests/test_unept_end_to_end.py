"""UN-EPT (configs/test_tiny_unept.yaml, semantic) through the real CLI on 2 workers for
a few steps: train (its coarse/refined/edge/direction loss terms logged, validation
mIoU), ``eval`` (mIoU, per-class IoU), ``predict`` (overlays whose prediction panels,
decoded back to labels, score what ``eval`` scored and equal the label maps written
beside them), and ``eval-semantic`` of those label maps agrees.
"""

import json

import numpy as np
import pytest
import torch
from e2e_helpers import launcher, tiny_run_args  # tests/ is on sys.path under pytest
from PIL import Image

from launcher.evaluate import ConfusionMatrix
from launcher.overlay import IGNORE_COLOUR, blend, palette
from launcher.progress import read_step_records

pytestmark = pytest.mark.e2e

NUM_CLASSES = 5  # the synthetic shards: class 0 (background) stuff, 1-4 things
SIDE = 64


def train_run(dataset, tmp_path, config: str, name: str, *sets: str):
    """Train ``config`` on ``dataset``; (run folder, log, train_log.jsonl records by step)."""
    # Only the final checkpoint: each one costs a save on both workers.
    args = tiny_run_args(dataset, tmp_path, name, "train.checkpoint_every=100", *sets)
    args[1] = config
    code, log = launcher("train", *args)
    assert code == 0, log
    run_dir = tmp_path / name
    records = read_step_records(str(run_dir / "train_log.jsonl"))
    return run_dir, log, records


def decode_overlay(panel: np.ndarray, image: np.ndarray) -> np.ndarray:
    """A ``launcher.overlay`` panel (``image`` blended with class colours) -> its labels
    (255 = ignore); every pixel must be exactly one class colour's blend."""
    colours = np.concatenate([palette(NUM_CLASSES), np.array([IGNORE_COLOUR], dtype=np.uint8)])
    candidates = np.stack([blend(image, np.broadcast_to(c, image.shape)) for c in colours])
    matches = (candidates == panel[None]).all(-1)
    assert matches.any(0).all(), f"{int((~matches.any(0)).sum())} pixels are no class colour"
    labels = matches.argmax(0)
    labels[labels == NUM_CLASSES] = 255
    return labels


def test_unept_train_eval_predict(dataset, tmp_path):
    run_dir, log, records = train_run(dataset, tmp_path, "configs/test_tiny_unept.yaml", "unept")
    assert "validation mIoU" in log and "step 4/4" in log, log
    # UN-EPT's criterion: coarse and refined cross-entropy, boundary edge and direction.
    assert sorted(records) == [1, 2, 3, 4]
    terms = set(records[4]) - {"step", "loss", "lr", "grad_norm", "time"}
    assert terms == {"loss_ce", "loss_refined", "loss_edge", "loss_dir"}, terms
    assert all(records[4][t] > 0 for t in terms)
    assert records[4]["loss"] == pytest.approx(sum(records[4][t] for t in terms), rel=1e-4)
    assert " loss_edge " in log and " loss_dir " in log, log

    out_json = tmp_path / "eval.json"
    code, log = launcher("eval", "--checkpoint", str(run_dir), "--json", str(out_json))
    assert code == 0, log
    evaluated = json.loads(out_json.read_text())
    assert evaluated["pixels"] == 6 * SIDE * SIDE and len(evaluated["per_class_iou"]) == NUM_CLASSES
    assert evaluated["miou"] == pytest.approx(np.mean(evaluated["per_class_iou"]))
    assert "mIoU" in log and "violet_star" in log and "IoU" in log, log

    pred = tmp_path / "pred"
    code, log = launcher("predict", "--checkpoint", str(run_dir), "--out", str(pred), "--num", "6")
    assert code == 0, log
    pictures = sorted(pred.glob("*.png"))
    assert len(pictures) == 6 and sorted(p.name for p in (pred / "labels").glob("*.png")) == [
        p.name for p in pictures
    ]
    # The prediction panels, decoded back to label maps, score what eval scored and are
    # the label maps written beside them; the ground-truth panels are the ground truth
    # written beside those, and eval-semantic of the two folders agrees too.
    matrix = ConfusionMatrix(NUM_CLASSES)
    for picture in pictures:
        with Image.open(picture) as im:
            assert im.mode == "RGB" and im.width == 3 * im.height  # image | prediction | ground truth
            strip = np.asarray(im)
        scale = strip.shape[0] // SIDE  # upscaled (nearest) for people
        strip = strip[::scale, ::scale]
        image, prediction, target = (strip[:, i * SIDE : (i + 1) * SIDE] for i in range(3))
        labels, truth = decode_overlay(prediction, image), decode_overlay(target, image)
        assert (labels != 255).all()
        with Image.open(pred / "labels" / picture.name) as written:
            assert written.mode == "L" and np.array_equal(np.asarray(written), labels)
        with Image.open(pred / "ground_truth" / picture.name) as written:
            assert written.mode == "L" and np.array_equal(np.asarray(written), truth)
        matrix.update(torch.from_numpy(labels)[None], torch.from_numpy(truth)[None])
    predicted = matrix.results()
    assert predicted["pixels"] == evaluated["pixels"]
    # bf16 argmax ties may flip a few pixels between the two processes' thread counts.
    assert predicted["pixel_accuracy"] == pytest.approx(evaluated["pixel_accuracy"], abs=2e-3)
    assert predicted["miou"] == pytest.approx(evaluated["miou"], abs=2e-3)
    scored_json = tmp_path / "scored.json"
    code, log = launcher("eval-semantic", "--pred-dir", str(pred / "labels"), "--gt-dir", str(pred / "ground_truth"),
                         "--num-classes", str(NUM_CLASSES), "--json", str(scored_json))  # fmt: skip
    assert code == 0, log
    scored = json.loads(scored_json.read_text())
    assert scored["miou"] == pytest.approx(predicted["miou"], abs=1e-9) and scored["images"] == 6
