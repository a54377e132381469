"""data.task=panoptic: the loader's id maps and segments, prepare_batch's per-segment
targets (geometry shared with image and labels), and PQ evaluation of a hand-made model."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from data_pipeline.augment_config import AugmentConfig
from data_pipeline.config import DataConfig
from data_pipeline.device_batch import augment_batch, panoptic_targets, prepare_batch
from data_pipeline.loader import build_eval_loader, build_train_loader, collate_batch
from data_pipeline.loader_io import ShardReadError
from data_pipeline.panoptic import decode_panoptic_members, training_segments
from data_pipeline.shard_writer import encode_panoptic
from data_pipeline.transforms import panoptic_to_targets
from launcher.config import ConfigError, config_from_dict
from launcher.panoptic_eval import check_panoptic_model, evaluate_panoptic_model, predict_panoptic
from model.config import ModelConfig, PanopticSegFormerConfig


def _cfg(root, **kw) -> DataConfig:
    base = dict(train_manifest=f"{root}/train-manifest.json", val_manifest=f"{root}/val-manifest.json",
                crop_size=48, batch_size=4, task="panoptic", shuffle_buffer=0,
                augment=AugmentConfig(min_scale=0.6, max_scale=1.6, photometric=False))  # fmt: skip
    return DataConfig(**{**base, **kw})


def test_task_is_typed():
    assert DataConfig().task == "semantic"
    assert config_from_dict({"data": {"task": "panoptic"}}).data.task == "panoptic"
    with pytest.raises(ConfigError, match="task"):
        config_from_dict({"data": {"task": "instance"}})


def test_panoptic_targets_one_mask_per_non_crowd_segment():
    ids = torch.tensor([[[1, 1, 2, 2], [3, 3, 0, 2], [4, 4, 4, 9]]], dtype=torch.int32)
    segments = [[
        {"id": 1, "category_id": 0, "iscrowd": 0},
        {"id": 2, "category_id": 3, "iscrowd": 0},
        {"id": 3, "category_id": 3, "iscrowd": 1},  # crowd: no mask, its pixels in none
        {"id": 4, "category_id": 2, "iscrowd": 0},
        {"id": 7, "category_id": 1, "iscrowd": 0},  # cropped away: no mask
    ]]  # fmt: skip
    (target,) = panoptic_targets(ids, segments)
    assert target["labels"].tolist() == [0, 3, 2]
    assert target["masks"].dtype == torch.bool and target["masks"].shape == (3, 3, 4)
    assert target["masks"][1].nonzero().tolist() == [[0, 2], [0, 3], [1, 3]]
    covered = target["masks"].any(0)
    assert not covered[1, :2].any() and not covered[1, 2] and not covered[2, 3]  # crowd, void, unlisted
    reference = panoptic_to_targets(ids[0].long(), segments[0])
    assert torch.equal(reference["labels"], target["labels"]) and torch.equal(
        reference["masks"], target["masks"]
    )


def _raw(ids: np.ndarray, segments: list[dict]) -> dict:
    buf = io.BytesIO()
    Image.fromarray(encode_panoptic(ids)).save(buf, format="PNG")
    return {"__key__": "k", "__url__": "s.tar", "pan.png": buf.getvalue(),
            "json": json.dumps({"segments_info": segments}).encode()}  # fmt: skip


def test_decode_panoptic_members_reduce_zero_label_and_errors():
    ids = np.array([[1, 1, 2], [3, 0, 2]], dtype=np.int32)
    segments = [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 4, "iscrowd": 1, "isthing": True},
                {"id": 3, "category_id": 1}]  # fmt: skip
    out, kept = decode_panoptic_members(_raw(ids, segments), (2, 3))
    assert (
        out.dtype == np.int32 and np.array_equal(out, ids) and [s["category_id"] for s in kept] == [0, 4, 1]
    )
    out, kept = decode_panoptic_members(_raw(ids, segments), (2, 3), reduce_zero_label=True)
    assert out.tolist() == [[0, 0, 2], [3, 0, 2]]  # class 0 ("other") becomes void
    assert kept == [{"id": 2, "category_id": 3, "iscrowd": 1, "isthing": True},
                    {"id": 3, "category_id": 0, "iscrowd": 0, "isthing": False}]  # fmt: skip
    assert training_segments([{"id": 5, "category_id": 255}], False)[1] == [5]
    with pytest.raises(ShardReadError, match="class 4 outside 0..3"):
        decode_panoptic_members(_raw(ids, segments), (2, 3), num_classes=4)
    with pytest.raises(ShardReadError, match=r"is \(2, 3\) but the image is \(3, 3\)"):
        decode_panoptic_members(_raw(ids, segments), (3, 3))
    with pytest.raises(ShardReadError, match="needs .pan.png and .json"):
        decode_panoptic_members({"__key__": "k", "png": b""}, (2, 3))


def test_train_batch_carries_ids_and_segments(panoptic_dataset):
    batch = next(iter(build_train_loader(_cfg(panoptic_dataset), 0, 1)))
    assert len(batch["panoptic"]) == len(batch["segments"]) == 4
    for ids, semantic, segments in zip(batch["panoptic"], batch["semantic"], batch["segments"]):
        assert ids.dtype == torch.int32 and ids.shape == semantic.shape
        assert {s["id"] for s in segments} == set(torch.unique(ids).tolist())
        for s in segments:  # the segment's class is the label under its pixels
            assert set(torch.unique(semantic[ids == s["id"]]).tolist()) == {s["category_id"]}
            assert s["isthing"] == (s["category_id"] != 0) and s["iscrowd"] == 0
    semantic_batch = next(iter(build_train_loader(_cfg(panoptic_dataset, task="semantic"), 0, 1)))
    assert "panoptic" not in semantic_batch and "segments" not in semantic_batch


def test_prepare_batch_applies_one_geometry(panoptic_dataset):
    cfg = _cfg(panoptic_dataset, augment=AugmentConfig(min_scale=0.6, max_scale=1.6, photometric=True))
    batches = iter(build_train_loader(cfg, 0, 1))
    flipped = resized = 0
    for _ in range(3):
        batch = next(batches)
        images, targets = prepare_batch(batch, "cpu")
        sem_images, semantic, ids = augment_batch(batch["images"], batch["semantic"], batch["plans"],
                                                  torch.device("cpu"), batch["panoptic"])  # fmt: skip
        plain_images, plain_semantic = augment_batch(batch["images"], batch["semantic"], batch["plans"],
                                                     torch.device("cpu"))  # fmt: skip
        assert torch.equal(images, sem_images) and torch.equal(images, plain_images)
        assert torch.equal(semantic, plain_semantic)
        for b, target in enumerate(targets):
            plan = batch["plans"][b]
            flipped += plan.flip
            resized += (plan.height, plan.width) != tuple(batch["semantic"][b].shape)
            assert len(target["labels"]) == len(target["masks"]) > 0
            for label, mask in zip(target["labels"], target["masks"]):  # labels under each mask agree
                assert set(torch.unique(semantic[b][mask]).tolist()) == {int(label)}
            # No crowd or void in the synthetic data: the masks tile exactly the labelled pixels.
            assert torch.equal(target["masks"].sum(0), (semantic[b] != 255).long())
            reference = panoptic_to_targets(ids[b].long(), batch["segments"][b])
            assert torch.equal(reference["labels"], target["labels"])
            assert torch.equal(reference["masks"], target["masks"])
    assert flipped and resized  # the geometry actually moved pixels


class OracleModel(nn.Module):
    """A MaskFormer-shaped model that reads its answer off the image: channel 0 holds the
    segment id (query q predicts id q + 1), channel 1 its class; ids in ``drop`` get no query."""

    def __init__(self, num_queries: int, num_classes: int, drop: tuple[int, ...] = ()):
        super().__init__()
        self.num_queries, self.num_classes, self.drop = num_queries, num_classes, drop
        self.weight = nn.Parameter(torch.zeros(()))
        self.forwards = 0

    def forward(self, images):
        self.forwards += 1
        batch = images.shape[0]
        logits = torch.full((batch, self.num_queries, self.num_classes + 1), -20.0)
        logits[..., -1] = 20.0  # "no object" unless the id is in the image
        masks = torch.full((batch, self.num_queries, *images.shape[-2:]), -20.0)
        for b in range(batch):
            for q in range(self.num_queries):
                inside = images[b, 0] == q + 1
                if inside.any() and q + 1 not in self.drop:
                    logits[b, q, int(images[b, 1][inside][0])] = 20.0
                    logits[b, q, -1] = -20.0
                    masks[b, q][inside] = 20.0
        return {"pred_logits": logits + self.weight, "pred_masks": masks}


CATEGORIES = [{"id": 0, "name": "sky", "isthing": 0}, {"id": 1, "name": "car", "isthing": 1},
              {"id": 2, "name": "dog", "isthing": 1}]  # fmt: skip


def _oracle_batches():
    """Two images (4x6 and 3x4, padded into one batch): sky + 2 cars; sky + a dog + a crowd of cars."""
    ids_a = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 2, 2, 1, 3, 3], [1, 2, 2, 1, 3, 3], [1, 1, 1, 1, 1, 1]])
    seg_a = [{"id": 1, "category_id": 0, "iscrowd": 0}, {"id": 2, "category_id": 1, "iscrowd": 0},
             {"id": 3, "category_id": 1, "iscrowd": 0}]  # fmt: skip
    ids_b = torch.tensor([[1, 1, 4, 4], [2, 2, 4, 4], [2, 2, 0, 0]])
    seg_b = [{"id": 1, "category_id": 0, "iscrowd": 0}, {"id": 2, "category_id": 2, "iscrowd": 0},
             {"id": 4, "category_id": 1, "iscrowd": 1}]  # fmt: skip
    samples = []
    for key, ids, segs in (("a", ids_a, seg_a), ("b", ids_b, seg_b)):
        classes = {s["id"]: s["category_id"] for s in segs if not s["iscrowd"]}
        image = torch.zeros(3, *ids.shape, dtype=torch.uint8)
        image[0] = torch.where(torch.isin(ids, torch.tensor(list(classes))), ids, 0).to(torch.uint8)
        image[1] = torch.tensor([[classes.get(int(i), 0) for i in row] for row in ids], dtype=torch.uint8)
        semantic = torch.where(ids > 0, image[1], 255).to(torch.uint8)
        samples.append({"image": image, "semantic": semantic, "key": key, "panoptic": ids.to(torch.int32),
                        "segments": segs})  # fmt: skip
    return [collate_batch(samples)]


def test_panoptic_evaluation_by_hand():
    cfg = ModelConfig(num_classes=3)
    perfect = evaluate_panoptic_model(OracleModel(4, 3), _oracle_batches(), CATEGORIES, cfg).results()
    assert perfect["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 3}
    # Drop image a's second car (id 3): car has TP 1 (a's first), FN 1; sky and dog stay
    # perfect. Crowd cars in b are never a false negative. PQ_car = 1 / (1 + 0.5).
    model = OracleModel(4, 3, drop=(3,))
    results = evaluate_panoptic_model(model, _oracle_batches(), CATEGORIES, cfg).results()
    car = results["per_class"][1]
    assert (car["tp"], car["fp"], car["fn"]) == (1, 0, 1) and car["pq"] == pytest.approx(2 / 3)
    assert results["Things"]["pq"] == pytest.approx((2 / 3 + 1) / 2)
    assert results["Stuff"]["pq"] == 1.0 and results["All"]["pq"] == pytest.approx((2 / 3 + 2) / 3)
    assert model.forwards == 2  # one forward per image size in the batch


def test_panoptic_segformer_rule_and_refusals():
    cfg = ModelConfig(num_classes=3, panoptic_segformer=PanopticSegFormerConfig(thing_classes=[1, 2]),
                      name="panoptic_segformer")  # fmt: skip

    class PSFOutputs(nn.Module):  # 2 thing queries + 1 stuff query (class 0), masks at stride 8
        def forward(self, images):
            masks = torch.full((1, 3, 1, 1), -10.0)
            masks[0, 0] = 10.0  # thing query 0: the whole 8x8 image
            return {"pred_thing_logits": torch.tensor([[[-9.0, 9.0], [-9.0, -9.0]]]),
                    "pred_stuff_logits": torch.tensor([[-9.0]]), "pred_masks": masks}  # fmt: skip

    ((ids, segments),) = predict_panoptic(
        PSFOutputs(), torch.zeros(1, 3, 8, 8), [(8, 8)], cfg, [False, True, True]
    )
    assert ids.unique().tolist() == [1] and segments[0]["category_id"] == 2 and segments[0]["isthing"]
    for name in ("pft", "unept"):
        with pytest.raises(ValueError, match=f"model.name={name} has no panoptic inference"):
            check_panoptic_model(ModelConfig(name=name))
    bad = ModelConfig()
    bad.inference.flip = True
    with pytest.raises(ValueError, match="semantic-only"):
        check_panoptic_model(bad)


def test_eval_loader_pads_ids_with_void(panoptic_dataset):
    batch = next(iter(build_eval_loader(_cfg(panoptic_dataset), 0, 1)))
    assert batch["panoptic"].dtype == torch.int32 and batch["panoptic"].shape == batch["semantic"].shape
    assert len(batch["segments"]) == len(batch["keys"])
