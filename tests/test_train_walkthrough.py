"""What a user meets resuming a run with changed settings or a damaged checkpoint: each
case is decided on the driver, before Ray starts, in one line."""

import os

import pytest
from test_preflight import config  # tests/ is on sys.path

from launcher.checkpoint import META_FILE, read_meta
from launcher.config import ConfigError
from launcher.preflight import check_resume_fits
from launcher.typed_config import to_dict
from ops.atomic_file import write_json_atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_checkpoint(folder, step=2, zero_stage=1, trained_with=()):
    """A verified checkpoint (no DeepSpeed files listed) whose metadata records the
    config it was trained with, as rank 0 writes it."""
    folder.mkdir(parents=True)
    write_json_atomic(folder / "files_rank_0.json", {})
    write_json_atomic(folder / META_FILE, {"step": step, "world_size": 1, "zero_stage": zero_stage,
                                           "config": to_dict(config(*trained_with))})
    return str(folder)


def test_resuming_with_another_model_is_refused_before_ray_starts(manifests, tmp_path):
    from launcher.driver import run_training

    fake_checkpoint(tmp_path / "run" / "checkpoint_1")  # test_tiny's model: decoder.hidden_dim 64
    cfg = config(*manifests, f"train.output_dir={tmp_path}", "train.run_name=run", "model.decoder.hidden_dim=32")
    with pytest.raises(ConfigError) as caught:
        run_training(cfg)
    message = str(caught.value)
    assert message.startswith(f"model: checkpoint {tmp_path}/run/checkpoint_1 (step 2, chosen by "
                              "train.run_name=run) does not fit this config's model ("), message
    assert "in the checkpoint, [32, 32] here" in message and "mismatched tensors" in message, message
    assert "model.decoder.hidden_dim=32 (checkpoint: 64)" in message, message
    assert "\n" not in message
    # The run's saved config (what the resume hint names) still holds the model that fits.
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_settings_that_leave_the_weights_alone_resume(tmp_path):
    directory = fake_checkpoint(tmp_path / "checkpoint_1")
    meta = read_meta(directory)
    # Training settings, and model settings that change no tensor, load as they are.
    for changed in (["train.lr=0.01", "data.batch_size=4", "train.precision=fp32"],
                    ["model.decoder.dropout=0.1", "model.loss.dice_weight=2.0"], ["train.zero_stage=2"]):
        check_resume_fits(config(*changed), directory, meta, "train.run_name=run")


def test_another_zero_stage_is_refused_unless_deepspeed_loads_it(tmp_path):
    meta = read_meta(fake_checkpoint(tmp_path / "checkpoint_1", zero_stage=1))
    with pytest.raises(ConfigError, match=r"^train.zero_stage: 3, but checkpoint .*checkpoint_1 \(step 2, chosen by "
                                          r"train.resume_from\) holds ZeRO-1 state, which DeepSpeed cannot load at "
                                          r"another stage; set train.zero_stage=1 or 2 to resume it$"):
        check_resume_fits(config("train.zero_stage=3"), str(tmp_path / "checkpoint_1"), meta, "train.resume_from")
    meta.zero_stage = 0
    with pytest.raises(ConfigError, match=r"set train.zero_stage=0 to resume it$"):
        check_resume_fits(config("train.zero_stage=1"), str(tmp_path / "checkpoint_1"), meta, "train.resume_from")


def _optimizer_after_steps(train_cfg, steps):
    import torch

    from launcher.optim import build_optimizer, build_scheduler
    from model.build import build_model

    torch.manual_seed(0)
    model = build_model(config().model)
    optimizer = build_optimizer(model, train_cfg, "off")
    scheduler = build_scheduler(optimizer, train_cfg)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def test_a_resume_trains_with_this_configs_lr_and_weight_decay():
    """The checkpoint's optimizer and scheduler states carry the old run's lr and weight
    decay; a resume with other values uses the config's, at the loaded schedule step."""
    from launcher.optim import configured_hyperparameters, lr_factor, reapply_hyperparameters

    old = config("train.lr=0.001", "train.weight_decay=0.0001").train
    saved_optimizer, saved_scheduler = _optimizer_after_steps(old, 3)
    for overrides, expect_changes in ((["train.lr=0.001", "train.weight_decay=0.0001"], False),
                                      (["train.lr=0.002", "train.weight_decay=0.05"], True)):
        new = config(*overrides).train
        optimizer, scheduler = _optimizer_after_steps(new, 0)
        built = configured_hyperparameters(optimizer)
        optimizer.load_state_dict(saved_optimizer.state_dict())  # what DeepSpeed's load does
        scheduler.load_state_dict(saved_scheduler.state_dict())
        changed = reapply_hyperparameters(optimizer, scheduler, built)
        lrs = [g["lr"] for g in optimizer.param_groups]
        if not expect_changes:
            assert changed == []
            assert lrs == [g["lr"] for g in saved_optimizer.param_groups]  # bit for bit
            continue
        assert "head: lr 0.001 -> 0.002" in changed and "head: weight_decay 0.0001 -> 0.05" in changed, changed
        head = next(g for g in optimizer.param_groups if g["name"] == "head")
        assert head["weight_decay"] == 0.05
        assert head["lr"] == 0.002 * lr_factor(3, new) and scheduler.get_last_lr() == lrs
        scheduler.step()  # and the schedule goes on from the new base
        assert head["lr"] == 0.002 * lr_factor(4, new)


def test_a_damaged_checkpoint_is_named_and_never_silently_restarts_the_run(manifests, tmp_path, capsys):
    from launcher.preflight import check_resume

    run = tmp_path / "run"
    older = fake_checkpoint(run / "checkpoint_2026-01-01_00-00-01", step=2)
    newer = fake_checkpoint(run / "checkpoint_2026-01-01_00-00-02", step=4)
    weights = run / "checkpoint_2026-01-01_00-00-02" / "deepspeed" / "model.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"x" * 100)
    write_json_atomic(run / "checkpoint_2026-01-01_00-00-02" / "files_rank_0.json", {"deepspeed/model.pt": 100})
    cfg = config(*manifests, "train.run_name=run")
    assert check_resume(cfg, str(run)) == newer and capsys.readouterr().out == ""

    weights.write_bytes(b"x" * 10)  # cut short after it was sealed: the older one is used, saying why
    assert check_resume(cfg, str(run)) == older
    out = capsys.readouterr().out
    assert out == (f"warning: checkpoint {newer} is not used: incomplete checkpoint, deepspeed/model.pt is "
                   "missing or truncated\n"), out

    os.remove(os.path.join(older, "files_rank_0.json"))  # never sealed: a crash mid-save
    with pytest.raises(ConfigError, match=rf"^train.run_name=run: no complete checkpoint to resume from, and the run "
                                          rf"would start over from step 0: {newer}: incomplete checkpoint, "
                                          r"deepspeed/model.pt is missing or truncated. Restore the file"):
        check_resume(cfg, str(run))
    assert "rank 0's file list is missing" in capsys.readouterr().out

    weights.unlink()
    os.remove(os.path.join(newer, "files_rank_0.json"))  # only crash debris: start over, saying so
    assert check_resume(cfg, str(run)) is None
    assert capsys.readouterr().out.count("is not used") == 2
