"""What every Ray Train worker runs: one DeepSpeed engine training on its data slice.

Reads top to bottom: set up (threads, seeds, metrics, model, engine, resume), then the
step loop (batch -> forward under autocast -> fp32 losses -> backward -> step), with
logging, validation and checkpoints at their intervals. Rank 0 alone prints and writes
run-level files; every rank takes part in the collective parts (the per-step loss
all-reduce, DeepSpeed's save, validation, ``ray.train.report``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
import warnings
from dataclasses import replace

import ops.torchvision_fix  # noqa: F401  (before anything imports timm)

# isort: split
import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from cluster.metrics import WorkerMetrics, write_file_sd
from data_pipeline.loader import build_eval_loader, build_train_loader
from data_pipeline.train_stream import LoaderPosition, StreamTracker, batches_to_skip
from launcher.checkpoint import (
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    CheckpointError,
    data_position_file,
    find_latest_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from launcher.config import RunConfig, config_from_dict, to_dict
from launcher.deepspeed_config import autocast_dtype, build_deepspeed_config
from launcher.evaluate import evaluate
from launcher.optim import build_optimizer, build_scheduler
from launcher.progress import StepLogger
from model.build import build_criterion, build_model

# Loss terms shown in the logs and metrics besides the total (the deep-supervision
# copies ``loss_ce_0`` ... are in the total only).
LOGGED_TERMS = ("loss_ce", "loss_focal", "loss_dice")


def derive_seed(*parts: int) -> int:
    """A seed for one purpose (rank, start step, ...) that never collides with another's,
    unlike ``seed + rank + step`` arithmetic."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _saved_position(resume_dir: str, meta, rank: int) -> LoaderPosition | None:
    """This rank's stream position in the checkpoint (its own file; rank 0's copy in the
    metadata of checkpoints that predate per-rank files), or None if there is none."""
    path = os.path.join(resume_dir, data_position_file(rank))
    if os.path.exists(path):
        with open(path) as f:
            return LoaderPosition.from_json(json.load(f))
    return LoaderPosition.from_json(meta.data_position) if meta.data_position else None


def _choose_resume_directory(cfg: RunConfig, run_dir: str) -> str | None:
    """Newest verified checkpoint among Ray's latest, the run folder's and ``resume_from``.

    Ray registers a checkpoint only when its controller polls, so one reported just
    before a crash is complete on disk but not Ray's latest: the run folder has it.
    """
    candidates = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        candidates.append(checkpoint.path)  # local or shared-file-system storage
    candidates.append(find_latest_checkpoint(run_dir))
    candidates.append(cfg.train.resume_from or None)
    best: tuple[int, str] | None = None
    for directory in filter(None, candidates):
        try:
            step = verify_checkpoint(directory).step
        except CheckpointError as err:
            print(f"warning: skipping checkpoint: {err}", flush=True)
            continue
        if best is None or step > best[0]:
            best = (step, directory)
    return best[1] if best else None


def _start_metrics(cfg: RunConfig, rank: int, local_rank: int, metrics_host: str) -> WorkerMetrics | None:
    if cfg.cluster.metrics_port_base < 0:
        return None
    metrics = WorkerMetrics(run=cfg.train.run_name, rank=rank)
    host = metrics_host or ray.util.get_node_ip_address()
    base = cfg.cluster.metrics_port_base
    metrics.start(host, base + local_rank if base > 0 else 0)
    return metrics


def _mean_over_ranks(values: dict[str, torch.Tensor], world_size: int) -> dict[str, float]:
    """One all-reduce per step: the logged loss is the global mean, and a NaN on any
    rank reaches every rank, so they all stop together instead of hanging."""
    names = list(values)
    packed = torch.stack([values[n].detach().float().cpu() for n in names])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return dict(zip(names, (packed / world_size).tolist()))


def train_worker(loop_config: dict) -> None:
    cfg = config_from_dict(loop_config["config"], source="run config")
    run_dir = loop_config["run_dir"]
    context = ray.train.get_context()
    rank, world_size, local_rank = context.get_world_rank(), context.get_world_size(), context.get_local_rank()
    torch.set_num_threads(cfg.cluster.torch_threads or cfg.cluster.cpus_per_worker)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19 still calls the deprecated all_gather_into_tensor every step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    seed_everything(cfg.train.seed)  # same initial weights on every rank

    metrics = _start_metrics(cfg, rank, local_rank, loop_config.get("metrics_host", ""))
    endpoints = [None] * world_size
    dist.all_gather_object(endpoints, metrics.endpoint if metrics else None)
    if rank == 0 and metrics is not None:
        write_file_sd(os.path.join(run_dir, "prometheus_targets.json"), [e for e in endpoints if e])
        print("metrics: " + ", ".join(e.url for e in endpoints if e), flush=True)

    import deepspeed  # imported here: it initialises an accelerator at import time

    model = build_model(cfg.model)
    if torch.cuda.is_available():
        # On the worker's GPU before the optimizer exists, so a fused (apex or torch)
        # AdamW is chosen for CUDA parameters; DeepSpeed would move it later anyway.
        model.to(ray.train.torch.get_device())
    criterion = build_criterion(cfg.model)
    optimizer = build_optimizer(model, cfg.train, cfg.model.ops.apex)
    scheduler = build_scheduler(optimizer, cfg.train)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_deepspeed_config(cfg.train, cfg.data.batch_size))
    criterion.to(engine.device)
    eval_dtype = autocast_dtype(cfg.train)

    # Rank 0 picks the checkpoint so every rank loads the same one.
    choice = [_choose_resume_directory(cfg, run_dir) if rank == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    resume_dir, start_step = choice[0], 0

    layout = LoaderPosition(batches=0, world_size=world_size, num_workers=cfg.data.num_workers,
                            batch_size=cfg.data.batch_size, seed=cfg.data.seed, manifest=cfg.data.train_manifest)
    start_batches, start_positions = 0, ()
    if resume_dir:
        meta = verify_checkpoint(resume_dir)
        start_step = meta.step
        engine.load_checkpoint(os.path.join(resume_dir, DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
        saved = _saved_position(resume_dir, meta, rank)
        current = replace(layout, batches=start_step * cfg.train.grad_accum_steps)
        if saved is None:  # written before exact loader resume: count steps
            start_batches, exact = current.batches, False
        else:
            start_batches, start_positions, exact = batches_to_skip(saved, current)
            if exact:
                layout = replace(layout, skipped=saved.skipped)
        if rank == 0:
            how = "exactly" if exact else "approximately (the data layout changed; see README, resuming)"
            print(f"resumed from {resume_dir} at step {start_step}; data stream continues {how} "
                  f"after {start_batches} batches per rank", flush=True)
    seed_everything(derive_seed(cfg.train.seed, rank, start_step))  # per-rank dropout streams

    # The stream restarts where the checkpointed run's trainer stood: the samples the
    # uninterrupted run would have seen next, none skipped or repeated.
    batches = iter(build_train_loader(cfg.data, rank, world_size, start_batches, start_positions))
    stream = StreamTracker(layout, start_batches, start_positions)
    samples_per_step = cfg.data.batch_size * cfg.train.grad_accum_steps
    logger = StepLogger(total_steps=cfg.train.max_steps, samples_per_step=samples_per_step * world_size,
                        enabled=rank == 0)
    config_dict = to_dict(cfg)
    last_saved = start_step
    val_results: dict = {}
    val_step = -1

    def validate(at_step: int) -> dict:
        matrix = evaluate(engine.module, build_eval_loader(cfg.data, rank, world_size), cfg.model.num_classes,
                          cfg.data.ignore_index, autocast_dtype=eval_dtype, device=engine.device,
                          lockstep=cfg.train.zero_stage == 3, inference=cfg.model.inference,
                          rule=cfg.model.name)
        matrix.all_reduce()
        results = matrix.results()
        logger.print(f"step {at_step}: validation mIoU {results['miou']:.4f} "
                     f"(pixel accuracy {results['pixel_accuracy']:.4f})")
        return results

    def checkpoint_and_report(step: int, extra_metrics: dict) -> None:
        nonlocal last_saved
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="segscale-ckpt-") as tmp:
            save_checkpoint(engine, tmp, step=step, rank=rank, world_size=world_size, config=config_dict,
                            data_position=stream.position().to_json())
            ray.train.report({"step": step, **extra_metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if metrics is not None:
            metrics.observe_checkpoint(time.perf_counter() - started)
        last_saved = step

    engine.train()
    step = start_step
    while step < cfg.train.max_steps:
        step_started = time.perf_counter()
        loader_wait = 0.0
        accumulated: dict[str, torch.Tensor] = {}
        for _ in range(cfg.train.grad_accum_steps):
            wait_started = time.perf_counter()
            batch = next(batches)
            newly_skipped = stream.observe(batch)
            if newly_skipped and metrics is not None:
                metrics.observe_skipped(newly_skipped)
            loader_wait += time.perf_counter() - wait_started
            images = batch["images"].to(engine.device, non_blocking=True)
            targets = [{k: v.to(engine.device) for k, v in t.items()} for t in batch["targets"]]
            outputs = engine(images)  # DeepSpeed runs forward under its torch_autocast block
            losses = criterion(outputs, targets)  # fp32 inside, whatever the autocast
            loss = sum(losses.values())
            engine.backward(loss)
            engine.step()
            for name, value in (("loss", loss), *((n, losses[n]) for n in LOGGED_TERMS if n in losses)):
                accumulated[name] = accumulated.get(name, 0.0) + value.detach() / cfg.train.grad_accum_steps
        step += 1
        terms = _mean_over_ranks(accumulated, world_size)
        if not np.isfinite(terms["loss"]):
            raise FloatingPointError(f"loss is {terms['loss']} at step {step} (mean over ranks); stopping the run")
        step_seconds = time.perf_counter() - step_started
        lr = engine.get_lr()[0]
        if metrics is not None:
            metrics.observe_step(step, terms["loss"], {k: v for k, v in terms.items() if k != "loss"},
                                 samples_per_step, step_seconds, loader_wait, lr)
        throughput = logger.step(step, terms, lr, step_seconds, loader_wait,
                                 force=step % cfg.train.log_every == 0 or step == cfg.train.max_steps)
        if throughput is not None and metrics is not None:
            metrics.observe_throughput(throughput / world_size)

        if step == cfg.train.max_steps:
            break  # the final validation and checkpoint follow the loop
        if cfg.train.eval_every and step % cfg.train.eval_every == 0:
            val_results, val_step = validate(step), step
            if 0 < cfg.train.target_miou <= val_results["miou"]:
                logger.print(f"validation mIoU reached the target {cfg.train.target_miou}; stopping at step {step}")
                break
        if step % cfg.train.checkpoint_every == 0:
            checkpoint_and_report(step, {"loss": terms["loss"], **_val_metrics(val_results)})

    if val_step != step:
        val_results, val_step = validate(step), step
    if last_saved != step:
        checkpoint_and_report(step, _val_metrics(val_results))
    if stream.skipped:
        print(f"rank {rank}: {stream.skipped} bad training samples were skipped (data.on_error=skip; "
              "each is logged above with its shard and reason)", flush=True)
    if metrics is not None:
        os.makedirs(os.path.join(run_dir, "metrics"), exist_ok=True)
        metrics.write_textfile(os.path.join(run_dir, "metrics", f"rank_{rank}.prom"))
        metrics.stop()


def _val_metrics(results: dict) -> dict:
    if not results:
        return {}
    return {"val_miou": results["miou"], "val_pixel_accuracy": results["pixel_accuracy"]}
