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
import re
import time
import warnings
from contextlib import nullcontext, suppress
from dataclasses import replace

import ops.torchvision_fix  # noqa: F401  (before anything imports timm)

# isort: split
import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from cluster.metrics import WorkerMetrics, live_targets_file, write_file_sd
from data_pipeline.device_batch import prepare_batch
from data_pipeline.loader import build_eval_loader, build_train_loader
from data_pipeline.train_stream import LoaderPosition, StreamTracker, batches_to_skip
from launcher.checkpoint import (
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    data_position_file,
    find_latest_checkpoint,
    newest_verified_checkpoint,
    save_checkpoint,
    staging_directory,
    verify_checkpoint,
)
from launcher.config import RunConfig, config_from_dict, to_dict
from launcher.deepspeed_config import autocast_dtype
from launcher.engine import create_engine
from launcher.evaluate import evaluate
from launcher.fault_injection import fault_point
from launcher.mfu import count_forward_flops, peak_flops, training_flops_per_sample
from launcher.optim import configured_hyperparameters, reapply_hyperparameters
from launcher.panoptic_eval import panoptic_validation, summary_line
from launcher.progress import StepLogger, StepRecords
from launcher.ray_console import drop_report_lines_from_console
from launcher.rng import derive_seed, restore_rng_state, seed_everything
from launcher.universal_checkpoint import load_universal_checkpoint, needs_universal
from model.build import build_criterion, build_model
from ops.host_allocator import configure_process, preload_failed
from ops.weight_recast import recast_applies, recast_saved_weights


def is_logged_term(name: str) -> bool:
    """Loss terms shown in the logs and metrics besides the total: the final layer's.
    Deep-supervision copies (``loss_ce_0``, Panoptic SegFormer's ``loss_giou_loc0``)
    count in the total only."""
    return not re.search(r"_(loc)?\d+$", name)


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
    checkpoint = ray.train.get_checkpoint()  # local or shared-file-system storage
    return newest_verified_checkpoint([checkpoint.path if checkpoint is not None else None,
                                       find_latest_checkpoint(run_dir), cfg.train.resume_from])


def _start_metrics(cfg: RunConfig, rank: int, local_rank: int, metrics_host: str) -> WorkerMetrics | None:
    if cfg.cluster.metrics_port_base < 0:
        return None
    metrics = WorkerMetrics(run=cfg.train.run_name, rank=rank)
    host = metrics_host or ray.util.get_node_ip_address()
    base = cfg.cluster.metrics_port_base
    metrics.start(host, base + local_rank if base > 0 else 0)
    return metrics


def _gradient_norm(model: torch.nn.Module) -> float:
    """Global L2 norm of the gradients held by ``model``'s parameters (used at ZeRO-0,
    where the gradients are whole and already all-reduced at the boundary: DeepSpeed
    computes the norm there but does not keep it)."""
    grads = [p.grad.detach().float() for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _mean_over_ranks(values: dict[str, torch.Tensor], world_size: int) -> dict[str, float]:
    """One all-reduce per step: the logged loss is the global mean, and a NaN on any
    rank reaches every rank, so they all stop together instead of hanging."""
    names = list(values)
    packed = torch.stack([values[n].detach().float().cpu() for n in names])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return dict(zip(names, (packed / world_size).tolist()))


def share_batchnorm_statistics(model: torch.nn.Module, world_size: int) -> None:
    """Averages trainable BatchNorm's running statistics over the ranks (collective: every
    rank calls it), in one all-reduce.

    Trainable BatchNorm (``freeze_bn: false``, UN-EPT's heads) tracks running statistics of
    each rank's own batches, and the checkpoint keeps rank 0's. Averaged before every
    validation and save, the model validated is the model saved, so ``eval`` of a
    checkpoint reproduces the mIoU the run printed. Training normalises with batch
    statistics and never reads them. Frozen BatchNorm (not a ``_BatchNorm``: its statistics
    are equal on every rank) is left alone, bit for bit. Summed in fp32 whatever the
    buffers' dtype, so fp16 statistics cannot overflow on the way.
    """
    if world_size == 1:
        return
    buffers = [buffer for module in model.modules()
               if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats
               for buffer in (module.running_mean, module.running_var) if buffer is not None]
    if not buffers:
        return
    packed = torch.cat([b.detach().reshape(-1).float() for b in buffers])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed /= world_size
    for buffer, mean in zip(buffers, packed.split([b.numel() for b in buffers])):
        buffer.copy_(mean.view_as(buffer))


def train_worker(loop_config: dict) -> None:
    cfg = config_from_dict(loop_config["config"], source="run config")
    run_dir = loop_config["run_dir"]
    context = ray.train.get_context()
    rank, world_size, local_rank = context.get_world_rank(), context.get_world_size(), context.get_local_rank()
    torch.set_num_threads(cfg.cluster.torch_threads or cfg.cluster.cpus_per_worker)
    if not cfg.cluster.use_gpu and cfg.cluster.keep_freed_memory:
        # Process-wide, from here on: before the model exists. jemalloc, if the driver asked
        # for it, was preloaded as the worker started (launcher/environment.py).
        malloc_note = configure_process(require_jemalloc=cfg.cluster.host_allocator == "jemalloc")
        if rank == 0:
            print(f"host memory: {malloc_note}", flush=True)
        elif preload_failed():  # host_allocator auto, on a node without the library: say where
            print(f"host memory, rank {rank} on {os.uname().nodename}: {malloc_note}", flush=True)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    drop_report_lines_from_console()
    # DeepSpeed 0.19 still calls the deprecated all_gather_into_tensor every step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    seed_everything(cfg.train.seed)  # same initial weights on every rank

    metrics = _start_metrics(cfg, rank, local_rank, loop_config.get("metrics_host", ""))
    endpoints = [None] * world_size
    dist.all_gather_object(endpoints, metrics.endpoint if metrics else None)
    if rank == 0 and metrics is not None:
        live = [e for e in endpoints if e]
        write_file_sd(os.path.join(run_dir, "prometheus_targets.json"), live)  # the run's record
        if "://" not in run_dir:
            write_file_sd(live_targets_file(run_dir), live)  # what cluster/prometheus/prometheus.yml globs
        print("metrics: " + ", ".join(e.url for e in endpoints if e), flush=True)

    model = build_model(cfg.model)
    if torch.cuda.is_available():
        # On the worker's GPU before the optimizer exists, so a fused (apex or torch)
        # AdamW is chosen for CUDA parameters; DeepSpeed would move it later anyway.
        model.to(ray.train.torch.get_device())
    # Rank 0 picks the checkpoint so every rank loads the same one; one written by another
    # number of workers loads from its universal form (converted by the driver).
    choice = [_choose_resume_directory(cfg, run_dir) if rank == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    resume_dir, start_step, resumes = choice[0], 0, 0
    meta = verify_checkpoint(resume_dir) if resume_dir else None
    universal = meta is not None and needs_universal(meta, world_size)

    criterion = build_criterion(cfg.model)
    engine = create_engine(cfg, model, load_universal=universal)
    criterion.to(engine.device)
    eval_dtype = autocast_dtype(cfg.train)

    layout = LoaderPosition(batches=0, world_size=world_size, num_workers=cfg.data.num_workers,
                            batch_size=cfg.data.batch_size, seed=cfg.data.seed, manifest=cfg.data.train_manifest)
    start_batches, start_positions = 0, ()
    if meta is not None:
        start_step, resumes = meta.step, meta.resumes + 1
        optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # under DeepSpeed's ZeRO wrapper
        built = configured_hyperparameters(optimizer)
        if universal:
            load_universal_checkpoint(engine, resume_dir)
        else:
            engine.load_checkpoint(os.path.join(resume_dir, DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
        changed = reapply_hyperparameters(optimizer, engine.lr_scheduler, built)
        if changed and rank == 0:
            print(f"this config's optimizer settings replace the checkpoint's: {'; '.join(changed)}", flush=True)
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
    if metrics is not None:
        metrics.observe_restart(resumes)
    peak, peak_source = peak_flops(engine.device, cfg.train.precision, cfg.cluster.peak_tflops_per_worker)
    flops_per_sample: float | None = None  # counted on the first forward pass

    # The stream restarts where the checkpointed run's trainer stood: the samples the
    # uninterrupted run would have seen next, none skipped or repeated.
    batches = iter(build_train_loader(cfg.data, rank, world_size, start_batches, start_positions))
    stream = StreamTracker(layout, start_batches, start_positions)
    samples_per_step = cfg.data.batch_size * cfg.train.grad_accum_steps
    logger = StepLogger(total_steps=cfg.train.max_steps, samples_per_step=samples_per_step * world_size,
                        enabled=rank == 0)
    records = StepRecords(os.path.join(run_dir, "train_log.jsonl") if rank == 0 and "://" not in run_dir else "")
    config_dict = to_dict(cfg)
    last_saved = start_step
    val_results: dict = {}
    val_step = -1

    bn_shared_at = -1  # the step whose BatchNorm statistics are already averaged

    def share_statistics(at_step: int) -> None:
        # Validation and a save at the same step need one averaging, not two.
        nonlocal bn_shared_at
        if bn_shared_at != at_step:
            share_batchnorm_statistics(engine.module, world_size)
            bn_shared_at = at_step

    def validate(at_step: int) -> dict:
        share_statistics(at_step)
        if cfg.data.task == "panoptic":  # PQ over each rank's slice, summed over ranks
            results = panoptic_validation(cfg, engine.module, rank, world_size, eval_dtype, engine.device)
            logger.print(f"step {at_step}: validation {summary_line(results)}")
            return results
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
        share_statistics(step)
        started = time.perf_counter()
        with staging_directory(run_dir, rank) as tmp:
            size = save_checkpoint(engine, tmp, step=step, rank=rank, world_size=world_size, config=config_dict,
                                   data_position=stream.position().to_json(), resumes=resumes,
                                   validation=(val_step, val_results["miou"]) if "miou" in val_results else None,
                                   before_seal=lambda: fault_point("mid_checkpoint", step, rank, run_dir))
            ray.train.report({"step": step, **extra_metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if metrics is not None:
            metrics.observe_checkpoint(time.perf_counter() - started, size)
        last_saved = step

    # Per-rank dropout and point-sampling streams: the checkpointed ones when there are,
    # so a resumed run draws what the uninterrupted run would have drawn. Set last, just
    # before the first step: a draw in between (the peak-FLOP/s probe's random matrices,
    # say) would shift a resumed run's stream against the uninterrupted run's.
    if not (meta is not None and meta.world_size == world_size and restore_rng_state(resume_dir, rank)):
        seed_everything(derive_seed(cfg.train.seed, rank, start_step))
    engine.train()
    step = start_step
    # bf16: keep the parameters, not their bf16 copies, for backward (ops/weight_recast.py);
    # not under ZeRO-3, whose partitioned parameters are freed between forward and backward.
    recast_weights = recast_applies(cfg.train.precision, engine.zero_optimization_stage())
    while step < cfg.train.max_steps:
        step_started = time.perf_counter()
        loader_wait = 0.0
        accumulated: dict[str, torch.Tensor] = {}
        grad_norm = None
        for micro_step in range(cfg.train.grad_accum_steps):
            wait_started = time.perf_counter()
            batch = next(batches)
            newly_skipped = stream.observe(batch)
            if newly_skipped and metrics is not None:
                metrics.observe_skipped(newly_skipped)
            loader_wait += time.perf_counter() - wait_started
            images, targets = prepare_batch(batch, engine.device)  # augmentation + targets, on the device
            with (count_forward_flops() if flops_per_sample is None else nullcontext()) as counted, \
                    recast_saved_weights(recast_weights):
                outputs = engine(images)  # DeepSpeed runs forward under its torch_autocast block
            if flops_per_sample is None:
                flops_per_sample = training_flops_per_sample(counted(), images.shape[0])
                logger.print(f"model: {flops_per_sample / 1e9:.2f} GFLOP per training sample; worker peak "
                             f"{peak / 1e12:.2f} TFLOP/s ({peak_source})")
            losses = criterion(outputs, targets)  # fp32 inside, whatever the autocast
            loss = sum(losses.values())
            # Backward needs only what autograd saved; the outputs themselves (every
            # decoder layer's full set of stride-4 mask logits) would stay alive through it.
            del outputs
            engine.backward(loss)
            if engine.zero_optimization_stage() == 0 and micro_step == cfg.train.grad_accum_steps - 1:
                grad_norm = _gradient_norm(engine.module)  # before engine.step clips it
            engine.step()
            for name, value in (("loss", loss), *((n, v) for n, v in losses.items() if is_logged_term(n))):
                accumulated[name] = accumulated.get(name, 0.0) + value.detach() / cfg.train.grad_accum_steps
        step += 1
        terms = _mean_over_ranks(accumulated, world_size)
        if not np.isfinite(terms["loss"]):
            if metrics is not None:  # exported and snapshotted before the run stops
                metrics.observe_nonfinite_loss(terms["loss"])
                _write_metrics_snapshot(metrics, run_dir, rank)
            raise FloatingPointError(f"loss is {terms['loss']} at step {step} (mean over ranks); stopping the run")
        step_seconds = time.perf_counter() - step_started
        lr = engine.get_lr()[0]
        if grad_norm is None:  # ZeRO-1/2/3: the optimizer computed it
            computed = engine.get_global_grad_norm()
            grad_norm = None if computed is None else float(computed)
        records.write(step, terms, lr, grad_norm)
        if metrics is not None:
            mfu = flops_per_sample * samples_per_step / step_seconds / peak
            metrics.observe_step(step, terms["loss"], {k: v for k, v in terms.items() if k != "loss"},
                                 samples_per_step, step_seconds, loader_wait, lr,
                                 grad_norm=grad_norm, mfu=mfu)
        throughput = logger.step(step, terms, lr, step_seconds, loader_wait,
                                 force=step % cfg.train.log_every == 0 or step == cfg.train.max_steps)
        if throughput is not None and metrics is not None:
            metrics.observe_throughput(throughput / world_size)

        fault_point("after_step", step, rank, run_dir)
        if step == cfg.train.max_steps:
            break  # the final validation and checkpoint follow the loop
        if cfg.train.eval_every and step % cfg.train.eval_every == 0:
            val_results, val_step = validate(step), step
            if 0 < cfg.train.target_miou <= val_results.get("miou", -1.0):
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
        _write_metrics_snapshot(metrics, run_dir, rank)
        metrics.stop()
    if rank == 0 and metrics is not None and "://" not in run_dir:
        # A finished run's exporters are gone: drop them from discovery at once (the
        # driver does it again however the run ended: launcher/driver.py).
        with suppress(FileNotFoundError):
            os.remove(live_targets_file(run_dir))


def _write_metrics_snapshot(metrics: WorkerMetrics, run_dir: str, rank: int) -> None:
    if "://" in run_dir:
        return
    os.makedirs(os.path.join(run_dir, "metrics"), exist_ok=True)
    metrics.write_textfile(os.path.join(run_dir, "metrics", f"rank_{rank}.prom"))


def _val_metrics(results: dict) -> dict:
    if not results:
        return {}
    if "All" in results:  # data.task=panoptic
        return {"val_pq": results["All"]["pq"], "val_sq": results["All"]["sq"], "val_rq": results["All"]["rq"]}
    return {"val_miou": results["miou"], "val_pixel_accuracy": results["pixel_accuracy"]}
