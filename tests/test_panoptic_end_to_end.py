"""data.task=panoptic through the real CLI: train configs/test_tiny_panoptic.yaml on 2
workers (validation PQ), ``eval`` (PQ table + JSON), ``predict`` (COCO-panoptic PNGs + JSON
+ overlays), then ``eval-panoptic`` of those predictions against the ground truth exported
from the val shards agrees with ``eval``."""

import json

import pytest
from e2e_helpers import launcher, tiny_run_args  # tests/ is on sys.path under pytest
from PIL import Image

from data_pipeline.cli import main as data_main

pytestmark = pytest.mark.e2e


def test_panoptic_train_eval_predict_rescore(panoptic_dataset, tmp_path):
    args = tiny_run_args(panoptic_dataset, tmp_path, "pan", "train.max_steps=6", "train.lr=3.0e-3")
    args[1] = "configs/test_tiny_panoptic.yaml"
    code, log = launcher("train", *args)
    assert code == 0, log
    assert "validation PQ" in log and "validation mIoU" not in log, log
    run_dir = tmp_path / "pan"

    out_json = tmp_path / "eval.json"
    code, log = launcher("eval", "--checkpoint", str(run_dir), "--json", str(out_json))
    assert code == 0, log
    assert "PQ     SQ     RQ" in log and "Things" in log and "Stuff" in log, log
    evaluated = json.loads(out_json.read_text())
    assert evaluated["All"]["n"] >= 1 and len(evaluated["per_class"]) == 5
    assert [c["isthing"] for c in evaluated["per_class"]] == [False, True, True, True, True]

    pred = tmp_path / "pred"
    code, log = launcher("predict", "--checkpoint", str(run_dir), "--out", str(pred), "--num", "2")
    assert code == 0, log
    predictions = json.loads((pred / "panoptic.json").read_text())
    assert len(predictions["annotations"]) == 6 and len(list((pred / "panoptic").glob("*.png"))) == 6
    assert sum(len(a["segments_info"]) for a in predictions["annotations"]) > 0, "empty predictions"
    overlays = sorted((pred / "overlays").glob("*.png"))
    assert len(overlays) == 2
    with Image.open(overlays[0]) as im:
        assert im.mode == "RGB" and im.width == 3 * im.height  # image | prediction | ground truth

    gt = tmp_path / "gt"
    assert data_main(["export-panoptic", str(panoptic_dataset / "val-manifest.json"), "--out", str(gt)]) == 0
    rescored_json = tmp_path / "rescored.json"
    code, log = launcher("eval-panoptic", "--gt-json", str(gt / "panoptic.json"), "--gt-dir", str(gt / "panoptic"),
                         "--pred-json", str(pred / "panoptic.json"), "--pred-dir", str(pred / "panoptic"),
                         "--json", str(rescored_json))  # fmt: skip
    assert code == 0, log
    rescored = json.loads(rescored_json.read_text())
    assert rescored["images"] == 6
    for group in ("All", "Things", "Stuff"):
        assert rescored[group] == pytest.approx(evaluated[group], abs=1e-9)
    counts = [(c["tp"], c["fp"], c["fn"]) for c in evaluated["per_class"]]
    assert counts == [(c["tp"], c["fp"], c["fn"]) for c in rescored["per_class"]]
    assert sum(tp + fp + fn for tp, fp, fn in counts) > 0
