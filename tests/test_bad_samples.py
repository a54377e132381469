# ruff: noqa: I001  (ops.torchvision_fix must come first, before anything imports torchvision)
"""data.on_error: a bad training sample (label out of range, truncated shard) is a
one-line error under "raise", and under "skip" a counted, logged skip that keeps the
stream exactly resumable; evaluation always raises."""

import ops.torchvision_fix  # noqa: F401

import dataclasses
import itertools
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from data_pipeline.config import DataConfig, SyntheticConfig
from data_pipeline.loader import ShardReadError, build_eval_loader, build_train_loader
from data_pipeline.shard_writer import manifest_name, write_shards
from data_pipeline.synthetic import synthetic_source
from data_pipeline.train_stream import LoaderPosition, StreamTracker

SYNTH = SyntheticConfig(num_classes=5, image_size=24, seed=0)
N, PER_SHARD, BAD_LABEL = 40, 8, 5  # sample 5 gets label 9 (5 classes)


def _load_with_a_bad_label(index: int, load):
    sample = load(index)
    if index == BAD_LABEL:
        semantic = sample.semantic.copy()
        semantic[:4, :4] = 9
        sample = dataclasses.replace(sample, semantic=semantic)
    return sample


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad")
    source = synthetic_source(SYNTH, "train", N)
    source = dataclasses.replace(source, load=partial(_load_with_a_bad_label, load=source.load))
    write_shards(source, out, "train", max_count=PER_SHARD, progress=False)
    last = out / "train-000004.tar"  # samples 32..39: cut the shard after about half
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    return out


def _cfg(data_dir: Path, **overrides) -> DataConfig:
    cfg = DataConfig(
        train_manifest=str(data_dir / manifest_name("train")),
        val_manifest=str(data_dir / manifest_name("train")),
        crop_size=16,
        batch_size=4,
        shuffle_buffer=6,
    )
    return replace(cfg, **overrides)


def test_raise_stops_training_at_the_first_bad_sample(bad_data):
    # One epoch (10 batches) meets both the bad label and the truncated shard.
    with pytest.raises(ShardReadError, match=r"train-00000[04].tar"):
        list(itertools.islice(build_train_loader(_cfg(bad_data), 0, 1), 10))


def test_evaluation_always_raises_naming_shard_and_sample(bad_data):
    # Manifest order: shard 0's sample 5 comes before the truncated last shard.
    expected = r"train-000000.tar: sample train_00000005: label value 9 out of range \(classes 0..4, ignore 255\)"
    with pytest.raises(ShardReadError, match=expected):
        list(build_eval_loader(_cfg(bad_data, on_error="skip"), 0, 1))


def test_skip_leaves_bad_samples_out_and_counts_them(bad_data, capsys):
    cfg = _cfg(bad_data, on_error="skip")
    batches = list(itertools.islice(build_train_loader(cfg, 0, 1), 20))  # two epochs of 40 positions
    keys = [k for b in batches[:8] for k in b["keys"]]
    assert "train_00000005" not in keys
    assert len(set(keys)) == len(keys)  # nothing repeated within the first epoch
    role, next_index, skipped = batches[-1]["stream"]
    assert role == 0 and skipped > 1 and next_index == 20 * 4 + skipped  # bad samples hold positions
    err = capsys.readouterr().err
    assert "skipped (1 so far)" in err and "label value 9" in err and "train-000004.tar" in err
    # The cut-off shard fails its 4 remaining samples alike: printed once an epoch, and the
    # other 3 counted when the next epoch starts.
    cut = [line for line in err.splitlines() if "ends inside member 'train_00000036" in line]
    assert len(cut) in (2, 3), err  # epochs 0, 1 and (read ahead) 2: once each
    for epoch in (0, 1):
        assert err.count(f"rank 0 worker 0: in epoch {epoch}, 3 more samples skipped with errors shown above") == 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_skips_is_exact(bad_data, num_workers):
    cfg = _cfg(bad_data, on_error="skip", num_workers=num_workers)
    layout = LoaderPosition(batches=0, world_size=1, num_workers=num_workers, batch_size=4, seed=0, manifest="m")
    full_stream = build_train_loader(cfg, 0, 1)
    full = list(itertools.islice(full_stream, 18))
    full_stream.close()
    tracker = StreamTracker(layout, 0)
    for batch in full[:7]:
        tracker.observe(batch)
    position = tracker.position()
    assert position.batches == 7 and position.skipped >= 1
    resumed_stream = build_train_loader(cfg, 0, 1, position.batches, position.next_index)
    resumed = list(itertools.islice(resumed_stream, 11))
    resumed_stream.close()
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[7:]]
    # Counting batches alone would be off by the skipped samples.
    naive_stream = build_train_loader(cfg, 0, 1, position.batches)
    naive = list(itertools.islice(naive_stream, 3))
    naive_stream.close()
    assert [b["keys"] for b in naive] != [b["keys"] for b in full[7:10]]
