"""launcher.driver: the environment a local Ray instance starts with (ray.init is
recorded here, not run: the end-to-end tests start real local instances), and the
failed workers' own errors behind Ray's wrapper."""

import os

import pytest
import ray

from launcher import driver
from launcher.config import load_config
from launcher.environment import LOCAL_INSTANCE_ENV

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "test_tiny.yaml")


def test_a_local_instance_polls_its_workers_more_often_and_a_cluster_keeps_its_own(monkeypatch):
    [(name, value)] = LOCAL_INSTANCE_ENV.items()
    # Set, then deleted through monkeypatch, so that what connect() sets is undone afterwards.
    monkeypatch.setenv(name, "unset at the end")
    monkeypatch.delenv(name)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(driver, "running_local_cluster", lambda: "")  # no `ray start` head here
    seen = []  # (ray.init's keyword arguments, the variable when it was called)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.append((kwargs, os.environ.get(name))))
    cfg = load_config(TINY)

    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    api = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: (seen.append((kwargs, os.environ.get(name))),
                                                       api.append(os.environ.get("RAY_API_SERVER_ADDRESS"))))
    assert driver.connect(cfg) is True
    # "local": a new instance, not whatever Ray's ray_current_cluster file names.
    assert seen[-1][1] == value and seen[-1][0]["address"] == "local"
    # Its processes learn where its dashboard (the State API) is, while this process
    # keeps no trace of it: with other Ray instances on the machine, Ray Train's
    # placement-group cleaner would otherwise fail to find it, with a traceback.
    assert api[-1] == f"http://127.0.0.1:{seen[-1][0]['dashboard_port']}"
    assert "RAY_API_SERVER_ADDRESS" not in os.environ

    monkeypatch.setenv(name, "3")  # the user's own setting wins
    assert driver.connect(cfg) is True
    assert seen[-1][1] == "3"

    monkeypatch.delenv(name)
    cfg.cluster.address = "127.0.0.1:6379"
    assert driver.connect(cfg) is False
    assert seen[-1] == ({"address": "127.0.0.1:6379", "log_to_driver": True}, None)

    # No address given, but `ray start` runs a head on this machine: join it
    # (tests/test_submit.py finds a real one).
    cfg.cluster.address = ""
    monkeypatch.setattr(driver, "running_local_cluster", lambda: "10.0.0.5:6379")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the head's token mode, as the user set it
    assert driver.connect(cfg) is False
    assert seen[-1] == ({"address": "10.0.0.5:6379", "log_to_driver": True}, None)
    # ... unless told "local" (Ray's word for a new instance), which its processes must not inherit.
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert driver.connect(cfg) is True
    assert seen[-1][0]["address"] == "local" and "RAY_ADDRESS" not in os.environ


def test_a_stopped_run_says_how_to_resume_it(monkeypatch, capsys, tmp_path):
    from data_pipeline.loader_io import ShardReadError
    from launcher import commands

    sets = [f"train.output_dir={tmp_path}", "train.run_name=r1", "data.train_manifest=/d/train-manifest.json",
            "data.val_manifest=/d/val-manifest.json"]
    resume = f"resume it with: python -m launcher train --config {tmp_path}/r1/config.yaml"

    def fail(cfg):
        raise driver.TrainingFailed("rank 1 failed", frozenset({ShardReadError.__name__}))

    monkeypatch.setattr(driver, "run_training", fail)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "config.yaml").write_text("{}\n")  # the driver saved it when the run started
    assert commands.train_command(TINY, sets, "") == 1
    out = capsys.readouterr().out
    assert "`python -m data_pipeline verify` of /d/train-manifest.json and /d/val-manifest.json" in out, out
    assert "set data.on_error=skip" in out and out.rstrip().endswith(resume), out
    # Already skipping (what failed was validation, or every sample): no skip advice; one
    # manifest used for both splits is named once.
    assert commands.train_command(TINY, [*sets[:2], "data.train_manifest=/d/m.json", "data.val_manifest=/d/m.json",
                                         "data.on_error=skip"], "") == 1  # fmt: skip
    out = capsys.readouterr().out
    assert "verify` of /d/m.json checks every shard; write the bad one again, then" in out, out

    def ray_sigint_handler(cfg):
        raise SystemExit(0)  # what Ray Train's SIGINT handler ends fit() with

    monkeypatch.setattr(driver, "run_training", ray_sigint_handler)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # the driver runs as a Ray job
    assert commands.train_command(TINY, sets, "") == 130
    out = capsys.readouterr().out
    assert f"interrupted; {resume} (on the head node; from elsewhere, submit the job again with --set " \
           "train.run_name=r1 and the same train.output_dir)" in out, out

    # Stopped before the driver saved the run's config: the same command, with the run name.
    (tmp_path / "r1" / "config.yaml").unlink()
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert commands.train_command(TINY, sets, "") == 130
    assert "interrupted; resume it with the same command and --set train.run_name=r1" in capsys.readouterr().out

    def ray_sigint_then_exit_1(cfg):  # a SIGINT that cut a wait short: Ray's SystemExit(1)
        import signal

        previous = signal.signal(signal.SIGINT, lambda signum, frame: None)  # Ray's handler, no chaining
        try:
            signal.raise_signal(signal.SIGINT)
        finally:
            signal.signal(signal.SIGINT, previous)
        raise SystemExit(1)

    monkeypatch.setattr(driver, "run_training", ray_sigint_then_exit_1)
    assert commands.train_command(TINY, sets, "") == 130
    assert "interrupted; resume it with the same command" in capsys.readouterr().out

    def other_exit(cfg):
        raise SystemExit(3)  # not Ray's Ctrl-C handler: not an interruption

    monkeypatch.setattr(driver, "run_training", other_exit)
    with pytest.raises(SystemExit):
        commands.train_command(TINY, sets, "")


def test_each_failed_workers_own_error_is_found_behind_rays_wrapper():
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from data_pipeline.loader_io import ShardReadError
    from data_pipeline.tar_reader import TarFormatError
    from launcher.driver import failure_types

    # Rank 1 read a corrupt shard (raised from the tar reader's error); rank 0 then failed
    # in a collective. Ray wraps each worker's error in a RayTaskError whose ``cause`` is
    # the original.
    try:
        try:
            raise TarFormatError("invalid header (bad checksum)")
        except TarFormatError as exn:
            raise ShardReadError("corrupt or unreadable shard /d/train-000003.tar: ...") from exn
    except ShardReadError as exn:
        shard_error = exn
    wrapped = RayTaskError("train_fn", "traceback text", shard_error).as_instanceof_cause()
    group = WorkerGroupError("2 workers failed", {1: wrapped, 0: RuntimeError("Connection closed by peer")})
    assert {"ShardReadError", "TarFormatError", "RuntimeError"} <= failure_types(group)
    assert "ShardReadError" not in failure_types(RuntimeError("Connection closed by peer"))
    assert {"ShardReadError", "TarFormatError"} <= failure_types(shard_error)


def test_a_run_that_fails_or_is_stopped_leaves_prometheus_discovery(monkeypatch, tmp_path, manifests):
    from cluster.metrics import live_targets_file

    class Trainer:  # Ray Train's, up to fit(): what each case ends it with
        ending: BaseException = RuntimeError("rank 0 failed")

        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            raise self.ending

    monkeypatch.setattr(driver, "connect", lambda cfg: False)
    monkeypatch.setattr(driver, "TorchTrainer", Trainer)
    cfg = load_config(TINY, [*manifests, f"train.output_dir={tmp_path}", "train.run_name=r1"])
    targets = live_targets_file(str(tmp_path / "r1"))
    for ending, raised in ((RuntimeError("rank 0 failed"), driver.TrainingFailed), (SystemExit(0), SystemExit)):
        os.makedirs(os.path.dirname(targets), exist_ok=True)
        with open(targets, "w") as f:  # what rank 0 wrote when its exporter started
            f.write('[{"targets": ["127.0.0.1:9400"]}]')
        Trainer.ending = ending
        with pytest.raises(raised):
            driver.run_training(cfg)
        assert not os.path.exists(targets), ending
