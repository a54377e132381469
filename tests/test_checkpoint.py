"""Checkpoint verification: a folder cut short is detected and never picked."""

import json
import os

import pytest

from launcher.checkpoint import (
    META_FILE,
    CheckpointError,
    _list_files,
    find_latest_checkpoint,
    verify_checkpoint,
)
from ops.atomic_file import write_json_atomic


def fake_checkpoint(root, name, step, world_size=2):
    directory = os.path.join(root, name)
    for rank in range(world_size):
        shard = os.path.join(directory, "deepspeed", "state", f"rank{rank}.pt")
        os.makedirs(os.path.dirname(shard), exist_ok=True)
        with open(shard, "wb") as f:
            f.write(os.urandom(100 + rank))
    for rank in range(world_size):
        listing = {k: v for k, v in _list_files(directory).items() if f"rank{rank}" in k}
        write_json_atomic(os.path.join(directory, f"files_rank_{rank}.json"), listing)
    write_json_atomic(os.path.join(directory, META_FILE),
                 {"step": step, "world_size": world_size, "zero_stage": 1, "config": {}})
    return directory


def test_latest_verified_is_picked(tmp_path):
    fake_checkpoint(tmp_path, "checkpoint_a", step=10)
    newest = fake_checkpoint(tmp_path, "checkpoint_b", step=20)
    assert verify_checkpoint(newest).step == 20
    assert find_latest_checkpoint(str(tmp_path)) == newest


@pytest.mark.parametrize("damage", ["truncate", "drop_rank_list", "drop_meta", "bad_meta"])
def test_damaged_checkpoint_is_skipped(tmp_path, damage):
    older = fake_checkpoint(tmp_path, "checkpoint_a", step=10)
    newest = fake_checkpoint(tmp_path, "checkpoint_b", step=20)
    if damage == "truncate":
        with open(os.path.join(newest, "deepspeed", "state", "rank1.pt"), "r+b") as f:
            f.truncate(10)
        expected = "rank1.pt is missing or truncated"
    elif damage == "drop_rank_list":
        os.remove(os.path.join(newest, "files_rank_1.json"))
        expected = "rank 1's file list is missing"
    elif damage == "drop_meta":
        os.remove(os.path.join(newest, META_FILE))
        expected = "not a segscale checkpoint"
    else:
        with open(os.path.join(newest, META_FILE), "w") as f:
            json.dump({"step": "x"}, f)
        expected = "unreadable checkpoint metadata"
    with pytest.raises(CheckpointError, match=expected):
        verify_checkpoint(newest)
    assert find_latest_checkpoint(str(tmp_path)) == older


def test_checkpoints_ray_does_not_track_are_pruned_once_superseded(tmp_path):
    """A checkpoint written just before a failure can miss Ray Train's record (seen: the
    step-4 one of a run killed at step 5); the resumed run's newer checkpoints make it
    redundant, and Ray would never delete it."""
    from launcher.checkpoint import RAY_CHECKPOINT_SNAPSHOT, prune_untracked_checkpoints

    for name, step in (("checkpoint_2", 2), ("checkpoint_4", 4), ("checkpoint_6", 6), ("checkpoint_8", 8),
                       ("checkpoint_10", 10)):
        fake_checkpoint(tmp_path, name, step)

    def record(*names):
        write_json_atomic(tmp_path / RAY_CHECKPOINT_SNAPSHOT,
                          {"checkpoint_results": [{"checkpoint_dir_name": n, "metrics": {}} for n in names]})

    assert prune_untracked_checkpoints(str(tmp_path)) == []  # no record: nothing is touched
    record("checkpoint_6", "checkpoint_8")
    # 2 and 4 are superseded; 10 is newer than every tracked one: where the run resumes.
    assert prune_untracked_checkpoints(str(tmp_path)) == [(str(tmp_path / "checkpoint_2"), 2),
                                                          (str(tmp_path / "checkpoint_4"), 4)]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*") if p.is_dir()) == [
        "checkpoint_10", "checkpoint_6", "checkpoint_8"]
    (tmp_path / RAY_CHECKPOINT_SNAPSHOT).write_text("{not json")  # another Ray's format: leave all
    assert prune_untracked_checkpoints(str(tmp_path)) == []
