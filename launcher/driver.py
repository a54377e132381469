"""The driver side of a training run: connect to Ray, start the TorchTrainer, wait.

Ray Train starts one worker per accelerator (or per CPU slot), each running
``launcher.train_loop.train_worker``. The driver connects to the cluster named by
``cluster.address`` / ``RAY_ADDRESS``, or starts a local Ray instance when there is none.
Re-running with the same ``train.run_name`` and ``train.output_dir`` resumes the run:
Ray Train V2 restores its checkpoint manager from the run folder and hands the latest
checkpoint to the workers.
"""

from __future__ import annotations

import os
import time
from contextlib import suppress
from dataclasses import dataclass

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from cluster.metrics import live_targets_file
from launcher.checkpoint import CheckpointMeta, prune_untracked_checkpoints, read_meta
from launcher.config import ConfigError, RunConfig, TrainConfig, dump_config, to_dict
from launcher.environment import LOCAL_INSTANCE_ENV, environment, free_loopback_port, worker_env_vars
from launcher.preflight import check_paths_for_job, check_resume, check_resume_fits, check_run
from launcher.progress import plural
from launcher.universal_checkpoint import ensure_universal, needs_universal


class TrainingFailed(RuntimeError):
    """A run that started and failed; ``causes``: the type names of the failed workers' own
    errors (a worker's error can make the others fail in their collectives)."""

    def __init__(self, message: str, causes: frozenset[str] = frozenset()) -> None:
        super().__init__(message)
        self.causes = causes


@dataclass
class TrainOutcome:
    run_dir: str
    checkpoint: str | None
    metrics: dict
    seconds: float
    trained: bool = True  # False: the run was already complete


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Resolve relative paths against the driver's working directory: workers run elsewhere."""

    def resolve(path: str) -> str:
        return path if not path or "://" in path or path.startswith("pipe:") else os.path.abspath(path)

    cfg.train.output_dir = resolve(cfg.train.output_dir)
    cfg.train.resume_from = resolve(cfg.train.resume_from)
    cfg.data.train_manifest = resolve(cfg.data.train_manifest)
    cfg.data.val_manifest = resolve(cfg.data.val_manifest)
    cfg.model.backbone.pretrained_path = resolve(cfg.model.backbone.pretrained_path)
    return cfg


def running_local_cluster(temp_dir: str | None = None) -> str:
    """The address of the head that this user's last `ray start` on this machine launched
    (Ray's ``ray_current_cluster`` file in its temp dir, default /tmp/ray, written by this
    user: on a shared machine another user's head is not ours to join), if its GCS server
    still runs (the file outlives a crashed head); else ""."""
    try:  # Ray's own lookup, private API: a Ray that moved it just means no joining
        from ray._common.utils import get_ray_address_file
        from ray._private.services import find_bootstrap_address, find_gcs_addresses
    except ImportError:
        return ""
    try:
        if os.stat(get_ray_address_file(temp_dir)).st_uid != os.getuid():
            return ""
    except OSError:
        return ""
    address = find_bootstrap_address(temp_dir)
    return address if address and address in find_gcs_addresses() else ""


def _enable_token_auth_if_available() -> None:
    """What `ray start` does with RAY_AUTH_MODE unset: token auth on if this machine has a
    token; Ray's client does the same only for a head it starts itself."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def connect(cfg: RunConfig) -> bool:
    """Join the configured Ray cluster or start a local instance; True when local."""
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        return False
    if address == "local":  # Ray's own word for "a new local instance"
        address = ""
        os.environ.pop("RAY_ADDRESS", None)  # not for the instance's processes to inherit
    elif not address and (running := running_local_cluster()):
        # What plain ray.init() does too: a head the user started here is meant to be used,
        # and a second instance beside it would count the same cores twice.
        print(f"joining the Ray cluster that `ray start` runs on this machine ({running}); pass --address to "
              "choose another, --address local for a private instance", flush=True)
        _enable_token_auth_if_available()
        try:
            ray.init(address=running, log_to_driver=True)
        except ConnectionError as err:
            raise ConnectionError(f"cannot join the Ray cluster `ray start` runs on this machine at {running} "
                                  f"({err}); pass --address local for a private instance") from None
        return False
    if address:
        print(f"joining the Ray cluster at {address}", flush=True)
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as err:
            hint = "" if os.environ.get("RAY_AUTH_MODE") else (
                "; if the cluster uses token authentication, set RAY_AUTH_MODE=token here too")
            raise ConnectionError(f"cluster.address: cannot connect to Ray at {address} ({err}){hint}") from None
        return False
    cpus = max(os.cpu_count() or 1, cfg.cluster.num_workers * cfg.cluster.cpus_per_worker)
    print(f"starting a local Ray instance ({cpus} CPUs); set RAY_ADDRESS (or cluster.address) to use a cluster",
          flush=True)
    for name, value in LOCAL_INSTANCE_ENV.items():  # inherited by the instance's processes
        os.environ.setdefault(name, value)
    # The dashboard also serves the State API that Ray Train's placement-group cleaner polls;
    # without it that actor logs a warning every few seconds. That actor finds the API by
    # itself, which fails with a traceback where other Ray instances run on this machine,
    # unless RAY_API_SERVER_ADDRESS names ours: set while ray.init spawns the instance's
    # processes, which pass it on to every worker. address="local": not the address a
    # stale ray_current_cluster file may still name.
    port = free_loopback_port()
    with environment(RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{port}"):
        ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, log_to_driver=True, _node_ip_address="127.0.0.1")
    return True


def train_worker(loop_config: dict) -> None:
    """Every Ray Train worker's entry point: ``launcher.train_loop.train_worker``, imported
    here, in the worker. The driver never runs the loop, so it does not import DeepSpeed
    (its pre-flight check builds the model on the meta device, which imports timm)."""
    from launcher.train_loop import train_worker as run_worker

    run_worker(loop_config)


def completed(train: TrainConfig, meta: CheckpointMeta) -> str | None:
    """Why a run whose own latest checkpoint is ``meta`` has nothing left to train (the
    rest of a sentence about the checkpoint), or None: it reached ``max_steps``, or its
    validation reached ``target_miou`` (where the loop stops early)."""
    if meta.step >= train.max_steps:
        return (f"is at step {meta.step} and train.max_steps is {train.max_steps}; nothing to train "
                "(raise train.max_steps to go on)")
    if meta.val_miou is not None and 0 < train.target_miou <= meta.val_miou:
        return (f"reached validation mIoU {meta.val_miou:.4f} at step {meta.val_step}, train.target_miou is "
                f"{train.target_miou}; nothing to train (raise train.target_miou, or set it to 0, to go on)")
    return None


def run_training(cfg: RunConfig) -> TrainOutcome:
    """Validate, connect, train; ConfigError for bad input, TrainingFailed for a failed run."""
    if not cfg.train.run_name:
        raise ConfigError("train.run_name: not set")
    check_paths_for_job(cfg)
    cfg = absolute_paths(cfg)
    check_run(cfg)
    run_dir = os.path.join(cfg.train.output_dir, cfg.train.run_name)
    resume_from = check_resume(cfg, run_dir)
    if resume_from:
        meta = read_meta(resume_from)  # check_resume verified it
        from_elsewhere = resume_from == cfg.train.resume_from
        if meta.step >= cfg.train.max_steps and from_elsewhere:
            raise ConfigError(f"train.resume_from: {resume_from} is at step {meta.step}, not before "
                              f"train.max_steps={cfg.train.max_steps}: nothing to train; raise train.max_steps")
        done = None if from_elsewhere else completed(cfg.train, meta)
        if done:  # e.g. a retried job that had finished: no Ray needed
            print(f"run {cfg.train.run_name} is complete: checkpoint {resume_from} {done}", flush=True)
            return TrainOutcome(run_dir=run_dir, checkpoint=resume_from, metrics={}, seconds=0.0, trained=False)
        check_resume_fits(cfg, resume_from, meta, "train.resume_from" if from_elsewhere else
                          f"train.run_name={cfg.train.run_name}")
        source = "train.resume_from" if from_elsewhere else "its latest complete one"
        print(f"run {cfg.train.run_name} resumes from checkpoint {resume_from} ({source})", flush=True)
        if needs_universal(meta, cfg.cluster.num_workers):
            ensure_universal(resume_from, meta, cfg.cluster.num_workers)
    local = connect(cfg)
    if "://" not in run_dir:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(dump_config(cfg))
    backend = cfg.cluster.backend or ("nccl" if cfg.cluster.use_gpu else "gloo")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": to_dict(cfg),
            "run_dir": run_dir,
            # Exporters of a run we started ourselves stay on loopback.
            "metrics_host": cfg.cluster.metrics_host or ("127.0.0.1" if local else ""),
        },
        torch_config=TorchConfig(backend=backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.cluster.num_workers,
            use_gpu=cfg.cluster.use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name,
            storage_path=cfg.train.output_dir,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            # Through the workers' own runtime env, not ray.init's: inside `ray job submit`
            # the job's runtime env is fixed and a second one for the driver would clash.
            worker_runtime_env={"env_vars": worker_env_vars(cfg)},
        ),
    )
    workers = plural(cfg.cluster.num_workers, "worker")
    print(f"run {cfg.train.run_name}: {workers}, ZeRO-{cfg.train.zero_stage}, "
          f"{cfg.train.precision}, {cfg.train.max_steps} steps -> {run_dir}", flush=True)
    started = time.time()
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker errors; keep the root cause on one line
        root = _root_cause(err)
        raise TrainingFailed(f"run {cfg.train.run_name} failed: {type(root).__name__}: {_last_line(root)}",
                             causes=failure_types(root)) from err
    finally:
        if local:
            ray.shutdown()
        _forget_targets(run_dir)
        _prune_checkpoints(cfg, run_dir)
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return TrainOutcome(run_dir=run_dir, checkpoint=checkpoint, metrics=dict(result.metrics or {}),
                        seconds=time.time() - started)


def _forget_targets(run_dir: str) -> None:
    """However the run ended (finished, failed, stopped), its exporters are gone: take
    them out of Prometheus' file discovery, where a failed or stopped run's targets would
    otherwise stay listed as down until a run of the same name replaced them. Only a
    driver that dies itself leaves them (they show as down: the run crashed)."""
    if "://" not in run_dir:
        with suppress(FileNotFoundError):
            os.remove(live_targets_file(run_dir))


def _prune_checkpoints(cfg: RunConfig, run_dir: str) -> None:
    """``prune_untracked_checkpoints``, saying what it removed; a failure to remove is a
    warning (it must not hide why a run failed)."""
    if "://" in run_dir:
        return
    try:
        pruned = prune_untracked_checkpoints(run_dir)
    except OSError as err:
        print(f"warning: could not remove an old checkpoint of run {cfg.train.run_name}: {err}", flush=True)
        return
    for folder, step in pruned:
        print(f"removed checkpoint {folder} (step {step}): saved just before a failure, it missed Ray Train's "
              f"record of the {cfg.train.keep_checkpoints} it keeps (train.keep_checkpoints), and a newer "
              "recorded one supersedes it", flush=True)


def _error_chain(err: BaseException) -> list[BaseException]:
    """``err`` and the errors it wraps (``raise ... from``, Ray's ``cause``), outermost first."""
    chain = [err]
    while (nxt := chain[-1].__cause__ or getattr(chain[-1], "cause", None)) is not None and nxt not in chain:
        chain.append(nxt)
    return chain


def _root_cause(err: BaseException) -> BaseException:
    """The innermost error Ray wrapped (worker group error -> the worker's own)."""
    return _error_chain(err)[-1]


def failure_types(root: BaseException) -> frozenset[str]:
    """The type names along each failed worker's error chain (Ray's worker group error holds
    one per rank), or along ``root``'s: a ShardReadError stays visible whether or not the
    error it was raised from crossed the process boundary with it."""
    failures = getattr(root, "worker_failures", None)
    errors = list(failures.values()) if isinstance(failures, dict) and failures else [root]
    return frozenset(type(e).__name__ for error in errors for e in _error_chain(error))


def _last_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else ""
