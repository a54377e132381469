"""What every Ray Train worker runs: one DeepSpeed engine training on its data slice.

Reads top to bottom: set up (threads, seeds, metrics, model, engine, resume), then the
step loop (batch -> forward under autocast -> fp32 losses -> backward -> step), with
logging, validation and checkpoints at their intervals. Rank 0 alone prints and writes
run-level files; every rank takes part in the collective parts (DeepSpeed's save, the
validation all-reduce, ``ray.train.report``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import tempfile
import time
import warnings

import ops.torchvision_fix  # noqa: F401  (before anything imports timm)

# isort: split
import numpy as np
import ray.train
import torch
import torch.distributed as dist

from cluster.metrics import WorkerMetrics, write_file_sd
from data_pipeline.loader import build_eval_loader, build_train_loader
from launcher.checkpoint import DEEPSPEED_DIR, DEEPSPEED_TAG, save_checkpoint, verify_checkpoint
from launcher.config import RunConfig, config_from_dict, to_dict
from launcher.deepspeed_config import build_deepspeed_config
from launcher.evaluate import evaluate
from launcher.optim import build_optimizer, build_scheduler
from launcher.progress import StepLogger
from model.build import build_criterion, build_model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resume_directory(cfg: RunConfig) -> str | None:
    """The checkpoint to start from: Ray's latest for this run, else ``train.resume_from``."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        return checkpoint.path  # local storage: the folder itself
    return cfg.train.resume_from or None


def _start_metrics(cfg: RunConfig, rank: int, local_rank: int, metrics_host: str) -> WorkerMetrics | None:
    if cfg.cluster.metrics_port_base < 0:
        return None
    metrics = WorkerMetrics(run=cfg.train.run_name, rank=rank)
    host = metrics_host or ray.util.get_node_ip_address()
    base = cfg.cluster.metrics_port_base
    metrics.start(host, base + local_rank if base > 0 else 0)
    return metrics


def _validate(engine, cfg: RunConfig, rank: int, world_size: int, autocast_dtype) -> dict:
    matrix = evaluate(engine.module, build_eval_loader(cfg.data, rank, world_size), cfg.model.num_classes,
                      cfg.data.ignore_index, autocast_dtype=autocast_dtype, device=engine.device)
    matrix.all_reduce()
    return matrix.results()


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
    criterion = build_criterion(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_deepspeed_config(cfg.train, cfg.data.batch_size))
    criterion.to(engine.device)
    autocast_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None

    start_step = 0
    resume_dir = _resume_directory(cfg)
    if resume_dir:
        meta = verify_checkpoint(resume_dir)
        engine.load_checkpoint(os.path.join(resume_dir, DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
        start_step = meta.step
        if rank == 0:
            print(f"resumed from {resume_dir} at step {start_step}", flush=True)
    seed_everything(cfg.train.seed + 1000 * rank + start_step)  # per-rank dropout/augmentation streams

    # Until exact loader resume lands, a resumed run starts a fresh stream seeded by its
    # start step, so it does not replay the exact samples it has already seen.
    data_cfg = dataclasses.replace(cfg.data, seed=cfg.data.seed + start_step)
    batches = iter(build_train_loader(data_cfg, rank, world_size))
    samples_per_step = cfg.data.batch_size * cfg.train.grad_accum_steps
    logger = StepLogger(total_steps=cfg.train.max_steps, start_step=start_step,
                        samples_per_step=samples_per_step * world_size, enabled=rank == 0)
    config_dict = to_dict(cfg)
    last_saved = start_step
    val_results: dict = {}
    val_step = -1

    def validate(at_step: int) -> dict:
        results = _validate(engine, cfg, rank, world_size, autocast_dtype)
        logger.print(f"step {at_step}: validation mIoU {results['miou']:.4f} "
                     f"(pixel accuracy {results['pixel_accuracy']:.4f})")
        return results

    def checkpoint_and_report(step: int, extra_metrics: dict) -> None:
        nonlocal last_saved
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="segscale-ckpt-") as tmp:
            save_checkpoint(engine, tmp, step=step, rank=rank, world_size=world_size, config=config_dict)
            ray.train.report({"step": step, **extra_metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if metrics is not None:
            metrics.observe_checkpoint(time.perf_counter() - started)
        last_saved = step

    engine.train()
    step = start_step
    while step < cfg.train.max_steps:
        step_started = time.perf_counter()
        loader_wait = 0.0
        terms_sum: dict[str, float] = {}
        for _ in range(cfg.train.grad_accum_steps):
            wait_started = time.perf_counter()
            batch = next(batches)
            loader_wait += time.perf_counter() - wait_started
            images = batch["images"].to(engine.device, non_blocking=True)
            targets = [{k: v.to(engine.device) for k, v in t.items()} for t in batch["targets"]]
            outputs = engine(images)  # DeepSpeed runs forward under its torch_autocast block
            losses = criterion(outputs, targets)  # fp32 inside, whatever the autocast
            loss = sum(losses.values())
            engine.backward(loss)
            engine.step()
            for name in ("loss_ce", "loss_focal", "loss_dice"):
                if name in losses:
                    terms_sum[name] = terms_sum.get(name, 0.0) + float(losses[name].detach())
            terms_sum["loss"] = terms_sum.get("loss", 0.0) + float(loss.detach())
        step += 1
        terms = {k: v / cfg.train.grad_accum_steps for k, v in terms_sum.items()}
        if not np.isfinite(terms["loss"]):
            raise FloatingPointError(f"rank {rank}: loss is {terms['loss']} at step {step}; stopping the run")
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
    if metrics is not None:
        os.makedirs(os.path.join(run_dir, "metrics"), exist_ok=True)
        metrics.write_textfile(os.path.join(run_dir, "metrics", f"rank_{rank}.prom"))
        metrics.stop()


def _val_metrics(results: dict) -> dict:
    if not results:
        return {}
    return {"val_miou": results["miou"], "val_pixel_accuracy": results["pixel_accuracy"]}
