"""Activation checkpointing on a Swin-L-depth MaskFormer: peak memory and step time.

Configuration (printed with the results): Swin-L's depths (2, 2, 18, 2), heads
(6, 12, 24, 48) and window 12 (timm's ``swin_large_patch4_window12_384``), with the
embedding width shrunk from 192 to ``--embed-dim`` (default 48) so that a step takes
seconds on a 2-core CPU (~7 s), and ``--size`` square inputs (default 640, the crop Swin-L
trains at on ADE20K). At ``--size 256`` the weights, gradients and AdamW states (392 MiB)
are more than half the peak without checkpointing, so no checkpointing can halve it.
Keeping the heads keeps Swin-L's per-window attention maps per pixel (the bulk of what
autograd would save; segscale's window attention recomputes them instead, so its saved
activations are token-wise tensors, which shrink with the width). MaskFormer's heads at their paper
sizes: FPN pixel decoder 256, 100 queries, hidden 256, 6 DETR decoder layers with deep
supervision, 150 classes, CE (no-object 0.1) + 20 focal + 1 dice on full-resolution
masks; drop-path 0.3 (the Swin presets'); AdamW; fp32 (``--precision bf16``: CPU bf16
autocast); synthetic images, batch ``--batch`` (2, the papers' per-GPU batch). A step =
zero_grad, forward, loss, backward, optimizer step. Checkpointing on (``--checkpoint all``,
the default) = every part that can: the backbone block by block (timm's), the FPN pixel
decoder level by level and the DETR decoder layer by layer (``model.pixel_decoder`` /
``model.decoder.grad_checkpointing``); ``--checkpoint backbone``: the backbone alone.

Memory: each setting (checkpointing off / on) runs alone in a fresh child process, three
steps; the peak resident set (VmHWM) above the baseline after imports and data creation,
so it includes the weights, gradients and AdamW states. Measured twice: with the allocator
segscale's CPU workers start with (``ops.host_allocator``: jemalloc where it is
installed, else glibc, either keeping freed memory for the next step; this script
restarts itself under it, as a worker starts, and its children use it), and with glibc
and a fixed mmap threshold under which freed tensors go back to the OS at once, so RSS
follows the live tensors (what a GPU allocator's peak reports); with the former, the
allocator holds freed activation memory resident. Each child also reports the RSS at
its last step's start and the peak of each phase. Time: one model in this process, the
setting switched before every step (off, on, off, ...), so machine noise hits both alike;
the median of the measured steps after warm-up. Ratios are against checkpointing off in
the same run. Targets (issue 3): peak memory <= 0.5x, step time <= 1.35x.

The ``describe`` breakdown (fake tensors, no computation) of the same configuration comes
first: what checkpointing can remove (the saved activations of the parts it covers) and
what it cannot (weights, gradients and optimizer states, the loss's activations).

    python benchmarks/activation_checkpointing.py [--steps 5] [--warmup 1] [--size 640] [--embed-dim 48]
        [--checkpoint all|backbone]

Takes several minutes at the defaults on a 2-core CPU (7-10 s a step, 12 timed steps and
four memory children of 3 steps) and ~2.5 GiB of memory; `--size 128 --embed-dim 12`
takes ~1 min (its ratios then miss the targets, which are for the defaults: exit
status 1). Needs nothing beyond segscale's install.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import ops.torchvision_fix  # noqa: F401

# isort: split
import torch
from measure import (  # benchmarks/ is on sys.path
    CPU_WORKER_ALLOCATOR_ENV,
    LIVE_ALLOCATOR_ENV,
    benchmark_parser,
    child_env,
    peak_rss_bytes,
    rss_bytes,
    run_as_cpu_worker,
)

from data_pipeline.synthetic import synthetic_batch
from launcher.describe import measure_activations
from launcher.loss_memory import MASKS_PER_IMAGE, measure_loss_activations
from model.backbone import build_backbone
from model.build import build_criterion, build_model
from model.config import ModelConfig
from ops.host_allocator import configure_process
from ops.weight_recast import recast_applies, recast_saved_weights

SWIN_L = "swin_large_patch4_window12_384"
NUM_CLASSES = 150
TARGETS = {"memory": 0.5, "time": 1.35}  # ratios to checkpointing off, at most
_MIB = 2**20


def model_config(embed_dim: int, size: int) -> ModelConfig:
    cfg = ModelConfig(num_classes=NUM_CLASSES)  # MaskFormer's defaults: FPN 256, 100 queries, 6 layers
    cfg.backbone.name = SWIN_L  # depths (2, 2, 18, 2), heads (6, 12, 24, 48), window 12
    cfg.backbone.out_indices = [0, 1, 2, 3]
    cfg.backbone.timm_kwargs = {"embed_dim": embed_dim, "img_size": size, "drop_path_rate": 0.3}
    return cfg


# What "checkpointing on" checkpoints (--checkpoint): every part of MaskFormer that can
# (the backbone block by block, the FPN level by level, the decoder layer by layer), or the
# backbone alone, as ``model.backbone.grad_checkpointing`` alone does.
CHECKPOINTED_PARTS = {"all": ("backbone", "pixel_decoder", "decoder"), "backbone": ("backbone",)}


def set_checkpointing(model: torch.nn.Module, parts: tuple[str, ...] | bool) -> None:
    """Switches activation checkpointing of MaskFormer's ``parts`` on and of the others off."""
    parts = parts or ()
    model.backbone.set_grad_checkpointing("backbone" in parts)
    model.pixel_decoder.grad_checkpointing = "pixel_decoder" in parts
    model.predictor.decoder.grad_checkpointing = "decoder" in parts


def configure_checkpointing(cfg: ModelConfig, parts: tuple[str, ...] | bool) -> None:
    """The same switches in the config (what ``describe`` reads)."""
    parts = parts or ()
    cfg.backbone.grad_checkpointing = "backbone" in parts
    cfg.pixel_decoder.grad_checkpointing = "pixel_decoder" in parts
    cfg.decoder.grad_checkpointing = "decoder" in parts


def describe_config(args: argparse.Namespace) -> str:
    return (f"MaskFormer on {SWIN_L} depths (2, 2, 18, 2), heads (6, 12, 24, 48), window 12, embed_dim "
            f"{args.embed_dim} (Swin-L: 192), drop_path 0.3; FPN 256, 100 queries, 6 decoder layers, "
            f"{NUM_CLASSES} classes; {args.size}x{args.size}, batch {args.batch}, {args.precision}, AdamW; "
            f"checkpointing on = {', '.join(CHECKPOINTED_PARTS[args.checkpoint])}; "
            f"CPU x{args.threads} threads, torch {torch.__version__}")



class Trainer:
    def __init__(self, cfg: ModelConfig, precision: str, parts: tuple[str, ...]) -> None:
        self.parts = parts
        torch.manual_seed(0)
        self.model = build_model(cfg).train()
        self.criterion = build_criterion(cfg)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=1e-4)
        self.bf16 = precision == "bf16"
        self.recast_weights = recast_applies(precision, zero_stage=0)  # the train loop's rule; no DeepSpeed here

    def step(self, images: torch.Tensor, targets: list[dict], checkpointing: bool,
             after: Callable[[str], None] = lambda phase: None) -> None:
        """One training step; ``after(phase)`` runs after each phase (memory probes)."""
        set_checkpointing(self.model, checkpointing and self.parts)
        self.optimizer.zero_grad(set_to_none=True)
        after("start")
        # As launcher/train_loop.py runs bf16 (ops/weight_recast.py).
        with recast_saved_weights(self.recast_weights), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            outputs = self.model(images)
        after("forward")
        loss = sum(self.criterion(outputs, targets).values())
        del outputs  # as launcher/train_loop.py does: backward needs only what autograd saved
        after("loss")
        loss.backward()
        del loss
        after("backward")
        self.optimizer.step()
        after("optimizer")


def _reset_peak() -> None:
    """Sets VmHWM back to the current RSS (Linux >= 4.0), to take each phase's peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(args: argparse.Namespace, checkpointing: bool, steps: int = 3) -> None:
    """Runs in a fresh process: peak RSS of building and training, above the baseline
    after imports and data creation; and for the last step, the RSS at its start and
    the peak of each phase (forward, loss, backward, optimizer step)."""
    images, targets = synthetic_batch(NUM_CLASSES, args.size, args.batch)
    baseline = peak_rss_bytes()
    trainer = Trainer(model_config(args.embed_dim, args.size), args.precision, CHECKPOINTED_PARTS[args.checkpoint])
    for _ in range(steps - 1):  # from the second step on, the AdamW states exist
        trainer.step(images, targets, checkpointing)
    phases: dict[str, int] = {}
    peak = peak_rss_bytes()

    def probe(phase: str) -> None:
        nonlocal peak
        value = rss_bytes() if phase == "start" else peak_rss_bytes()
        peak = max(peak, peak_rss_bytes())
        phases[phase] = value - baseline
        _reset_peak()

    _reset_peak()
    trainer.step(images, targets, checkpointing, after=probe)
    print(json.dumps({"peak_bytes": max(peak, peak_rss_bytes()) - baseline, "phases": phases}))


def measure_memory(args: argparse.Namespace, checkpointing: bool, extra_env: dict[str, str]) -> dict:
    command = [sys.executable, __file__, "--memory-child", "on" if checkpointing else "off",
               "--embed-dim", str(args.embed_dim), "--size", str(args.size), "--batch", str(args.batch),
               "--precision", args.precision, "--threads", str(args.threads), "--checkpoint", args.checkpoint]
    env = child_env(args.threads, extra_env)
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_time(args: argparse.Namespace) -> dict[bool, list[float]]:
    images, targets = synthetic_batch(NUM_CLASSES, args.size, args.batch)
    trainer = Trainer(model_config(args.embed_dim, args.size), args.precision, CHECKPOINTED_PARTS[args.checkpoint])
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.warmup + args.steps):
        for checkpointing in (False, True):  # alternate: noise hits both settings alike
            started = time.perf_counter()
            trainer.step(images, targets, checkpointing)
            if i >= args.warmup:
                times[checkpointing].append(time.perf_counter() - started)
    return times


def breakdown(args: argparse.Namespace) -> dict[str, int]:
    """``describe``'s fake-tensor measurement of the same configuration (bytes): what the
    backbone and the whole model save for backward with checkpointing off and on, the
    largest checkpointed segment (rebuilt during backward) and the loss; and the
    parameter count."""
    cfg = model_config(args.embed_dim, args.size)
    result: dict[str, int] = {}
    for checkpointing in (False, True):
        configure_checkpointing(cfg, checkpointing and CHECKPOINTED_PARTS[args.checkpoint])
        key = "on" if checkpointing else "off"
        with torch.device("meta"):
            model, backbone = build_model(cfg), build_backbone(cfg.backbone)
        result["params"] = sum(p.numel() for p in model.parameters())
        recast = recast_applies(args.precision, zero_stage=0)  # as Trainer.step
        result[f"backbone_{key}"], _, _ = measure_activations(backbone, args.batch, args.size, args.precision, recast)
        result[f"model_{key}"], result[f"recompute_{key}"], outputs = measure_activations(
            model, args.batch, args.size, args.precision, recast)
    result["loss"] = measure_loss_activations(cfg, outputs, args.size)
    return result


def format_breakdown(est: dict[str, int]) -> list[str]:
    """The breakdown, and the peak it predicts: the larger of the start of backward (fp32
    weights + AdamW moments, 12 bytes a parameter, every saved activation and the loss's)
    and the backbone's backward (gradients now too, 16 bytes, the backbone's saved tensors
    and the segment being rebuilt; the decoder's and the loss's are freed by then)."""
    mib = {k: v / _MIB for k, v in est.items() if k != "params"}
    params = est["params"]
    peak = {
        key: max(12 * params / _MIB + mib[f"model_{key}"] + mib["loss"],
                 16 * params / _MIB + mib[f"backbone_{key}"] + mib[f"recompute_{key}"])
        for key in ("off", "on")
    }
    return [
        f"describe's breakdown (fake tensors, MiB): {params / 1e6:.1f}M parameters = {16 * params / _MIB:.0f} "
        f"weights+grads+AdamW; saved for backward, off: backbone {mib['backbone_off']:.0f} + decoders "
        f"{mib['model_off'] - mib['backbone_off']:.0f}; on: backbone {mib['backbone_on']:.0f} + decoders "
        f"{mib['model_on'] - mib['backbone_on']:.0f}, largest segment rebuilt in backward {mib['recompute_on']:.0f}; "
        f"loss {mib['loss']:.0f} (assumes {MASKS_PER_IMAGE} masks per image)",
        f"  predicted peak off {peak['off']:.0f} MiB, on {peak['on']:.0f} MiB -> ratio {peak['on'] / peak['off']:.2f}",
    ]


def _memory_line(label: str, memory: dict[bool, dict]) -> tuple[str, float]:
    off, on = memory[False]["peak_bytes"], memory[True]["peak_bytes"]
    ratio = on / off
    verdict = "MET" if ratio <= TARGETS["memory"] else "NOT MET"
    line = (f"peak memory, {label}: off {off / _MIB:.0f} MiB, on {on / _MIB:.0f} MiB -> ratio {ratio:.2f} "
            f"({1 - ratio:.0%} less; target <= {TARGETS['memory']}) {verdict}")
    for checkpointing, name in ((False, "off"), (True, "on ")):
        phases = ", ".join(f"{k} {v / _MIB:.0f}" for k, v in memory[checkpointing]["phases"].items())
        line += f"\n  {name}: RSS at the last step's start and each phase's peak (MiB): {phases}"
    return line, ratio


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per setting (>= 5)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--embed-dim", type=int, default=48, help="Swin-L's is 192; a multiple of 6")
    parser.add_argument("--size", type=int, default=640, help="Swin-L's ADE20K crop")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--checkpoint", choices=sorted(CHECKPOINTED_PARTS), default="all",
                        help="what 'on' checkpoints: every part that can (default), or the backbone alone")
    parser.add_argument("--memory-child", choices=["off", "on"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.memory_child:
        run_as_cpu_worker(args.threads)  # the timing runs here: started as a CPU worker starts
    malloc_note = configure_process()  # as a CPU worker (launcher/train_loop.py); not under LIVE_ALLOCATOR_ENV
    if args.memory_child:
        memory_child(args, args.memory_child == "on")
        return 0

    print(describe_config(args), flush=True)
    print(f"host memory: {malloc_note}", flush=True)
    print("\n".join(format_breakdown(breakdown(args))), flush=True)
    met = True
    for label, env in (("segscale's CPU-worker allocator", CPU_WORKER_ALLOCATOR_ENV),
                       ("freed memory returned to the OS (MALLOC_MMAP_THRESHOLD_=131072)", LIVE_ALLOCATOR_ENV)):
        line, ratio = _memory_line(label, {c: measure_memory(args, c, env) for c in (False, True)})
        print(line, flush=True)
        met &= ratio <= TARGETS["memory"]
    times = measure_time(args)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    time_ratio = on / off
    met &= time_ratio <= TARGETS["time"]
    print(f"step time (median of {args.steps}, alternating, segscale's CPU-worker allocator): off {off:.2f} s, on {on:.2f} s -> "
          f"ratio {time_ratio:.2f} ({time_ratio - 1:+.0%}; target <= {TARGETS['time']}) "
          f"{'MET' if time_ratio <= TARGETS['time'] else 'NOT MET'}")
    print(f"  step times off {[round(t, 2) for t in times[False]]}")
    print(f"  step times on  {[round(t, 2) for t in times[True]]}")
    print("targets met" if met else "some targets NOT met")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
