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
