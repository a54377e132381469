"""data.task=panoptic through the real CLI, for both models with panoptic inference
(MaskFormer: configs/test_tiny_panoptic.yaml; Panoptic SegFormer: configs/test_tiny_psf.yaml),
each on 2 workers for a few steps: train (the model's own loss terms logged, validation
PQ), ``eval`` (PQ table + JSON), ``predict`` (COCO-panoptic PNGs whose ids match their
segments_info + JSON + overlays), then ``eval-panoptic`` of those predictions against the
ground truth exported from the val shards agrees with ``eval``."""

import json

import numpy as np
import pytest
from e2e_helpers import launcher, tiny_run_args  # tests/ is on sys.path under pytest
from PIL import Image

from data_pipeline.cli import main as data_main
from launcher.panoptic_quality import rgb_to_id
from launcher.progress import read_step_records

pytestmark = pytest.mark.e2e

NUM_CLASSES = 5  # the synthetic shards: class 0 (background) stuff, 1-4 things
SIDE = 64


def maskformer_terms(terms: set[str]) -> None:
    assert {"loss_ce", "loss_dice"} <= terms and not any("thing" in t for t in terms), terms


def panoptic_segformer_terms(terms: set[str]) -> None:
    # Decoupled thing/stuff terms and the location decoder's box losses, not MaskFormer's.
    assert {"loss_thing_cls", "loss_thing_dice", "loss_stuff_cls", "loss_stuff_dice"} <= terms, terms
    assert {"loss_box_l1", "loss_giou"} <= terms, terms
    assert not {"loss_ce", "loss_mask", "loss_dice"} & terms, terms


@pytest.mark.parametrize(
    "config, name, check_terms, steps, sets",
    [
        # A few more steps and a higher lr: 4 steps leave MaskFormer's predictions empty.
        ("configs/test_tiny_panoptic.yaml", "maskformer", maskformer_terms, 6, ["train.lr=3.0e-3"]),
        ("configs/test_tiny_psf.yaml", "psf", panoptic_segformer_terms, 4, []),
    ],
)
def test_panoptic_train_eval_predict_rescore(
    panoptic_dataset, tmp_path, config, name, check_terms, steps, sets
):
    # Only the final checkpoint: each one costs a save on both workers.
    args = tiny_run_args(
        panoptic_dataset, tmp_path, name, f"train.max_steps={steps}", "train.checkpoint_every=100", *sets
    )
    args[1] = config
    code, log = launcher("train", *args)
    assert code == 0, log
    assert "validation PQ" in log and "validation mIoU" not in log, log
    run_dir = tmp_path / name
    records = read_step_records(str(run_dir / "train_log.jsonl"))
    assert sorted(records) == list(range(1, steps + 1))
    last = records[steps]
    terms = set(last) - {"step", "loss", "lr", "grad_norm", "time"}
    check_terms(terms)
    assert last["loss"] > 0 and all(np.isfinite(last[t]) for t in terms)

    out_json = tmp_path / "eval.json"
    code, log = launcher("eval", "--checkpoint", str(run_dir), "--json", str(out_json))
    assert code == 0, log
    assert "PQ     SQ     RQ" in log and "Things" in log and "Stuff" in log, log
    evaluated = json.loads(out_json.read_text())
    assert evaluated["All"]["n"] >= 1 and len(evaluated["per_class"]) == NUM_CLASSES
    assert [c["isthing"] for c in evaluated["per_class"]] == [False, True, True, True, True]

    pred = tmp_path / "pred"
    code, log = launcher("predict", "--checkpoint", str(run_dir), "--out", str(pred), "--num", "2")
    assert code == 0, log
    annotations = json.loads((pred / "panoptic.json").read_text())["annotations"]
    assert len(annotations) == 6 and len(list((pred / "panoptic").glob("*.png"))) == 6
    assert sum(len(a["segments_info"]) for a in annotations) > 0, "empty predictions"
    for annotation in annotations:  # each PNG's ids are exactly its listed segments
        segments = annotation["segments_info"]
        with Image.open(pred / "panoptic" / annotation["file_name"]) as im:
            ids = rgb_to_id(np.asarray(im.convert("RGB")))
        assert ids.shape == (SIDE, SIDE)
        listed = [s["id"] for s in segments]
        assert len(set(listed)) == len(listed) and 0 not in listed  # distinct segment ids, 0 = void
        assert set(np.unique(ids).tolist()) - {0} == set(listed)
        for s in segments:
            assert s["area"] == int((ids == s["id"]).sum()) > 0
            assert 0 <= s["category_id"] < NUM_CLASSES and s["isthing"] == (s["category_id"] != 0)
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
