# ruff: noqa: I001  (ops.torchvision_fix must come first, before anything imports torchvision)
"""Exact resume of the training stream: a loader started at batch n yields exactly the
batches n, n+1, ... of the uninterrupted stream (keys, pixels and labels), for resume
points in the buffer fill, mid-epoch, inside the final drain and epochs later, with and
without DataLoader workers; and seeking reads only what it needs."""

import ops.torchvision_fix  # noqa: F401

import itertools
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from data_pipeline import loader_io
from data_pipeline.config import DataConfig, SyntheticConfig
from data_pipeline.device_batch import prepare_batch
from data_pipeline.loader import build_train_loader, shard_refs
from data_pipeline.loader_io import ShardRef, read_shard
from data_pipeline.manifest import load_manifest
from data_pipeline.shard_writer import manifest_name, write_shards
from data_pipeline.synthetic import synthetic_source
from data_pipeline.train_stream import LoaderPosition, batches_to_skip, consumer_stream, worker_batches

# 45 samples in uneven shards (8, 8, 8, 8, 8, 5): per consumer, epochs of 16-24 samples.
N_TRAIN, PER_SHARD = 45, 8
SYNTH = SyntheticConfig(num_classes=5, image_size=24, seed=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stream")
    write_shards(synthetic_source(SYNTH, "train", N_TRAIN), out, "train", max_count=PER_SHARD, progress=False)
    return out


def _cfg(data_dir: Path, **overrides) -> DataConfig:
    cfg = DataConfig(
        train_manifest=str(data_dir / manifest_name("train")),
        crop_size=16,
        batch_size=3,
        num_workers=0,
        shuffle_buffer=5,
        seed=3,
    )
    return replace(cfg, **overrides)


def _take(cfg: DataConfig, rank: int, world_size: int, start: int, count: int) -> list[dict]:
    batches = build_train_loader(cfg, rank, world_size, start_batches=start)
    taken = list(itertools.islice(batches, count))
    batches.close()
    return taken


def _assert_same(resumed: list[dict], expected: list[dict]) -> None:
    assert [b["keys"] for b in resumed] == [b["keys"] for b in expected]
    for got, want in zip(resumed, expected):
        # The same decoded samples and the same augmentation drawn for them, hence the same
        # augmented batch and targets on the trainer.
        assert got["plans"] == want["plans"]
        assert all(torch.equal(a, b) for a, b in zip(got["images"] + got["semantic"], want["images"] + want["semantic"]))
        (got_images, got_targets), (want_images, want_targets) = prepare_batch(got, "cpu"), prepare_batch(want, "cpu")
        assert torch.equal(got_images, want_images)
        for a, b in zip(got_targets, want_targets):
            assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["masks"], b["masks"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_stream_continues_the_uninterrupted_one_exactly(data_dir, num_workers):
    cfg = _cfg(data_dir, num_workers=num_workers)
    world_size, rank = 2, 1
    # Per consumer an epoch is 16-24 samples (5-8 batches of 3) and the buffer holds 5:
    # resume points cover the buffer fill (1), mid-epoch (4), the drain near an epoch's
    # end (7), the next epochs (11, 19).
    full = _take(cfg, rank, world_size, 0, 24)
    for start in (1, 4, 7, 11, 19):
        _assert_same(_take(cfg, rank, world_size, start, 5), full[start : start + 5])


def test_every_sample_position_of_a_consumer_resumes_exactly(data_dir):
    # The index-level replay against the real stream, sample by sample, over two epochs
    # of one consumer (reading whole shards, buffer larger than some shards).
    refs = shard_refs(load_manifest(data_dir / manifest_name("train")))
    kwargs = dict(seed=1, rank=0, worker=0, consumer=0, num_consumers=2, shuffle_buffer=6)
    stream = itertools.islice(consumer_stream(refs, **kwargs), 50)
    full = [(raw["__key__"], epoch, pos, index) for raw, epoch, pos, index in stream]
    assert [index for *_, index in full] == list(range(50))
    for skip in range(0, 45, 4):
        resumed = consumer_stream(refs, **kwargs, skip=skip)
        got = [(raw["__key__"], epoch, pos, index) for raw, epoch, pos, index in itertools.islice(resumed, 5)]
        assert got == full[skip : skip + 5], skip


def _offsets(path: str) -> tuple[int, ...]:
    """Byte offset of each sample's first member header, computed with tarfile."""
    offsets, seen = [], set()
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key = member.name.split(".", 1)[0]
            if key not in seen:
                seen.add(key)
                offsets.append(member.offset)
    return tuple(offsets)


def test_seeking_with_offsets_reads_only_the_requested_sample(data_dir, monkeypatch):
    ref = replace(shard_refs(load_manifest(data_dir / manifest_name("train")))[1], offsets=())
    with_offsets = replace(ref, offsets=_offsets(ref.path))
    expected = list(read_shard(ref))[5]
    parsed = []
    real = loader_io._tar_samples

    def counting(stream, url, handler):
        for sample in real(stream, url, handler):
            parsed.append(sample["__key__"])
            yield sample

    monkeypatch.setattr(loader_io, "_tar_samples", counting)
    got = next(read_shard(with_offsets, start=5, limit=1))
    assert got["__key__"] == expected["__key__"] and got["__index__"] == expected["__index__"]
    assert got["png"] == expected["png"]
    assert parsed == [expected["__key__"]]  # one sample parsed, after one seek
    parsed.clear()
    next(read_shard(ref, start=5, limit=1))  # no offsets: reads its way there
    assert len(parsed) == 6


def test_resume_with_offsets_equals_resume_without(data_dir):
    refs = [replace(r, offsets=()) for r in shard_refs(load_manifest(data_dir / manifest_name("train")))]
    seeking = [replace(r, offsets=_offsets(r.path)) for r in refs]
    kwargs = dict(seed=0, rank=0, worker=0, consumer=1, num_consumers=3, shuffle_buffer=4, skip=9)
    plain = [raw["__key__"] for raw, *_ in itertools.islice(consumer_stream(refs, **kwargs), 12)]
    sought = [raw["__key__"] for raw, *_ in itertools.islice(consumer_stream(seeking, **kwargs), 12)]
    assert plain == sought


def test_worker_batches_follow_the_dataloader_round_robin():
    assert [worker_batches(5, w, 2) for w in range(2)] == [3, 2]
    assert [worker_batches(1, w, 3) for w in range(3)] == [1, 0, 0]
    assert worker_batches(7, 0, 0) == 7  # no workers: the main process is the one consumer
    assert sum(worker_batches(10, w, 4) for w in range(4)) == 10


def test_position_rules():
    saved = LoaderPosition(batches=40, world_size=2, num_workers=2, batch_size=4, seed=0, manifest="m.json")
    assert LoaderPosition.from_json(saved.to_json()) == saved
    assert batches_to_skip(saved, saved) == (40, (), True)
    with_positions = replace(saved, next_index=(81, 83), skipped=4)
    assert LoaderPosition.from_json(with_positions.to_json()) == with_positions
    assert batches_to_skip(with_positions, saved) == (40, (81, 83), True)
    doubled = replace(with_positions, world_size=4)  # same samples seen globally: half the batches per rank
    assert batches_to_skip(with_positions, doubled) == (20, (), False)
    assert batches_to_skip(saved, replace(saved, batch_size=8)) == (20, (), False)
    assert batches_to_skip(saved, replace(saved, manifest="other.json")) == (0, (), False)


def test_shard_ref_without_offsets_still_counts_samples(tmp_path):
    # A manifest that claims more samples than the shard holds is caught at the end.
    ref = ShardRef(path=str(tmp_path / "missing.tar"), num_samples=1, first_index=0)
    with pytest.raises(loader_io.ShardReadError, match="missing.tar"):
        next(read_shard(ref))


def test_manifest_offsets_reach_the_reader(data_dir):
    # The shard writer records each sample's offset; the loader passes them on for seeking.
    for ref in shard_refs(load_manifest(data_dir / manifest_name("train"))):
        assert ref.offsets == _offsets(ref.path)
