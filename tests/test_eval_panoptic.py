"""``eval-panoptic`` on a tiny COCO-panoptic tree written here, its table, JSON and bad input."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launcher.cli import main
from launcher.eval_panoptic import evaluate_panoptic
from launcher.panoptic_export import panoptic_overlay_panel, write_coco_panoptic, write_panoptic_json

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 3, "name": "sky", "isthing": 0},
]

# Image 1 (2x5): person id 1, void column, sky id 3. The predicted person (5 px) also covers
# the top void pixel: union 5 + 4 - 4 - 1 (void) = 4 -> IoU 1. Sky exact -> IoU 1.
GT_A = [[1, 1, 0, 3, 3], [1, 1, 0, 3, 3]]
PRED_A = [[5, 5, 5, 9, 9], [5, 5, 0, 9, 9]]
# Image 2 (2x4): person id 2 (4 px), sky id 4. Predicted person 7 (2 px): IoU 2/4 = 0.5, not > 0.5
# -> GT person FN, prediction FP. Predicted sky 8 (6 px): 4 / (6 + 4 - 4) = 2/3 -> TP.
GT_B = [[2, 2, 4, 4], [2, 2, 4, 4]]
PRED_B = [[7, 7, 8, 8], [8, 8, 8, 8]]
# person: TP 1 (IoU 1), FP 1, FN 1 -> PQ 1/2, SQ 1, RQ 1/2. sky: TP 2, IoU 1 + 2/3 -> PQ = SQ = 5/6,
# RQ 1. car: nothing -> left out. All: PQ (1/2 + 5/6)/2 = 2/3, SQ (1 + 5/6)/2 = 11/12, RQ 3/4.


def encode(ids) -> np.ndarray:
    """COCO-panoptic colour, written out independently of the code under test."""
    ids = np.asarray(ids)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def write_png(path: Path, ids) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(encode(ids)).save(path)


@pytest.fixture
def tree(tmp_path):
    gt_annotations = [
        {
            "image_id": 1,
            "file_name": "a.png",
            "segments_info": [
                {"id": 1, "category_id": 1, "iscrowd": 0},
                {"id": 3, "category_id": 3, "iscrowd": 0},
            ],
        },
        {
            "image_id": 2,
            "file_name": "b.png",
            "segments_info": [
                {"id": 2, "category_id": 1, "iscrowd": 0},
                {"id": 4, "category_id": 3, "iscrowd": 0},
            ],
        },
    ]
    write_png(tmp_path / "gt" / "a.png", GT_A)
    write_png(tmp_path / "gt" / "b.png", GT_B)
    (tmp_path / "gt.json").write_text(json.dumps({"annotations": gt_annotations, "categories": CATEGORIES}))
    # Predictions through the export helper (JPEG-named input, as a model side would pass).
    pred_annotations = [
        write_coco_panoptic(
            str(tmp_path / "pred"),
            1,
            "a.jpg",
            np.array(PRED_A),
            [{"id": 5, "category_id": 1, "score": 0.9}, {"id": 9, "category_id": 3}],
        ),
        write_coco_panoptic(
            str(tmp_path / "pred"),
            2,
            "b.jpg",
            np.array(PRED_B),
            [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 3}],
        ),
    ]
    write_panoptic_json(str(tmp_path / "pred.json"), pred_annotations, CATEGORIES)
    return tmp_path


def argv(root: Path, *extra: str) -> list[str]:
    return [
        "eval-panoptic",
        "--gt-json",
        str(root / "gt.json"),
        "--gt-dir",
        str(root / "gt"),
        "--pred-json",
        str(root / "pred.json"),
        "--pred-dir",
        str(root / "pred"),
        *extra,
    ]


def test_export_helper_writes_coco_panoptic(tree):
    annotation = json.loads((tree / "pred.json").read_text())["annotations"][0]
    assert annotation["file_name"] == "a.png" and annotation["image_id"] == 1
    # Person 5: 5 pixels, columns 0-2, rows 0-1 -> bbox [x 0, y 0, w 3, h 2]; extra keys kept.
    assert annotation["segments_info"][0] == {
        "id": 5,
        "category_id": 1,
        "score": 0.9,
        "iscrowd": 0,
        "area": 5,
        "bbox": [0, 0, 3, 2],
    }
    assert (np.asarray(Image.open(tree / "pred" / "a.png")) == encode(PRED_A)).all()


def test_cli_prints_the_table_and_writes_per_class_json(tree, capsys):
    out = tree / "results.json"
    assert main(argv(tree, "--json", str(out))) == 0
    printed = capsys.readouterr().out
    assert "2 images" in printed
    assert "All       |  66.7   91.7   75.0      2" in printed  # 2/3, 11/12, 3/4
    assert "Things    |  50.0  100.0   50.0      1" in printed
    assert "Stuff     |  83.3   83.3  100.0      1" in printed  # 5/6, 5/6, 1
    results = json.loads(out.read_text())
    assert results["All"] == pytest.approx({"pq": 2 / 3, "sq": 11 / 12, "rq": 0.75, "n": 2})
    person, car, sky = results["per_class"]
    assert (person["name"], person["tp"], person["fp"], person["fn"]) == ("person", 1, 1, 1)
    assert person["pq"] == pytest.approx(0.5) and sky["pq"] == pytest.approx(5 / 6)
    assert not car["counted"] and results["images"] == 2


def test_workers_give_the_same_numbers(tree):
    one = evaluate_panoptic(
        str(tree / "gt.json"), str(tree / "gt"), str(tree / "pred.json"), str(tree / "pred"), progress=False
    )
    two = evaluate_panoptic(
        str(tree / "gt.json"),
        str(tree / "gt"),
        str(tree / "pred.json"),
        str(tree / "pred"),
        workers=2,
        progress=False,
    )
    for group in ("All", "Things", "Stuff"):
        assert two[group] == pytest.approx(one[group])
    assert [c["tp"] for c in two["per_class"]] == [c["tp"] for c in one["per_class"]] == [1, 0, 2]
    assert two["All"]["pq"] == pytest.approx(2 / 3)


def _edit_json(path: Path, image_id: int, edit) -> None:
    data = json.loads(path.read_text())
    for ann in data["annotations"]:
        if ann["image_id"] == image_id:
            edit(ann, data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing id", r"pred/a.png \(image_id 1\): segment id 9 is in the PNG but not in segments_info"),
        ("extra id", r"pred/b.png \(image_id 2\): segment id 11 is in segments_info but not in the PNG"),
        ("unknown category", r"pred/a.png \(image_id 1\): segment id 9 has unknown category_id 99"),
        ("wrong size", r"pred/b.png: size 3x2 \(W x H\) differs from its ground truth .*gt/b.png \(4x2\)"),
        ("missing prediction", r"pred.json: no prediction for image_id 2 \(ground truth .*gt/b.png; 1 of 2 "
                               r"ground-truth images have none\)$"),
        ("other numbering", r"pred.json: no prediction for image_id 1 .* 2 of 2 ground-truth images have none; "
                            r"the two share no image_id: ground truth has e.g. 1, predictions 'a'\)"),
        ("gt missing id", r"gt/b.png \(image_id 2\): segment id 4 is in the PNG but not in segments_info"),
        ("gt not RGB", r"gt/a.png: PIL mode L, expected an RGB"),
    ],
)
def test_bad_input_is_one_line_naming_file_and_id(tree, capsys, case, message):
    pred_json, gt_json = tree / "pred.json", tree / "gt.json"
    if case == "missing id":
        _edit_json(pred_json, 1, lambda ann, _: ann["segments_info"].pop())
    elif case == "extra id":
        _edit_json(pred_json, 2, lambda ann, _: ann["segments_info"].append({"id": 11, "category_id": 3}))
    elif case == "unknown category":
        _edit_json(pred_json, 1, lambda ann, _: ann["segments_info"][1].update(category_id=99))
    elif case == "wrong size":
        write_png(tree / "pred" / "b.png", [[7, 7, 8], [8, 8, 8]])
    elif case == "missing prediction":
        _edit_json(pred_json, 2, lambda ann, data: data["annotations"].remove(ann))
    elif case == "other numbering":  # predictions named by file stem, ground truth by COCO's ints
        for image_id, stem in ((1, "a"), (2, "b")):
            _edit_json(pred_json, image_id, lambda ann, _, stem=stem: ann.update(image_id=stem))
    elif case == "gt missing id":
        _edit_json(gt_json, 2, lambda ann, _: ann["segments_info"].pop())
    elif case == "gt not RGB":
        Image.fromarray(np.zeros((2, 5), dtype=np.uint8)).save(tree / "gt" / "a.png")
    assert main(argv(tree)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert re.search(message, lines[0]), lines[0]
    assert captured.out == ""


def test_overlay_panel_draws_three_panels(tree):
    image = np.full((2, 5, 3), 100, dtype=np.uint8)
    panel = panoptic_overlay_panel(
        image,
        np.array(PRED_A),
        [{"id": 5, "category_id": 1}, {"id": 9, "category_id": 3}],
        CATEGORIES,
        np.array(GT_A),
        [{"id": 1, "category_id": 1}, {"id": 3, "category_id": 3}],
    )
    assert panel.size == (15 * 128, 2 * 128)  # three 5-wide panels, upscaled to a 256-px side
    pixels = np.asarray(panel)
    assert not (pixels[:128, : 128 * 5] == pixels[:128, 128 * 5 : 128 * 10]).all()  # prediction coloured
