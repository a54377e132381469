# ruff: noqa: I001  (ops.torchvision_fix must come first, before anything imports torchvision)
import ops.torchvision_fix  # noqa: F401

import io
import itertools
import json
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.augment_config import AugmentConfig
from data_pipeline.config import DataConfig, SyntheticConfig
from data_pipeline.decode import _check_label_range
from data_pipeline.device_batch import augment_batch, prepare_batch
from data_pipeline.loader import (
    DataConfigError,
    ShardReadError,
    build_eval_loader,
    build_train_loader,
    collate_batch,
    decode_sample,
    plan_reads,
    reduce_zero_label,
)
from data_pipeline.shard_writer import manifest_name, write_shards
from data_pipeline.synthetic import generate_sample, synthetic_source
from data_pipeline.transforms import random_crop_pad, random_hflip, semantic_to_targets

SIZE = 40  # image side of the test data
N_TRAIN, N_VAL, PER_SHARD = 96, 40, 16  # train: 6 shards, val: 3 shards (16, 16, 8)
SYNTH = SyntheticConfig(num_classes=5, image_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(synthetic_source(SYNTH, "train", N_TRAIN), out, "train", max_count=PER_SHARD, progress=False)
    write_shards(synthetic_source(SYNTH, "val", N_VAL), out, "val", max_count=PER_SHARD, progress=False)
    write_shards(synthetic_source(SYNTH, "small", 24), out, "small", max_count=PER_SHARD, progress=False)
    return out


def _cfg(data_dir: Path, **overrides) -> DataConfig:
    cfg = DataConfig(
        train_manifest=str(data_dir / manifest_name("train")),
        val_manifest=str(data_dir / manifest_name("val")),
        crop_size=32,
        batch_size=8,
        num_workers=0,
        shuffle_buffer=8,
        seed=0,
    )
    return replace(cfg, **overrides)


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def _index(key: str) -> int:
    return int(key.rsplit("_", 1)[1])


def _prepared(batch) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """A training batch as the trainer sees it: augmented images and label maps
    (augment_batch), and prepare_batch's targets."""
    images, semantic = augment_batch(batch["images"], batch["semantic"], batch["plans"], torch.device("cpu"))
    prepared, targets = prepare_batch(batch, "cpu")
    assert torch.equal(prepared, images)
    return images, semantic, targets


def _check_targets(semantic, targets) -> None:
    for label_map, target in zip(semantic, targets):
        labels, masks = target["labels"], target["masks"]
        assert labels.dtype == torch.int64 and masks.dtype == torch.bool
        assert masks.shape == (len(labels), *label_map.shape)
        assert labels.tolist() == sorted(set(label_map.unique().tolist()) - {255})
        for label, mask in zip(labels, masks):
            assert torch.equal(mask, label_map == label)


def test_train_batches_have_the_documented_shapes_and_dtypes(data_dir):
    batch = next(build_train_loader(_cfg(data_dir), rank=0, world_size=1))
    assert set(batch) == {"images", "semantic", "plans", "keys", "stream"}
    assert batch["stream"] == (0, 8, 0)  # worker role, next stream position, samples skipped
    # Decoded samples at their own size, plus the augmentation drawn for each.
    assert [tuple(i.shape) for i in batch["images"]] == [(SIZE, SIZE, 3)] * 8
    assert all(i.dtype == torch.uint8 for i in batch["images"])
    assert all(m.dtype == torch.uint8 and m.shape == (SIZE, SIZE) for m in batch["semantic"])
    assert len(batch["plans"]) == 8 and all(isinstance(k, str) for k in batch["keys"])
    assert all(p.crop_size == 32 for p in batch["plans"])
    images, semantic, targets = _prepared(batch)
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
    assert len(targets) == 8
    assert set(semantic.unique().tolist()) <= set(range(SYNTH.num_classes)) | {255}
    _check_targets(semantic, targets)


def test_train_crop_larger_than_image_pads_with_ignore_and_zero(data_dir):
    # Resized to a short side of SIZE (scale SIZE/48 of the crop): 8 rows and columns of padding.
    keep_size = AugmentConfig(min_scale=SIZE / 48, max_scale=SIZE / 48)
    cfg = _cfg(data_dir, crop_size=48, batch_size=4, augment=keep_size)
    images, semantic, targets = _prepared(next(build_train_loader(cfg, rank=0, world_size=1)))
    assert images.shape == (4, 3, 48, 48)
    padded = semantic == 255
    assert padded.sum(dim=(1, 2)).tolist() == [48 * 48 - SIZE * SIZE] * 4
    assert int(images.permute(1, 0, 2, 3)[:, padded].max()) == 0
    _check_targets(semantic, targets)


def test_train_sample_content_matches_the_generator(data_dir):
    still = AugmentConfig(min_scale=1.0, max_scale=1.0, cat_max_ratio=1.0, hflip=False, photometric=False)
    cfg = _cfg(data_dir, crop_size=SIZE, augment=still, batch_size=2)
    batch = next(build_train_loader(cfg, rank=0, world_size=1))
    images, semantics, _ = _prepared(batch)
    for image, semantic, key in zip(images, semantics, batch["keys"]):
        expected = generate_sample(_index(key), SYNTH)  # train index offset is 0
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected.image)
        np.testing.assert_array_equal(semantic.numpy(), expected.semantic)


def test_train_stream_is_deterministic_for_a_seed(data_dir):
    def first(cfg, k=6):
        return list(itertools.islice(build_train_loader(cfg, rank=1, world_size=2), k))

    a, b = first(_cfg(data_dir)), first(_cfg(data_dir))
    assert _keys(a) == _keys(b)
    for x, y in zip(a, b):
        assert x["plans"] == y["plans"]
        assert all(torch.equal(u, v) for u, v in zip(_prepared(x)[:2], _prepared(y)[:2]))
    assert _keys(first(_cfg(data_dir, seed=1))) != _keys(a)


def test_train_ranks_are_disjoint_within_an_epoch_and_reshuffle_per_epoch(data_dir):
    # 6 equal shards over 2 ranks: each rank's epoch is 3 shards = 48 samples = 6 batches.
    streams = [build_train_loader(_cfg(data_dir), rank=r, world_size=2) for r in range(2)]
    epochs = [[_keys(itertools.islice(s, 6)) for _ in range(2)] for s in streams]
    (r0e0, r0e1), (r1e0, r1e1) = epochs
    assert len(set(r0e0)) == len(r0e0) == 48
    assert not set(r0e0) & set(r1e0)
    assert sorted(r0e0 + r1e0) == [f"train_{i:08d}" for i in range(N_TRAIN)]
    assert sorted(r0e1 + r1e1) == sorted(r0e0 + r1e0)  # epoch 1 covers everything again...
    assert r0e1 != r0e0  # ...in a new order


def test_fewer_shards_than_consumers_splits_by_sample_index(data_dir):
    # "small" has 24 samples in 2 shards; 2 ranks x 2 workers = 4 consumers.
    cfg = _cfg(data_dir, train_manifest=str(data_dir / manifest_name("small")), num_workers=2, batch_size=3)
    seen = []
    for rank in range(2):
        # 6 samples per consumer and epoch, 2 batches per worker; the DataLoader alternates workers.
        seen.append([_index(k) for k in _keys(itertools.islice(build_train_loader(cfg, rank, 2), 4))])
    assert sorted(seen[0]) == [i for i in range(24) if i % 4 in (0, 1)]
    assert sorted(seen[1]) == [i for i in range(24) if i % 4 in (2, 3)]


def test_fewer_samples_than_consumers_still_feeds_every_rank(data_dir, tmp_path):
    write_shards(synthetic_source(SYNTH, "tiny", 2), tmp_path, "tiny", max_count=1, progress=False)
    cfg = _cfg(data_dir, train_manifest=str(tmp_path / manifest_name("tiny")), batch_size=2)
    for rank in range(4):
        batch = next(build_train_loader(cfg, rank=rank, world_size=4))
        assert batch["keys"] == [f"tiny_{rank % 2:08d}"] * 2


@pytest.mark.parametrize("world_size, num_workers", [(2, 0), (2, 2), (3, 0)])
def test_eval_ranks_cover_every_val_sample_exactly_once(data_dir, world_size, num_workers):
    # (2, 2): 4 consumers > 3 shards, so this also exercises the sample-modulo fallback.
    cfg = _cfg(data_dir, num_workers=num_workers, batch_size=5)
    keys = []
    for rank in range(world_size):
        loader = build_eval_loader(cfg, rank=rank, world_size=world_size)
        batches = list(loader)
        assert _keys(list(loader)) == _keys(batches)  # re-iterable, same order
        for batch in batches:
            assert batch["images"].shape[1:] == (3, SIZE, SIZE)  # full size, no crop
            assert batch["semantic"].max() < SYNTH.num_classes
        keys += _keys(batches)
    assert sorted(keys) == [f"val_{i:08d}" for i in range(N_VAL)]


def test_plan_reads():
    sizes = [16] * 6
    plans = [plan_reads(sizes, c, 4, order_seed=(0, 0), allow_empty=False) for c in range(4)]
    assert sorted(i for p in plans for i in p.shards) == list(range(6))
    assert all(p.modulo == 1 for p in plans)
    assert plan_reads(sizes, 0, 2, order_seed=None, allow_empty=True).shards == (0, 2, 4)
    fallback = plan_reads([16, 8], 3, 4, order_seed=None, allow_empty=True)
    assert (fallback.shards, fallback.modulo, fallback.remainder) == ((0, 1), 4, 3)
    assert plan_reads([1, 1], 3, 4, order_seed=None, allow_empty=False).remainder == 1
    assert plan_reads([1, 1], 3, 4, order_seed=None, allow_empty=True).remainder == 3


def _replace_member(shard: Path, ext: str, data: bytes) -> None:
    """Rewrite ``shard`` with the last sample's ``.{ext}`` member replaced by ``data``."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    last_key = members[-1][0].name.split(".", 1)[0]
    with tarfile.open(shard, "w") as tar:
        for member, content in members:
            if member.name == f"{last_key}.{ext}":
                content = data
                member.size = len(data)
            tar.addfile(member, io.BytesIO(content))


def _corrupt_copy(data_dir: Path, tmp_path: Path, damage) -> tuple[DataConfig, Path]:
    for path in data_dir.glob("val*"):
        shutil.copy(path, tmp_path / path.name)
    shard = tmp_path / "val-000001.tar"
    damage(shard)
    return _cfg(data_dir, val_manifest=str(tmp_path / manifest_name("val"))), shard


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), id="truncated"),
        pytest.param(lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), id="garbage"),
        pytest.param(lambda p: p.unlink(), id="missing"),
        pytest.param(lambda p: _replace_member(p, "seg.png", b"not a png"), id="bad-label-member"),
        pytest.param(lambda p: _replace_member(p, "png", b"\x89PNG\r\n\x1a\n..."), id="bad-image-member"),
    ],
)
def test_corrupt_shard_raises_an_error_naming_it(data_dir, tmp_path, damage):
    cfg, shard = _corrupt_copy(data_dir, tmp_path, damage)
    with pytest.raises(ShardReadError) as err:
        list(build_eval_loader(cfg, rank=0, world_size=1))
    assert str(shard) in str(err.value)


def test_shard_disagreeing_with_its_manifest_is_an_error(data_dir, tmp_path):
    def claim_one_more(_shard: Path) -> None:
        path = tmp_path / manifest_name("val")
        data = json.loads(path.read_text())
        data["shards"][0]["num_samples"] += 1
        data["shards"][0].pop("sample_offsets", None)  # an older manifest: no offsets to contradict
        data["num_samples"] += 1
        path.write_text(json.dumps(data))

    cfg, _ = _corrupt_copy(data_dir, tmp_path, claim_one_more)
    with pytest.raises(ShardReadError, match=r"val-000000.tar holds 16 samples, its manifest says 17"):
        list(build_eval_loader(cfg, rank=0, world_size=1))


def test_corrupt_shard_error_crosses_worker_processes(data_dir, tmp_path):
    cfg, shard = _corrupt_copy(data_dir, tmp_path, lambda p: p.write_bytes(p.read_bytes()[:3000]))
    with pytest.raises(ShardReadError, match="val-000001.tar"):
        list(build_eval_loader(replace(cfg, num_workers=2), rank=0, world_size=1))


@pytest.mark.parametrize("key", ["train_manifest", "val_manifest"])
def test_missing_manifest_errors_name_the_config_key(data_dir, tmp_path, key):
    build = build_train_loader if key == "train_manifest" else build_eval_loader
    with pytest.raises(DataConfigError, match=f"^data.{key} is not set"):
        build(_cfg(data_dir, **{key: ""}), 0, 1)
    missing = tmp_path / "nowhere" / "m.json"
    with pytest.raises(DataConfigError) as err:
        build(_cfg(data_dir, **{key: str(missing)}), 0, 1)
    assert str(err.value).startswith(f"data.{key}: ") and str(missing) in str(err.value)


def test_bad_config_values_are_rejected(data_dir):
    with pytest.raises(DataConfigError, match="data.batch_size"):
        build_train_loader(_cfg(data_dir, batch_size=0), 0, 1)
    with pytest.raises(DataConfigError, match="data.ignore_index"):
        build_eval_loader(_cfg(data_dir, ignore_index=0), 0, 1)  # disagrees with the manifest
    with pytest.raises(DataConfigError, match="rank"):
        build_eval_loader(_cfg(data_dir), 2, 2)


def test_decode_rejects_rgb_label_maps():
    def png(array):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    raw = {"__key__": "k", "__url__": "s.tar", "png": png(np.zeros((4, 4, 3), np.uint8))}
    image, labels = decode_sample({**raw, "seg.png": png(np.full((4, 4), 3, np.uint8))})
    assert image.shape == (3, 4, 4) and labels.dtype == torch.uint8 and int(labels[0, 0]) == 3
    with pytest.raises(ShardReadError, match="s.tar: sample k: .seg.png must be single-channel"):
        decode_sample({**raw, "seg.png": png(np.zeros((4, 4, 3), np.uint8))})
    with pytest.raises(ShardReadError, match="needs an image"):
        decode_sample({"__key__": "k", "__url__": "s.tar", "json": b"{}"})


# ------------------------------------------------------------------------ transforms


def test_semantic_to_targets():
    semantic = torch.tensor([[0, 0, 3], [255, 3, 1]])
    target = semantic_to_targets(semantic, ignore_index=255)
    assert target["labels"].tolist() == [0, 1, 3]
    assert target["masks"].tolist() == [
        [[True, True, False], [False, False, False]],
        [[False, False, False], [False, False, True]],
        [[False, False, True], [False, True, False]],
    ]
    empty = semantic_to_targets(torch.full((2, 3), 255))
    assert empty["labels"].shape == (0,) and empty["masks"].shape == (0, 2, 3)


def test_crop_and_flip_are_seeded_and_consistent():
    image = torch.arange(3 * 6 * 8, dtype=torch.uint8).reshape(3, 6, 8)
    semantic = torch.arange(6 * 8).reshape(6, 8)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return [random_hflip(*random_crop_pad(image, semantic, 4, g), g) for _ in range(5)]

    a, b = run(0), run(0)
    for (ia, sa), (ib, sb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(sa, sb)
        assert ia.shape == (3, 4, 4) and sa.shape == (4, 4)
        # image and labels stay aligned: image channel 0 encodes the same pixel index
        assert torch.equal(ia[0].long(), sa)
    assert any(not torch.equal(sa, sb) for (_, sa), (_, sb) in zip(a, run(1)))


def test_collate_pads_mixed_sizes_with_ignore():
    samples = [
        {
            "image": torch.ones(3, 4, 6, dtype=torch.uint8),
            "semantic": torch.ones(4, 6, dtype=torch.int64),
            "key": "a",
        },
        {
            "image": torch.ones(3, 5, 3, dtype=torch.uint8),
            "semantic": torch.zeros(5, 3, dtype=torch.int64),
            "key": "b",
        },
    ]
    batch = collate_batch(samples, ignore_index=255)
    assert batch["images"].shape == (2, 3, 5, 6) and batch["semantic"].shape == (2, 5, 6)
    assert int((batch["semantic"][0] == 255).sum()) == 5 * 6 - 4 * 6
    assert int((batch["semantic"][1] == 255).sum()) == 5 * 6 - 5 * 3
    assert int(batch["images"][1, :, :, 3:].sum()) == 0
    assert batch["keys"] == ["a", "b"]
    assert batch["image_sizes"] == [(4, 6), (5, 3)]  # each image's own size, for evaluation


# ------------------------------------------------------------------ reduce_zero_label


def test_reduce_zero_label_maps_zero_to_ignore_and_shifts_the_rest():
    labels = torch.tensor([[0, 1, 2], [150, 255, 7]])
    assert reduce_zero_label(labels).tolist() == [[255, 0, 1], [149, 255, 6]]
    assert reduce_zero_label(torch.tensor([0, 3, 9]), ignore_index=9).tolist() == [9, 2, 9]


@pytest.mark.parametrize("ignore", [255, 254, 0])
def test_label_range_check_on_decoded_ids_agrees_with_the_reduced_ids(ignore):
    # Training checks ids before reduce_zero_label (applied on the device): every id must be
    # judged as it will be after the reduction.
    for num_classes in (5, 253):
        for reduce in (False, True):
            for value in range(256):
                ids = np.full((1, 1), value, np.uint8)
                seen = int(reduce_zero_label(torch.from_numpy(ids), ignore)[0, 0]) if reduce else value
                expect_bad = seen != ignore and seen >= num_classes
                try:
                    _check_label_range(ids, num_classes, ignore, reduce, lambda: "here")
                    bad = False
                except ShardReadError as err:
                    bad = True
                    assert f"label value {seen} out of range" in str(err)
                assert bad == expect_bad, (num_classes, reduce, value)


def test_reduce_zero_label_is_applied_when_decoding(data_dir):
    raw = {"__key__": "k", "__url__": "s.tar"}
    for ext, array in (("png", np.zeros((2, 2, 3), np.uint8)), ("seg.png", np.array([[0, 1], [2, 255]], np.uint8))):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        raw[ext] = buf.getvalue()
    assert decode_sample(raw)[1].tolist() == [[0, 1], [2, 255]]
    assert decode_sample(raw, reduce_zero=True)[1].tolist() == [[255, 0], [1, 255]]

    # Eval stream: exactly the generator's labels, reduced.
    plain = next(iter(build_eval_loader(_cfg(data_dir, batch_size=4), 0, 1)))
    reduced = next(iter(build_eval_loader(_cfg(data_dir, batch_size=4, reduce_zero_label=True), 0, 1)))
    assert reduced["keys"] == plain["keys"]
    assert torch.equal(reduced["semantic"], reduce_zero_label(plain["semantic"]))
    # Train stream: reduced before the crop pads with ignore and before the targets are built.
    batch = next(build_train_loader(_cfg(data_dir, crop_size=48, batch_size=4, reduce_zero_label=True), 0, 1))
    _, semantic, targets = _prepared(batch)
    assert set(semantic.unique().tolist()) <= {0, 1, 2, 3, 255}
    assert int((semantic == 255).sum()) > 4 * (48 * 48 - SIZE * SIZE)  # padding + former class 0
    assert sum(int((m == 0).sum()) for m in batch["semantic"]) > 0  # the class 0 that became ignore
    _check_targets(semantic, targets)
