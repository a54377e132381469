"""Per-rank memory of model and optimizer state for ZeRO stages 0-3, and checkpoint save
time and size, with the trainer's own parts on real gloo process groups.

For each stage a fresh group of ``--world-size`` processes (2 by default) builds the
config's model and DeepSpeed engine as ``launcher/train_loop.py`` does (``build_model``,
``launcher.engine.create_engine``: AdamW groups, schedule, DeepSpeed config), runs ``--steps`` training steps on
a synthetic batch with the real criterion and measures, on every rank, during the last
step's backward pass (AdamW's moments exist from the earlier steps), at two points: when
autograd has produced every gradient and DeepSpeed is about to reduce them (where
ZeRO-0/1 hold whole gradients), and after the backward pass (where ZeRO-1 keeps only its
partition); the larger counts:

- **state bytes**: the bytes of every tensor storage alive in the process (found through
  the garbage collector, each storage counted once: at stages 1-3 the parameters are
  views into DeepSpeed's flat buffers), less those alive before the model was built.
  That is weights, gradients, AdamW moments, any fp32 master copy and DeepSpeed's
  buffers. The target (issue 6) is checked on the largest rank's figure: stage 3 at
  most 0.55x stage 0;
- the resident-set growth over the same span, as a cross-check (it also holds allocator
  slack and the gloo buffers);
- **checkpoint save**: ``launcher.checkpoint.save_checkpoint`` (DeepSpeed's save, the
  per-rank RNG state and file list, rank 0's metadata) into a fresh folder, timed from
  a barrier to a barrier, and the bytes every rank wrote.

``launcher describe``'s estimate for the same stage is printed beside the measurement.

    python benchmarks/zero_stages.py [--config configs/maskformer_swin_l_ade20k.yaml]
        [--set key=value ...] [--stages 0 1 2 3] [--world-size 2] [--crop 64] [--steps 2]

Takes ~25 s on a 2-core CPU with `--config configs/demo.yaml --stages 0 1`. The default
(Swin-L, 212M parameters, four stages) takes minutes and needs well over 7 GiB of memory
(3.2 GiB of state per rank at stage 0, two ranks). The checkpoints go to a temporary
folder (``--work-dir``), removed at the end. Needs nothing beyond segscale's install.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import ops.torchvision_fix  # noqa: F401  (before anything imports timm)

# isort: split
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from measure import benchmark_parser, rss_bytes  # benchmarks/ is on sys.path when run as a script

from data_pipeline.synthetic import synthetic_batch
from launcher.checkpoint import save_checkpoint
from launcher.config import load_config, to_dict
from launcher.describe import count_parameters, state_bytes
from launcher.engine import create_engine
from launcher.environment import free_loopback_port, join_loopback_gloo_group
from model.build import build_criterion, build_model

TARGET_STAGE3_RATIO = 0.55  # stage 3's state bytes per rank over stage 0's, at most
_MIB = 2**20


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python objects."""
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor) or obj.device.type == "meta":  # no __class__ lookups
            continue
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or other storage-less layouts
            continue
        if storage.nbytes():
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


def rank_main(rank: int, args: argparse.Namespace, stage: int, port: int, out_dir: str) -> None:
    """One rank of one stage's group: build, train ``args.steps`` steps, measure, save."""
    join_loopback_gloo_group(rank, args.world_size, port, zero_stage=stage)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [*args.set, f"train.zero_stage={stage}", f"data.batch_size={args.batch}"])
    images, targets = synthetic_batch(cfg.model.num_classes, args.crop, args.batch, seed=rank)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank, as the trainer
    tensors_before, rss_before = live_tensor_bytes(), rss_bytes()

    model = build_model(cfg.model)
    counts = count_parameters(model)
    criterion = build_criterion(cfg.model)
    engine = create_engine(cfg, model)
    del model  # the engine holds what it uses
    engine.train()
    # ZeRO-0/1 hold every whole gradient between autograd's end and DeepSpeed's reduction
    # inside engine.backward; ZeRO-1 then keeps only its partition. Measure there too.
    reduce_gradients, before_reduction = engine.allreduce_gradients, []

    def measured_reduction(*args, **kwargs):
        if measuring:
            before_reduction.append(live_tensor_bytes())
        return reduce_gradients(*args, **kwargs)

    engine.allreduce_gradients = measured_reduction
    for step in range(args.steps):
        measuring = step == args.steps - 1
        outputs = engine(images)
        loss = sum(criterion(outputs, targets).values())
        engine.backward(loss)
        del outputs, loss  # the graph is gone: what is alive now is state, gradients included
        if measuring:
            state = max([live_tensor_bytes(), *before_reduction]) - tensors_before
            rss = rss_bytes() - rss_before
        engine.step()

    checkpoint_dir = os.path.join(out_dir, f"checkpoint_stage{stage}", f"rank{rank}")
    dist.barrier()
    started = time.perf_counter()
    written = save_checkpoint(
        engine, checkpoint_dir, step=args.steps, rank=rank, world_size=args.world_size, config=to_dict(cfg)
    )
    dist.barrier()
    save_seconds = time.perf_counter() - started
    result = {
        "state_bytes": state,
        "rss_bytes": rss,
        "checkpoint_seconds": save_seconds,
        "checkpoint_bytes": written,
        "params": counts["total"],
        "trainable": counts["trainable"],
        "precision": cfg.train.precision,
    }
    with open(os.path.join(out_dir, f"stage{stage}_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def run_stage(args: argparse.Namespace, stage: int, out_dir: str) -> list[dict]:
    mp.start_processes(
        rank_main,
        args=(args, stage, free_loopback_port(), out_dir),
        nprocs=args.world_size,
        start_method="spawn",
    )
    ranks = []
    for rank in range(args.world_size):
        with open(os.path.join(out_dir, f"stage{stage}_rank{rank}.json")) as f:
            ranks.append(json.load(f))
    return ranks


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument(
        "--config",
        default="configs/maskformer_swin_l_ade20k.yaml",
        help="the model ZeRO is for (212M parameters: 3.2 GiB of state per rank at stage 0)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument(
        "--crop", type=int, default=64, help="training input side (small: the state is measured)"
    )
    parser.add_argument("--batch", type=int, default=1, help="per rank")
    parser.add_argument("--steps", type=int, default=2, help="training steps, measured in the last (>= 2)")
    parser.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2), help="torch threads per rank"
    )
    parser.add_argument(
        "--work-dir", default="", help="where checkpoints are written (default: a temporary folder)"
    )
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2: AdamW's moments appear at the first step's end")

    print(
        f"{args.config} {' '.join(args.set)}: {args.world_size} gloo ranks x {args.threads} threads, "
        f"crop {args.crop}, batch {args.batch}, {args.steps} steps; torch {torch.__version__}",
        flush=True,
    )
    results: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory(dir=args.work_dir or None, prefix="zero-stages-") as out_dir:
        for stage in args.stages:
            started = time.perf_counter()
            results[stage] = run_stage(args, stage, out_dir)
            print(f"  stage {stage} measured in {time.perf_counter() - started:.0f} s", flush=True)

    first = results[args.stages[0]][0]
    print(
        f"model: {first['params'] / 1e6:.1f}M parameters ({first['trainable'] / 1e6:.1f}M trainable), "
        f"{first['precision']}"
    )
    print(
        "stage | state per rank (largest) | vs stage 0 | describe's estimate | RSS growth per rank | "
        "checkpoint save | checkpoint size (all ranks)"
    )
    met = None
    for stage, ranks in results.items():
        state = max(r["state_bytes"] for r in ranks)
        estimate = sum(
            state_bytes(
                first["params"], first["trainable"], stage, args.world_size, first["precision"]
            ).values()
        )
        ratio = state / max(r["state_bytes"] for r in results[0]) if 0 in results else float("nan")
        print(
            f"{stage} | {state / _MIB:.0f} MiB | {ratio:.3f} | {estimate / _MIB:.0f} MiB | "
            f"{max(r['rss_bytes'] for r in ranks) / _MIB:.0f} MiB | "
            f"{max(r['checkpoint_seconds'] for r in ranks):.2f} s | "
            f"{sum(r['checkpoint_bytes'] for r in ranks) / _MIB:.0f} MiB"
        )
        if stage == 3 and 0 in results:
            met = ratio <= TARGET_STAGE3_RATIO
    if met is None:
        print("target not checked: it needs stages 0 and 3")
        return 0
    print(f"stage 3 / stage 0 state per rank: target <= {TARGET_STAGE3_RATIO}: {'MET' if met else 'NOT MET'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
