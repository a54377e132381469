"""Pre-flight checks: bad runs fail on the driver, in a second, naming the key."""

import os
from dataclasses import replace

import pytest
import torch

from data_pipeline.config import SyntheticConfig
from data_pipeline.shard_writer import write_shards
from data_pipeline.synthetic import synthetic_source
from launcher.checkpoint import META_FILE
from launcher.config import ConfigError, load_config
from launcher.preflight import RAY_JOB_ENV_VAR, check_paths_for_job, check_resume, check_run
from model.build import build_model
from ops.atomic_file import write_json_atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(*overrides):
    return load_config(os.path.join(REPO, "configs", "test_tiny.yaml"), list(overrides))


def test_valid_config_passes(manifests):
    check_run(config(*manifests))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.checkpoint_every=0", "train.checkpoint_every: expected a positive int, got 0"),
        ("train.log_every=-1", "train.log_every: expected a positive int"),
        ("train.eval_every=-5", "train.eval_every"),
        ("train.lr_schedule=step", r"train.lr_steps: train.lr_schedule=step needs at least one step"),
        ("train.zero_stage=5", "train.zero_stage: expected 0, 1, 2 or 3, got 5"),
        ("train.zero_bucket_elements=0", "train.zero_bucket_elements: expected a positive element count, got 0"),
        ("train.precision=fp16", "train.precision: fp16 needs a CUDA device"),
        ("model.num_classes=7", "model.num_classes: 7, but data.train_manifest"),
        ("data.ignore_index=0", "data.train_manifest: .* labels ignore as 255 but data.ignore_index is 0"),
        ("train.output_dir=s3://bucket/runs", "train.output_dir: 's3://bucket/runs': object storage"),
        ("cluster.num_workers=0", "cluster.num_workers"),
    ],
)
def test_bad_values_are_named(manifests, override, message):
    with pytest.raises(ConfigError, match=message):
        check_run(config(*manifests, override))


def test_missing_manifest_is_named(tmp_path, manifests):
    with pytest.raises(ConfigError, match=r"data.train_manifest: .*missing.json"):
        check_run(config(f"data.train_manifest={tmp_path}/missing.json"))
    with pytest.raises(ConfigError, match="data.val_manifest is not set"):
        check_run(config(manifests[0], "data.val_manifest=''"))


def test_zero3_workers_checkpoint_reentrantly():
    from launcher.environment import runtime_env_vars

    assert runtime_env_vars(zero_stage=3)["TIMM_REENTRANT_CKPT"] == "1"
    assert "TIMM_REENTRANT_CKPT" not in runtime_env_vars(zero_stage=1)


def test_workers_get_the_users_thread_and_allocator_settings(monkeypatch):
    from launcher.environment import runtime_env_vars

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4194304")
    monkeypatch.setenv("SEGSCALE_NATIVE_OPS", "0")  # checked on the driver, applied in the workers
    env = runtime_env_vars()
    assert env["OMP_NUM_THREADS"] == "3" and env["MALLOC_MMAP_THRESHOLD_"] == "4194304"
    assert env["SEGSCALE_NATIVE_OPS"] == "0"
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert "MALLOC_MMAP_THRESHOLD_" not in runtime_env_vars()  # glibc's own default unless set
    # Every setting a worker's host_allocator defers to reaches it, so a cluster's workers
    # leave malloc to the user as a local instance's (which inherit the driver's) do.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.top_pad=0")
    env = runtime_env_vars()
    assert env["MALLOC_TRIM_THRESHOLD_"] == "1048576" and env["GLIBC_TUNABLES"] == "glibc.malloc.top_pad=0"
    # ... and then no jemalloc is preloaded: the user's glibc settings are what runs.
    assert "LD_PRELOAD" not in runtime_env_vars(cpu_allocator="jemalloc")


def test_cpu_workers_start_with_the_chosen_allocator(monkeypatch):
    from launcher.environment import runtime_env_vars
    from ops import host_allocator

    for name in ("LD_PRELOAD", "MALLOC_CONF", *host_allocator.MALLOC_ENV_VARS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(host_allocator, "jemalloc_installed", lambda: True)
    env = runtime_env_vars(cpu_allocator="auto")
    assert env["LD_PRELOAD"] == "libjemalloc.so.2" and env["MALLOC_CONF"] == host_allocator.JEMALLOC_CONF
    assert "LD_PRELOAD" not in runtime_env_vars(cpu_allocator="glibc")
    assert "LD_PRELOAD" not in runtime_env_vars(use_gpu=True, cpu_allocator="auto")  # GPU workers: malloc as is
    monkeypatch.setattr(host_allocator, "jemalloc_installed", lambda: False)
    assert "LD_PRELOAD" not in runtime_env_vars(cpu_allocator="auto")


def test_missing_jemalloc_fails_the_run_before_ray_starts(monkeypatch, manifests):
    from ops import host_allocator

    monkeypatch.setattr(host_allocator, "jemalloc_installed", lambda: False)
    check_run(config(*manifests, "cluster.host_allocator=auto"))  # auto: glibc instead
    with pytest.raises(ConfigError, match=r"cluster.host_allocator: 'jemalloc', but libjemalloc\.so\.2 is not installed"):
        check_run(config(*manifests, "cluster.host_allocator=jemalloc"))
    check_run(config(*manifests, "cluster.host_allocator=jemalloc", "cluster.keep_freed_memory=false"))


def test_a_bad_native_ops_switch_fails_the_run_before_ray_starts(monkeypatch, manifests):
    monkeypatch.setenv("SEGSCALE_NATIVE_OPS", "off")
    with pytest.raises(ConfigError, match=r"SEGSCALE_NATIVE_OPS must be 0 \(PyTorch path\) or 1 \(C kernels\), "
                                          r"got 'off'"):
        check_run(config(*manifests))
    monkeypatch.setenv("SEGSCALE_NATIVE_OPS", "0")
    check_run(config(*manifests))


def test_relative_paths_refused_inside_ray_job(monkeypatch):
    cfg = config()  # test_tiny.yaml's output_dir is the relative 'runs'
    check_paths_for_job(cfg)  # outside a job: fine
    monkeypatch.setenv(RAY_JOB_ENV_VAR, "{}")
    with pytest.raises(ConfigError, match="train.output_dir: 'runs' is relative; inside a Ray job"):
        check_paths_for_job(cfg)


def test_resume_checkpoint_choice_and_world_size_rule(tmp_path):
    from launcher.checkpoint import read_meta
    from launcher.universal_checkpoint import needs_universal

    checkpoint = tmp_path / "run" / "checkpoint_1"
    checkpoint.mkdir(parents=True)
    write_json_atomic(checkpoint / "files_rank_0.json", {})
    write_json_atomic(checkpoint / META_FILE, {"step": 3, "world_size": 1, "zero_stage": 1, "config": {}})
    # Another world size is no longer refused: the driver converts the checkpoint.
    assert check_resume(config(), str(tmp_path / "run")) == str(checkpoint)
    meta = read_meta(str(checkpoint))
    assert needs_universal(meta, 2) and not needs_universal(meta, 1)
    meta.zero_stage = 0  # whole states load on any world size
    assert not needs_universal(meta, 2)
    # An explicit resume_from that is not a complete checkpoint is an error naming it.
    broken = tmp_path / "elsewhere"
    broken.mkdir()
    with pytest.raises(ConfigError, match="train.resume_from: .*elsewhere: not a segscale checkpoint"):
        check_resume(config(f"train.resume_from={broken}"), str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="train.resume_from: .*nowhere: no such checkpoint folder"):
        check_resume(config(f"train.resume_from={tmp_path / 'nowhere'}"), str(tmp_path / "run"))


def test_reduce_zero_label_drops_class_zero_from_the_count(manifests):
    # the synthetic manifests name 5 stored labels; reducing label 0 leaves 4 classes
    check_run(config(*manifests, "data.reduce_zero_label=true", "model.num_classes=4"))
    with pytest.raises(ConfigError, match="has 4 classes after data.reduce_zero_label"):
        check_run(config(*manifests, "data.reduce_zero_label=true"))


def test_panoptic_task_needs_a_model_with_panoptic_inference(manifests):
    with pytest.raises(ConfigError, match="data.task=panoptic: model.name=pft has no panoptic inference"):
        check_run(config(*manifests, "data.task=panoptic", "model.name=pft"))
    check_run(config(*manifests, "data.task=panoptic"))  # MaskFormer: fine


def test_malformed_fault_drill_is_refused(manifests, monkeypatch):
    monkeypatch.setenv("SEGSCALE_FAULT", "after_stpe:3:1")
    with pytest.raises(ConfigError, match="SEGSCALE_FAULT='after_stpe:3:1': expected <point>:<step>:<rank>"):
        check_run(config(*manifests))
    monkeypatch.setenv("SEGSCALE_FAULT", "after_step:3:1")
    check_run(config(*manifests))


def test_model_and_pretrained_file_are_checked_before_ray_starts(manifests, tmp_path):
    with pytest.raises(ConfigError, match="model.backbone.name='resnet9000' is not a timm model"):
        check_run(config(*manifests, "model.backbone.name=resnet9000"))
    with pytest.raises(ConfigError, match=r"model.backbone.pretrained_path: no such file: .*nope.pth"):
        check_run(config(*manifests, f"model.backbone.pretrained_path={tmp_path}/nope.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ConfigError, match=r"pretrained_path: .*wrong.pth does not fit the backbone: no tensor name in common "
                                              r"with timm's '\w+' \(1 tensor, first keys: fc.weight; expected: "):
        check_run(config(*manifests, f"model.backbone.pretrained_path={wrong}"))
    # The weights of the configured backbone itself fit (and only keys and shapes are read).
    state = build_model(config().model).backbone.body.state_dict()
    fitting = tmp_path / "fitting.pth"
    torch.save(state, fitting)
    check_run(config(*manifests, f"model.backbone.pretrained_path={fitting}"))
    # safetensors: read as shapes alone; a wrong shape is named.
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "fitting.safetensors")
    check_run(config(*manifests, f"model.backbone.pretrained_path={tmp_path / 'fitting.safetensors'}"))
    first = next(k for k, v in state.items() if v.dim() == 4)
    save_file({**{k: v.contiguous() for k, v in state.items()}, first: torch.zeros(1, 1, 1, 1)},
              tmp_path / "reshaped.safetensors")
    with pytest.raises(ConfigError, match=rf"1 shape mismatches file vs model \(first: {first} \(1, 1, 1, 1\)"):
        check_run(config(*manifests, f"model.backbone.pretrained_path={tmp_path / 'reshaped.safetensors'}"))


def test_a_shard_cut_short_is_named_before_ray_starts(tmp_path, capsys):
    for split in ("train", "val"):
        write_shards(synthetic_source(SyntheticConfig(num_classes=5), split, 4), tmp_path, split, max_count=2)
    shard = tmp_path / "train-000001.tar"
    full = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: full // 2])  # a copy that stopped half-way
    paths = [f"data.train_manifest={tmp_path}/train-manifest.json", f"data.val_manifest={tmp_path}/val-manifest.json"]
    expected = rf"data.train_manifest: shard {shard}: {full // 2} bytes, manifest says {full} \(cut short"
    with pytest.raises(ConfigError, match=expected):
        check_run(config(*paths))
    check_run(config(*paths, "data.on_error=skip"))  # the user accepts losing samples: a warning
    assert f"warning: data.train_manifest: shard {shard}" in capsys.readouterr().out
    # Evaluation never skips: a validation shard cut short is an error whatever on_error says.
    val_shard = tmp_path / "val-000000.tar"
    val_shard.write_bytes(val_shard.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=rf"data.val_manifest: shard {val_shard}: 1000 bytes"):
        check_run(config(*paths, "data.on_error=skip"))
    val_shard.unlink()
    with pytest.raises(ConfigError, match=rf"data.val_manifest: shard {val_shard}: cannot read: No such file"):
        check_run(config(*paths, "data.on_error=skip"))


def test_a_checkpoint_from_elsewhere_past_max_steps_is_refused(manifests, tmp_path):
    from launcher.driver import run_training

    checkpoint = tmp_path / "other-run" / "checkpoint_1"
    checkpoint.mkdir(parents=True)
    write_json_atomic(checkpoint / "files_rank_0.json", {})
    write_json_atomic(checkpoint / META_FILE, {"step": 9, "world_size": 1, "zero_stage": 1, "config": {}})
    cfg = config(*manifests, f"train.resume_from={checkpoint}", f"train.output_dir={tmp_path}",
                 "train.run_name=new-run")  # test_tiny: max_steps 4
    with pytest.raises(ConfigError, match=r"train.resume_from: .*checkpoint_1 is at step 9, not before "
                                          r"train.max_steps=4: nothing to train"):
        run_training(cfg)  # before Ray starts
    assert not (tmp_path / "new-run").exists()


def test_a_run_that_reached_target_miou_is_complete(manifests, tmp_path, capsys):
    """A retried run whose own checkpoint's validation reached train.target_miou stopped
    there: nothing to train, no Ray, exit 0 (a checkpoint from elsewhere is trained on)."""
    from launcher.checkpoint import read_meta
    from launcher.driver import completed, run_training

    checkpoint = tmp_path / "run" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    write_json_atomic(checkpoint / "files_rank_0.json", {})
    write_json_atomic(checkpoint / META_FILE, {"step": 2, "world_size": 1, "zero_stage": 1, "config": {},
                                               "val_step": 2, "val_miou": 0.75})
    cfg = config(*manifests, f"train.output_dir={tmp_path}", "train.run_name=run",
                 "train.target_miou=0.7")  # test_tiny: max_steps 4
    outcome = run_training(cfg)
    assert not outcome.trained and outcome.checkpoint == str(checkpoint)
    out = capsys.readouterr().out
    assert (f"run run is complete: checkpoint {checkpoint} reached validation mIoU 0.7500 at step 2, "
            "train.target_miou is 0.7; nothing to train") in out, out
    assert not (tmp_path / "run" / "config.yaml").exists()  # returned before Ray and the run's files

    meta = read_meta(str(checkpoint))
    assert (meta.val_step, meta.val_miou) == (2, 0.75)
    assert completed(config("train.target_miou=0.8").train, meta) is None  # target above: train on
    assert completed(config("train.target_miou=0").train, meta) is None  # no target
    assert "is at step 4" in completed(config().train, replace(meta, step=4))  # max_steps still counts
    older = replace(meta, val_step=None, val_miou=None)  # written before validations were recorded
    assert completed(config("train.target_miou=0.7").train, older) is None
