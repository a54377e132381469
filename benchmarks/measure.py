"""Measuring helpers shared by the benchmark scripts (imported as ``measure``: the
scripts run from benchmarks/, which Python puts on sys.path).

Time: sides run alternately (noise on this shared machine hits both alike), median after
warm-up; in one process (``alternate``), or each side in its own (``alternate_processes``)
where a side sets process-wide state such as its malloc settings. Memory: on CUDA the
caching allocator's peak; on CPU the peak resident set (VmHWM) of a fresh process per
side, above its baseline after imports and inputs — the number a user's machine runs out
of.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch

from ops.host_allocator import MALLOC_ENV_VARS, jemalloc_loaded, preload_failed, worker_allocator_env

# What segscale's CPU workers start with by default on this machine (cluster.host_allocator
# "auto"): jemalloc's preload where it is installed, else nothing (glibc, which the process
# sets up itself with ops.host_allocator.configure_process).
CPU_WORKER_ALLOCATOR_ENV = worker_allocator_env("auto", environ={})
# Fixed (not glibc's self-raising) mmap threshold: every tensor above 128 KiB is its own
# mapping and goes back to the OS when freed, so RSS follows the live tensors, as a GPU
# allocator's max_memory_allocated does. With glibc's defaults, freed activations stay
# resident in the heap and are reused (or not) as fragmentation allows.
LIVE_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from the
    parent across fork+exec, so a child would start at the parent's peak."""
    return _status_bytes("VmHWM")


def rss_bytes() -> int:
    """This process's current RSS (VmRSS)."""
    return _status_bytes("VmRSS")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    runners: dict[str, Callable[[], object]], steps: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each runner, calls interleaved, ``warmup`` calls dropped."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(warmup + steps):
        for name, run in runners.items():
            synchronize(device)
            started = time.perf_counter()
            run()
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - started)
    return times


def serve_steps(step: Callable[[], object]) -> None:
    """A step child's loop (see ``alternate_processes``): prints ``ready``, then runs one
    ``step`` per line read from stdin and prints its seconds."""
    print("ready", flush=True)
    for _ in sys.stdin:
        started = time.perf_counter()
        step()
        print(f"{time.perf_counter() - started:.6f}", flush=True)


def alternate_processes(
    commands: dict[str, tuple[list[str], dict[str, str]]], steps: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per step of each side, every side in its own process (a command, with its
    environment, that ends in ``serve_steps``), the steps interleaved as ``alternate``
    does. Each side then runs as its own user's process would, with its own heap and
    allocator, and the machine's noise still hits all sides alike."""
    children: dict[str, subprocess.Popen] = {}
    try:
        for name, (command, env) in commands.items():  # all start at once; each waits for its first line
            children[name] = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              text=True, env=env)
        for name, child in children.items():
            for line in child.stdout:
                if line.strip() == "ready":
                    break
            else:
                raise RuntimeError(f"step child {name} exited before it was ready (code {child.wait()})")
        times: dict[str, list[float]] = {name: [] for name in children}
        for i in range(warmup + steps):
            for name, child in children.items():
                child.stdin.write("step\n")
                child.stdin.flush()
                line = child.stdout.readline()
                if not line:
                    raise RuntimeError(f"step child {name} exited during step {i + 1} (code {child.wait()})")
                if i >= warmup:
                    times[name].append(float(line))
        return times
    finally:
        for child in children.values():
            if child.stdin:
                child.stdin.close()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()


def cuda_peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    """Peak allocated bytes during ``run`` above what was allocated before it."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def child_env(threads: int, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """A child's environment: this one with ``threads`` threads, the malloc settings
    (glibc's ``MALLOC_*_`` and ``GLIBC_TUNABLES``, e.g. the ``MALLOC_MMAP_THRESHOLD_``
    README "Troubleshooting" suggests, jemalloc's ``MALLOC_CONF``, and ``LD_PRELOAD``)
    left out so that each side runs with the allocator its label names (glibc's defaults,
    or segscale's ``CPU_WORKER_ALLOCATOR_ENV``, which a user's setting would override),
    and ``extra_env`` on top."""
    env = {k: v for k, v in os.environ.items() if k not in (*MALLOC_ENV_VARS, "LD_PRELOAD")}
    return {**env, "OMP_NUM_THREADS": str(threads), **(extra_env or {})}


def run_as_cpu_worker(threads: int) -> None:
    """Restarts this script (same arguments) under ``CPU_WORKER_ALLOCATOR_ENV`` unless it
    already runs so: a benchmark that times steps in its own process then runs on the
    allocator segscale's CPU workers start with, which only a starting process can preload."""
    if not CPU_WORKER_ALLOCATOR_ENV or jemalloc_loaded() or preload_failed():
        return  # nothing to preload, done, or tried once (ld.so could not preload it: glibc then)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], child_env(threads, CPU_WORKER_ALLOCATOR_ENV))


def child_peak_bytes(script: str, child_args: Sequence[str], threads: int) -> int:
    """Runs ``script --memory-child ARGS`` in a fresh process, which prints a JSON line
    with ``peak_bytes`` last (see ``report_child_peak``)."""
    env = child_env(threads)
    command = [sys.executable, script, "--memory-child", *child_args, "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"memory child {' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def report_child_peak(baseline: int) -> None:
    print(json.dumps({"peak_bytes": peak_rss_bytes() - baseline}), flush=True)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# How a user installs the optional baselines (setup.cfg's "bench" extra), pinned like the rest.
BENCH_INSTALL = ".venv/bin/pip install -c constraints.txt -e '.[bench]'"


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """A script's command line: ``--help`` shows the docstring's first paragraph (what it
    measures), its paragraph starting "Takes" (how long, what it needs) and every
    option's default, so a user knows what a run costs before starting one."""
    paragraphs = [p.strip() for p in doc.strip().split("\n\n")]
    cost = next((p for p in paragraphs if p.startswith("Takes")), None)
    return argparse.ArgumentParser(description=paragraphs[0], epilog=cost,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def require_baseline(module: str = "transformers") -> None:
    """One line naming the install command when an optional baseline is missing, before
    any work (otherwise a child process fails minutes in with a traceback)."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        missing = isinstance(err, ModuleNotFoundError) and err.name == module
        state = "which is not installed" if missing else f"which fails to import ({err})"
        print(f"{os.path.basename(sys.argv[0])}: the baseline needs {module}, {state}; "
              f"install it with: {BENCH_INSTALL}", file=sys.stderr)
        raise SystemExit(2) from None


def _device(value: str) -> str:
    """``--device``: cpu, or cuda where torch sees one (argparse turns the error into one line)."""
    if value.split(":")[0] not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {value!r}")
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"torch {torch.__version__} sees no CUDA device on this machine; use cpu")
    return value


def kernel_parser(doc: str) -> argparse.ArgumentParser:
    """The command line shared by the kernel benchmarks (one op, two sides)."""
    parser = benchmark_parser(doc)
    parser.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (memory from the CUDA allocator there)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both", help="precisions measured")
    parser.add_argument("--steps", type=int, default=7, help="measured calls per side (>= 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per side first")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--memory-child", nargs=2, metavar=("SIDE", "DTYPE"), help=argparse.SUPPRESS)
    return parser


def kernel_memory_child(runners: dict, make_inputs: Callable, side: str, dtype: str) -> None:
    """In a fresh process: the peak RSS of one call of ``side`` above the inputs."""
    inputs = make_inputs(torch.device("cpu"), DTYPES[dtype])
    baseline = peak_rss_bytes()
    runners[side](inputs)
    report_child_peak(baseline)


def compare_kernels(
    script: str, runners: dict, make_inputs: Callable, dtype: str, args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, int], dict[str, list[float]]]:
    """Median seconds, peak bytes and all timings of each side at ``dtype``."""
    device = torch.device(args.device)
    inputs = make_inputs(device, DTYPES[dtype])
    calls = {side: (lambda run=run, inputs=inputs: run(inputs)) for side, run in runners.items()}
    times = alternate(calls, args.steps, args.warmup, device)
    peaks = {}
    for side, run in calls.items():
        if device.type == "cuda":
            peaks[side] = cuda_peak_bytes(run, device)  # after alternate()'s warm-up calls
        else:
            peaks[side] = child_peak_bytes(script, [side, dtype], args.threads)
    return {side: statistics.median(t) for side, t in times.items()}, peaks, times


def device_name(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU x{args.threads} threads"


def report_comparison(
    label: str,
    ours: str,
    theirs: str,
    result: tuple[dict[str, float], dict[str, int], dict[str, list[float]]],
    time_target: float,
    memory_target: float,
) -> bool:
    """Prints one line of ratios against their targets (and the raw timings); returns
    whether both targets are met."""
    median, peak, times = result
    time_ratio, mem_ratio = median[ours] / median[theirs], peak[ours] / peak[theirs]
    met = time_ratio <= time_target and mem_ratio <= memory_target
    print(
        f"{label}: time {ours} {median[ours] * 1e3:.1f} ms vs {theirs} {median[theirs] * 1e3:.1f} ms -> ratio "
        f"{time_ratio:.2f} (target <= {time_target:.2f}); peak memory {peak[ours] / 2**20:.0f} MiB vs "
        f"{peak[theirs] / 2**20:.0f} MiB -> ratio {mem_ratio:.2f} (target <= {memory_target}) "
        f"{'MET' if met else 'NOT MET'}"
    )
    for side, values in times.items():
        print(f"  times {side} (ms): {[round(t * 1e3, 1) for t in values]}")
    return met
