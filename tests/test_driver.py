"""launcher.driver: the environment a local Ray instance starts with (ray.init is
recorded here, not run: the end-to-end tests start real local instances), and the
failed workers' own errors behind Ray's wrapper."""

import os

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
    seen = []  # (ray.init's keyword arguments, the variable when it was called)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.append((kwargs, os.environ.get(name))))
    cfg = load_config(TINY)

    assert driver.connect(cfg) is True
    assert seen[-1][1] == value and "address" not in seen[-1][0]

    monkeypatch.setenv(name, "3")  # the user's own setting wins
    assert driver.connect(cfg) is True
    assert seen[-1][1] == "3"

    monkeypatch.delenv(name)
    cfg.cluster.address = "127.0.0.1:6379"
    assert driver.connect(cfg) is False
    assert seen[-1] == ({"address": "127.0.0.1:6379", "log_to_driver": True}, None)


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
