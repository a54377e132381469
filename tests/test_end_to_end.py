"""End to end through the real CLI: shards -> Ray Train with 2 DeepSpeed workers ->
checkpoints and metrics -> a resumed run continues the step count -> eval and predict."""

import json

import pytest
import torch
from e2e_helpers import launcher  # tests/ is on sys.path under pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from data_pipeline.config import SyntheticConfig
from data_pipeline.shard_writer import write_shards
from data_pipeline.synthetic import synthetic_source
from launcher.checkpoint import find_latest_checkpoint, load_model_weights, verify_checkpoint
from launcher.config import config_from_dict
from model.build import build_model
from ops.host_allocator import jemalloc_installed

pytestmark = pytest.mark.e2e


def test_train_checkpoint_resume_eval_predict(dataset, tmp_path):
    common = ["--config", "configs/test_tiny.yaml",
              "--set", f"data.train_manifest={dataset}/train-manifest.json",
              "--set", f"data.val_manifest={dataset}/val-manifest.json",
              "--set", f"train.output_dir={tmp_path}", "--set", "train.run_name=e2e"]
    code, log = launcher("train", *common)
    assert code == 0, log
    run_dir = tmp_path / "e2e"
    first = find_latest_checkpoint(str(run_dir))
    assert first is not None, log
    meta = verify_checkpoint(first)
    assert meta.step == 4 and meta.world_size == 2 and meta.zero_stage == 1
    assert meta.data_position["batches"] == 4 and meta.data_position["world_size"] == 2
    assert "step 4/4" in log and "samples/s" in log and "eta" in log
    assert "validation mIoU" in log
    # CPU workers' allocator: host_allocator "auto" preloads jemalloc where it is installed
    # (as on CI), so this also shows that the preload reached Ray's worker processes.
    allocator = "jemalloc" if jemalloc_installed() else "glibc"
    assert f"host memory: {allocator} keeps freed memory for the next step" in log
    targets = json.loads((run_dir / "prometheus_targets.json").read_text())
    assert len(targets[0]["targets"]) == 2 and all(t.startswith("127.0.0.1:") for t in targets[0]["targets"])
    # the live discovery file of a finished run is removed (its exporters are gone)
    assert (tmp_path / "prometheus_targets").is_dir() and not (tmp_path / "prometheus_targets" / "e2e.json").exists()
    for rank in (0, 1):
        text = (run_dir / "metrics" / f"rank_{rank}.prom").read_text()
        assert f'segscale_step{{rank="{rank}",run="e2e"}} 4.0' in text

    # Same command, same run name, more steps: Ray hands back the latest checkpoint.
    code, log = launcher("train", *common, "--set", "train.max_steps=6")
    assert code == 0, log
    validated = log
    assert "resumed from" in log and "at step 4" in log and "step 5/6" in log and "step 1/" not in log
    assert "data stream continues exactly after 4 batches per rank" in log
    latest = find_latest_checkpoint(str(run_dir))
    assert verify_checkpoint(latest).step == 6
    # keep_checkpoints=2: older ones are deleted
    assert len([d for d in run_dir.glob("checkpoint_*") if d.is_dir()]) == 2

    out_json = tmp_path / "eval.json"
    code, log = launcher("eval", "--checkpoint", str(run_dir), "--json", str(out_json))
    assert code == 0, log
    results = json.loads(out_json.read_text())
    assert 0.0 <= results["miou"] <= 1.0 and results["pixels"] == 6 * 64 * 64
    assert results["checkpoint"] == latest
    # The checkpoint evaluates to what the run printed at its step (the workers' BatchNorm
    # statistics are averaged before validation and checkpoint: test_batchnorm_sync.py).
    printed = f"step 6: validation mIoU {results['miou']:.4f} (pixel accuracy {results['pixel_accuracy']:.4f})"
    assert printed in validated, validated
    assert "host memory: glibc keeps freed memory for the next step" in log  # eval: its own process, glibc

    code, log = launcher("predict", "--checkpoint", latest, "--out", str(tmp_path / "pred"), "--num", "3")
    assert code == 0, log
    pictures = sorted(p.name for p in (tmp_path / "pred").glob("*.png"))
    assert len(pictures) == 3
    with Image.open(tmp_path / "pred" / pictures[0]) as im:
        assert im.mode == "RGB" and im.width == 3 * im.height  # image | prediction | ground truth
    # ... and beside them the predicted label maps, one per overlay, for eval-semantic.
    assert sorted(p.name for p in (tmp_path / "pred" / "labels").glob("*.png")) == pictures

    # Export: the consolidated fp32 weights load strictly into a model built from the
    # config in the file's metadata.
    exported = tmp_path / "model.safetensors"
    code, log = launcher("export", "--checkpoint", str(run_dir), "--out", str(exported))
    assert code == 0 and str(exported) in log, log
    with safe_open(str(exported), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["segscale_step"] == "6"
    assert exported.stat().st_mode & 0o777 == 0o644  # readable by whoever serves the model
    weights = load_file(str(exported))
    model = build_model(config_from_dict(json.loads(metadata["segscale_config"])).model)
    model.load_state_dict(weights, strict=True)
    before = load_model_weights(latest)
    assert all(torch.equal(weights[k], before[k]) for k in before)
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())

    # Resume on ONE worker: the driver converts the 2-worker ZeRO-1 checkpoint to
    # DeepSpeed's universal form; the weights continue from it (a failed load would
    # leave the random initialisation, far from the step-6 weights).
    code, log = launcher("train", *common, "--set", "train.max_steps=7", "--set", "cluster.num_workers=1")
    assert code == 0, log
    assert "converting it to DeepSpeed's universal format for 1 worker" in log, log
    assert "at step 6" in log and "data stream continues approximately" in log and "step 7/7" in log
    final = find_latest_checkpoint(str(run_dir))
    meta = verify_checkpoint(final)
    assert meta.step == 7 and meta.world_size == 1 and meta.resumes == 2
    # The checkpoint records the validation it was saved after (the driver's check for a
    # run that reached train.target_miou reads it: test_preflight.py).
    assert meta.val_step == 7 and f"step 7: validation mIoU {meta.val_miou:.4f}" in log, (meta, log)
    # Ray Train's per-checkpoint report lines stay in its log files, off the console.
    assert "Reporting training result" not in log and "Checkpoint successfully created" not in log
    after = load_model_weights(final)
    # Parameters only: BatchNorm running statistics move with every forward pass.
    drift = max((after[k] - before[k]).abs().max().item() for k, _ in model.named_parameters())
    assert 0 < drift < 1e-2, drift

    # The same command again (a retried job that had finished): nothing to train, no Ray.
    code, log = launcher("train", *common, "--set", "train.max_steps=7", "--set", "cluster.num_workers=1")
    assert code == 0, log
    assert "run e2e is complete: checkpoint" in log and "at step 7" in log and f"checkpoint: {final}" in log
    assert "local Ray instance" not in log and find_latest_checkpoint(str(run_dir)) == final


def test_zero3_fp32_with_uneven_validation(dataset, tmp_path):
    """ZeRO-3 gathers parameters in every forward: validation with 5 images on 2 ranks
    (3 + 2) must keep the ranks in step instead of hanging."""
    synthetic = SyntheticConfig(num_classes=5, image_size=64, seed=4)
    write_shards(synthetic_source(synthetic, "val", 5), tmp_path / "val5", "val", max_count=5)
    code, log = launcher("train", "--config", "configs/test_tiny.yaml",
                         "--set", f"data.train_manifest={dataset}/train-manifest.json",
                         "--set", f"data.val_manifest={tmp_path}/val5/val-manifest.json",
                         "--set", f"train.output_dir={tmp_path}", "--set", "train.run_name=z3",
                         "--set", "train.zero_stage=3", "--set", "train.precision=fp32",
                         "--set", "train.max_steps=2", "--set", "model.backbone.grad_checkpointing=true",
                         "--set", "model.pixel_decoder.grad_checkpointing=true",
                         "--set", "model.decoder.grad_checkpointing=true", timeout=300)
    assert code == 0, log
    meta = verify_checkpoint(find_latest_checkpoint(str(tmp_path / "z3")))
    assert meta.step == 2 and meta.zero_stage == 3
    assert "validation mIoU" in log
    # ZeRO-3 weights are consolidated from the partitions for evaluation
    code, log = launcher("eval", "--checkpoint", str(tmp_path / "z3"))
    assert code == 0 and "mIoU" in log, log
    # ZeRO-3 partitions are converted too, for a resume on one worker
    code, log = launcher("train", "--config", "configs/test_tiny.yaml",
                         "--set", f"data.train_manifest={dataset}/train-manifest.json",
                         "--set", f"data.val_manifest={tmp_path}/val5/val-manifest.json",
                         "--set", f"train.output_dir={tmp_path}", "--set", "train.run_name=z3",
                         "--set", "train.zero_stage=3", "--set", "train.precision=fp32",
                         "--set", "train.max_steps=3", "--set", "cluster.num_workers=1", timeout=300)
    assert code == 0 and "universal format for 1 worker" in log and "step 3/3" in log, log
    assert verify_checkpoint(find_latest_checkpoint(str(tmp_path / "z3"))).world_size == 1


def test_bad_input_is_one_line_error(tmp_path):
    cases = [
        (["train", "--config", "configs/test_tiny.yaml", "--set", "train.max_stepz=3"], "train.max_stepz"),
        (["train", "--config", "configs/test_tiny.yaml", "--set", f"data.train_manifest={tmp_path}/none.json"],
         "data.train_manifest"),
        (["eval", "--checkpoint", str(tmp_path / "nothing")], "no such checkpoint or run folder"),
        (["eval", "--config", "configs/test_tiny.yaml"], "train.run_name"),
        (["train", "--config", "configs"], "configs"),
    ]
    for args, fragment in cases:
        code, log = launcher(*args, timeout=60)
        lines = log.strip().splitlines()
        assert code == 2, log
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], log
