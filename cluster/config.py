"""Typed configuration of the ``cluster`` section (owned here, composed by ``launcher``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal


@dataclass
class ClusterConfig:
    # Ray cluster to join ("ray://..." or "host:port" or "auto"); "" = the RAY_ADDRESS
    # environment variable, else start a local Ray instance for this run.
    address: str = ""
    # One Ray Train worker per accelerator (or per CPU slot on a CPU-only machine).
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    # torch intra-op threads per worker; 0 = cpus_per_worker.
    torch_threads: int = 0
    # CPU workers (and eval / predict, which run on the CPU) keep the memory a step frees
    # for the next step instead of giving it back to the OS and faulting it in again
    # (ops/host_allocator.py; same peak, faster steps: benchmarks/RESULTS.md). false =
    # malloc as the process starts. Ignored on GPU workers.
    keep_freed_memory: bool = True
    # Which allocator keeps it on CPU workers: jemalloc, preloaded when a worker starts
    # (Debian's libjemalloc2; less fragmentation, so a lower peak), or glibc's malloc with
    # fixed thresholds; "auto" = jemalloc where the driver finds it installed, else glibc.
    # eval and predict use glibc (a running process cannot preload). glibc's thresholds
    # set in the environment (MALLOC_MMAP_THRESHOLD_ ..., passed on to the workers) win.
    host_allocator: Literal["auto", "jemalloc", "glibc"] = "auto"
    # torch.distributed backend; "" = nccl with GPUs, gloo otherwise.
    backend: str = ""
    # Ray restarts the whole worker group this many times after a failure.
    max_failures: int = 0
    # Each rank serves Prometheus metrics on metrics_port_base + local rank;
    # 0 = pick free ports (their addresses go to the run's prometheus_targets.json);
    # -1 = no exporter.
    metrics_port_base: int = 9400
    # Address the exporters bind to; "" = the node IP Ray reports (loopback for a
    # local instance).
    metrics_host: str = ""
    # Peak TFLOP/s of one worker for the MFU estimate (segscale_mfu); 0 = the datasheet
    # number of a known GPU, else a matmul rate measured at start-up.
    peak_tflops_per_worker: float = 0.0

    # Value ranges checked when a config is loaded (launcher.typed_config.check_rules).
    RULES: ClassVar[dict[str, str]] = {
        "num_workers cpus_per_worker": "positive int",
        "torch_threads max_failures peak_tflops_per_worker": ">= 0",
    }

    def validate(self, path: str) -> None:
        if not -1 <= self.metrics_port_base <= 65535:
            raise ValueError(f"{path}.metrics_port_base: expected -1 (no exporter), 0 (free ports) or a TCP port, "
                             f"got {self.metrics_port_base}")
