"""The DeepSpeed engine and config the trainer builds (launcher/engine.py,
launcher/deepspeed_config.py)."""

import json
import os
import subprocess
import sys

import pytest

from launcher.config import TrainConfig
from launcher.deepspeed_config import build_deepspeed_config

HERE = os.path.dirname(os.path.abspath(__file__))


def test_zero_bucket_is_capped_at_the_trainable_parameters():
    cfg = TrainConfig(zero_stage=3)
    assert (
        build_deepspeed_config(cfg, 2)["zero_optimization"]["reduce_bucket_size"] == cfg.zero_bucket_elements
    )
    capped = build_deepspeed_config(cfg, 2, trainable_params=1000)
    assert capped["zero_optimization"]["reduce_bucket_size"] == 1000


def test_zero_bucket_must_be_positive():
    with pytest.raises(
        ValueError, match="train.zero_bucket_elements: expected a positive element count, got 0"
    ):
        build_deepspeed_config(TrainConfig(zero_bucket_elements=0), 2)


def test_bf16_gradients_are_reduced_in_fp32():
    """No module's gradients go through DeepSpeed's bf16 reduction."""
    autocast = build_deepspeed_config(TrainConfig(precision="bf16"), 2)["torch_autocast"]
    assert autocast["enabled"] and autocast["dtype"] == "bfloat16"
    assert autocast["lower_precision_safe_modules"] == []


def _probe(script: str, *args: str) -> dict:
    """Runs ``tests/<script>`` in a fresh process; the JSON line it prints last."""
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(HERE),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def zero3_runs():
    return _probe("zero3_master_probe.py")


def test_zero3_master_weights_share_the_parameter_partitions(zero3_runs):
    assert zero3_runs["numel"] > 0
    assert all(zero3_runs["shared_storage"]), zero3_runs["shared_storage"]


def test_zero3_training_is_unchanged_by_sharing_the_master_weights(zero3_runs):
    """Bit for bit what DeepSpeed's own second copy gives: same losses, same weights."""
    assert zero3_runs["weights_moved"]
    assert zero3_runs["shared_losses"] == zero3_runs["copied_losses"]
    assert zero3_runs["weights_equal"] and zero3_runs["masters_equal"]


@pytest.fixture(scope="module")
def zero3_universal_resume():
    return _probe("zero3_universal_probe.py")


def test_zero3_universal_resume_continues_exactly(zero3_universal_resume):
    """Resuming a ZeRO-3 checkpoint through its universal form (how a run resumes on
    another number of workers) continues as the run that was never interrupted: same
    losses, each group's weight decay and lr, one AdamW step per step."""
    result = zero3_universal_resume
    assert result["weight_decays_after_load"] == [0.0, 0.5]
    assert result["groups_match"]
    assert result["steps_resumed"] == result["steps_first"] == [4.0] * len(result["steps_first"])
    assert result["resumed"] == result["continued"]


def test_zero3_trains_swin_with_every_part_checkpointed():
    """ZeRO-3 gathers the Swin weights segscale's blocks read outside their submodules'
    forward (also when a reentrant checkpoint recomputes a block in backward): the first
    step's loss and every gradient equal the same model's outside DeepSpeed."""
    result = _probe("zero3_swin_probe.py")
    assert result["swin_parameters"] > 0 and result["missing_grads"] == []
    assert result["zero3_loss"] == result["plain_loss"]
    assert result["max_grad_difference"] <= 1e-6 * result["max_plain_grad"], result
