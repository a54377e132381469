"""Where a training step of ``maskformer_vs_hf.py``'s configuration spends its time, op by
op, on both sides: segscale's MaskFormer and transformers'.

Why not ``torch.profiler``: on this CPU its per-op self times inflate memory-bound ops
several-fold (a bf16 GELU over 2×4096×384 reads 6.1 ms in the profiler and 0.8 ms timed
directly inside the same step), so its table overstates everything around the matrix
products. Here every ATen call is timed with ``perf_counter`` from a
``TorchDispatchMode`` (below autograd, so forward and backward ops alike). The mode adds
~10 µs of Python per call: the instrumented step is longer than a plain one, and the
plain step's median is printed beside it.

The point of the split: the matrix products and convolutions (``PRODUCT_OPS``) are the
same FLOPs on both sides at this identical configuration, so segscale's product time
divided by transformers' plain step is a lower bound on the step-time ratio that no work
outside the products can beat. That holds in bf16, where both sides run the same direct
convolutions; in fp32 segscale's 3×3 convolutions run as Winograd (``ops/winograd_conv.py``:
batched products plus transforms, fewer FLOPs than transformers' direct ones), so there
the bound is only indicative, and the tile transforms, C kernels called through ctypes
(``ops/winograd_native.py``), are no ATen ops: their time shows under "Python and the
timer's own cost". The plain step is the median of the plain steps, the instrumented one
their mean.

    python benchmarks/op_breakdown.py [--precision bf16] [--steps 3] [--warmup 3] [--top 20]

Each side runs in its own process, one after the other (started as in
``maskformer_vs_hf.py``: segscale's side with its CPU-worker allocator).

Takes ~25 s on a 2-core CPU with `--steps 1 --warmup 1`, about a minute at the defaults.
Needs transformers, the baseline: .venv/bin/pip install -c constraints.txt -e '.[bench]'
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time

import ops.torchvision_fix  # noqa: F401

# isort: split
import torch
from maskformer_vs_hf import BATCH, IMPLEMENTATIONS, NUM_CLASSES, SIZE, side_env, start_side
from measure import benchmark_parser, require_baseline
from torch.utils._python_dispatch import TorchDispatchMode

from data_pipeline.synthetic import synthetic_batch

PRODUCT_OPS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.convolution",
               "aten.convolution_backward", "aten._scaled_dot_product_flash_attention_for_cpu",
               "aten._scaled_dot_product_flash_attention_for_cpu_backward"}
SIDES = ("ours", "hf")


class _OpTimer(TorchDispatchMode):
    """Wall seconds and calls per ATen op (overload packet) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        started = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.seconds[name] += time.perf_counter() - started
        self.calls[name] += 1
        return out


def side_child(impl: str, dtype: str, steps: int, warmup: int) -> None:
    """In the side's own process: plain steps, then instrumented ones; prints JSON."""
    images, targets = synthetic_batch(NUM_CLASSES, SIZE, BATCH)
    torch.manual_seed(0)
    runner = start_side(impl)
    for _ in range(warmup):
        runner.step(images, targets, dtype)
    plain = []
    for _ in range(steps):
        started = time.perf_counter()
        runner.step(images, targets, dtype)
        plain.append(time.perf_counter() - started)
    timer = _OpTimer()
    started = time.perf_counter()
    with timer:
        for _ in range(steps):
            runner.step(images, targets, dtype)
    instrumented = (time.perf_counter() - started) / steps
    print(json.dumps({"plain": statistics.median(plain), "instrumented": instrumented,
                      "ms": {k: v / steps * 1e3 for k, v in timer.seconds.items()},
                      "calls": {k: v // steps for k, v in timer.calls.items()}}))


def run_side(impl: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--side-child", impl, "--precision", args.precision,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    print(f"timing {IMPLEMENTATIONS[impl].name} ({args.warmup} warm-up + 2×{args.steps} steps) ...", flush=True)
    out = subprocess.run(command, capture_output=True, text=True, env=side_env(impl, args.threads))
    if out.returncode != 0:
        raise SystemExit(f"{IMPLEMENTATIONS[impl].name}'s process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=20, help="ops listed, by the larger of the two sides' times")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--side-child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.side_child:
        side_child(args.side_child, args.precision, args.steps, args.warmup)
        return 0
    require_baseline()

    result = {impl: run_side(impl, args) for impl in SIDES}
    ours, hf = result["ours"], result["hf"]
    names = sorted(set(ours["ms"]) | set(hf["ms"]), key=lambda n: -max(ours["ms"].get(n, 0), hf["ms"].get(n, 0)))
    print(f"\n{args.precision}, ms per step (calls) | segscale | transformers")
    for name in names[: args.top]:
        cells = [f"{r['ms'].get(name, 0):7.1f} ({r['calls'].get(name, 0):4d})" for r in (ours, hf)]
        print(f"  {name:46s} {cells[0]}  {cells[1]}{'  [product]' if name in PRODUCT_OPS else ''}")
    products = {impl: sum(v for k, v in r["ms"].items() if k in PRODUCT_OPS) for impl, r in result.items()}
    for label, impl in (("segscale", "ours"), ("transformers", "hf")):
        r = result[impl]
        rest = sum(r["ms"].values()) - products[impl]
        print(f"{label}: plain step {r['plain']:.3f} s; instrumented {r['instrumented']:.3f} s = matrix products and "
              f"convolutions {products[impl] / 1e3:.3f} s + other ops {rest / 1e3:.3f} s + Python and the timer's own "
              f"cost {r['instrumented'] - sum(r['ms'].values()) / 1e3:.3f} s")
    bound = products["ours"] / 1e3 / hf["plain"]
    print(f"lower bound on the step-time ratio (segscale's products alone / transformers' plain step): {bound:.2f}; "
          f"measured plain ratio in this run {ours['plain'] / hf['plain']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
