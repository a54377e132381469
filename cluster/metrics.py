"""Per-worker Prometheus exporter.

Each Ray Train worker serves its own ``/metrics`` endpoint (port base + local rank) from
a private ``CollectorRegistry`` so that several workers in one process (tests) or a
restarted worker never collide on metric names. Names follow Prometheus conventions:
``segscale_`` prefix, base units, counters ending in ``_total``; labels are ``run`` and
``rank`` (never ``job``: a scrape renames it to ``exported_job``).
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
    write_to_textfile,
)

from ops.atomic_file import write_json_atomic

# Step durations span ~10 ms (tiny CPU demo) to ~10 s (Swin-L at 640^2 on one GPU).
STEP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class MetricsEndpoint:
    host: str
    port: int
    rank: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"


@dataclass
class WorkerMetrics:
    """The metrics one training worker exports, and its HTTP endpoint."""

    run: str
    rank: int
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        labels = ["run", "rank"]
        r = self.registry
        self._labels = {"run": self.run, "rank": str(self.rank)}
        self.step = Gauge("segscale_step", "Last completed optimizer step", labels, registry=r)
        self.samples = Counter("segscale_samples_total", "Training samples consumed", labels, registry=r)
        self.samples_per_second = Gauge(
            "segscale_samples_per_second", "Training throughput over the last logging window", labels, registry=r
        )
        self.step_seconds = Histogram(
            "segscale_step_duration_seconds", "Wall time of one optimizer step", labels,
            buckets=STEP_SECONDS_BUCKETS, registry=r,
        )
        self.loader_wait = Counter(
            "segscale_loader_wait_seconds_total", "Time spent waiting for the next batch", labels, registry=r
        )
        self.loss = Gauge("segscale_loss", "Total training loss of the last step", labels, registry=r)
        self.loss_term = Gauge(
            "segscale_loss_term", "Each weighted loss term of the last step", labels + ["term"], registry=r
        )
        self.learning_rate = Gauge("segscale_learning_rate", "Base learning rate", labels, registry=r)
        self.rss = Gauge("segscale_process_resident_memory_bytes", "Worker peak resident set size", labels, registry=r)
        self.last_step_time = Gauge(
            "segscale_last_step_timestamp_seconds", "Unix time of the last completed step", labels, registry=r
        )
        # Set once, now: a worker that hangs before its first step (a collective that never
        # completes, shards that never arrive) has no last-step time, and the stall alert
        # and the dashboard measure from this instead.
        self.start_time = Gauge(
            "segscale_start_timestamp_seconds", "Unix time this worker's exporter started", labels, registry=r
        )
        self.start_time.labels(**self._labels).set(time.time())
        self.checkpoint_seconds = Counter(
            "segscale_checkpoint_save_seconds_total", "Time spent saving checkpoints", labels, registry=r
        )
        self.checkpoints = Counter("segscale_checkpoints_total", "Checkpoints saved", labels, registry=r)
        self.data_skipped = Counter(
            "segscale_data_skipped_samples_total", "Bad training samples left out (data.on_error=skip)", labels,
            registry=r,
        )
        self.grad_norm = Gauge(
            "segscale_grad_norm", "Global L2 norm of the gradients of the last step, before clipping", labels,
            registry=r,
        )
        self.gpu_allocated = Gauge(
            "segscale_gpu_memory_allocated_bytes", "Peak GPU memory held by tensors (0 on CPU workers)", labels,
            registry=r,
        )
        self.gpu_reserved = Gauge(
            "segscale_gpu_memory_reserved_bytes", "Peak GPU memory reserved by the caching allocator (0 on CPU)",
            labels, registry=r,
        )
        self.mfu = Gauge(
            "segscale_mfu", "Model FLOPs utilisation: model FLOP/s over the worker's peak FLOP/s (ratio)", labels,
            registry=r,
        )
        self.checkpoint_bytes = Counter(
            "segscale_checkpoint_size_bytes_total", "Bytes this rank wrote in checkpoints", labels, registry=r
        )
        self.restarts = Counter(
            "segscale_restarts_total", "Times this run was resumed from a checkpoint (after a failure or a re-run)",
            labels, registry=r,
        )
        self.nonfinite_loss = Counter(
            "segscale_nonfinite_loss_total", "Steps whose loss was NaN or infinite (the run stops at the first)",
            labels, registry=r,
        )
        # Touch every labelled series now: a counter that appears only at its first event
        # has no rate() before it, and dashboards and alerts would read "no data".
        for metric in (self.samples, self.loader_wait, self.checkpoint_seconds, self.checkpoints,
                       self.data_skipped, self.checkpoint_bytes, self.restarts, self.nonfinite_loss,
                       self.gpu_allocated, self.gpu_reserved):
            metric.labels(**self._labels)
        self.endpoint: MetricsEndpoint | None = None
        self._server = None

    def start(self, host: str, port: int) -> MetricsEndpoint:
        """Serve ``/metrics`` on ``host:port`` (0 = a free port); falls back to a free port
        if ``port`` is taken, so a stale process can't stop a run (the real address is
        returned and logged)."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError:
            if port == 0:
                raise
            server, _thread = start_http_server(0, addr=host, registry=self.registry)
        self._server = server
        self.endpoint = MetricsEndpoint(host=host, port=server.server_port, rank=self.rank)
        return self.endpoint

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def observe_step(
        self,
        step: int,
        loss: float,
        loss_terms: dict[str, float],
        batch_size: int,
        step_seconds: float,
        loader_wait_seconds: float,
        learning_rate: float,
        grad_norm: float | None = None,
        mfu: float | None = None,
    ) -> None:
        labels = self._labels
        self.step.labels(**labels).set(step)
        self.samples.labels(**labels).inc(batch_size)
        self.step_seconds.labels(**labels).observe(step_seconds)
        self.loader_wait.labels(**labels).inc(loader_wait_seconds)
        self.loss.labels(**labels).set(loss)
        for term, value in loss_terms.items():
            self.loss_term.labels(term=term, **labels).set(value)
        self.learning_rate.labels(**labels).set(learning_rate)
        # ru_maxrss is KiB on Linux: the peak, which is what sizing a worker needs.
        self.rss.labels(**labels).set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        if grad_norm is not None:
            self.grad_norm.labels(**labels).set(grad_norm)
        if mfu is not None:
            self.mfu.labels(**labels).set(mfu)
        allocated, reserved = _gpu_peak_memory()
        self.gpu_allocated.labels(**labels).set(allocated)
        self.gpu_reserved.labels(**labels).set(reserved)
        self.last_step_time.labels(**labels).set(time.time())

    def observe_nonfinite_loss(self, loss: float) -> None:
        """Record a NaN/inf loss before the run stops on it, so the alert sees it."""
        self.loss.labels(**self._labels).set(loss)
        self.nonfinite_loss.labels(**self._labels).inc()

    def observe_restart(self, count: int) -> None:
        """``count`` resumes of this run so far (carried in its checkpoints)."""
        if count > 0:
            self.restarts.labels(**self._labels).inc(count)

    def observe_skipped(self, count: int) -> None:
        """``count`` more bad samples left out by the loader."""
        if count > 0:
            self.data_skipped.labels(**self._labels).inc(count)

    def observe_throughput(self, samples_per_second: float) -> None:
        self.samples_per_second.labels(**self._labels).set(samples_per_second)

    def observe_checkpoint(self, seconds: float, size_bytes: int) -> None:
        self.checkpoint_seconds.labels(**self._labels).inc(seconds)
        self.checkpoint_bytes.labels(**self._labels).inc(size_bytes)
        self.checkpoints.labels(**self._labels).inc()

    def write_textfile(self, path: str) -> None:
        """Snapshot in the Prometheus text format (node_exporter textfile style), so the
        final values stay readable after the worker exits."""
        write_to_textfile(path, self.registry)  # prometheus_client writes it atomically


def _gpu_peak_memory() -> tuple[int, int]:
    """(allocated, reserved) peak bytes of this process's CUDA device; zeros on CPU."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0, 0
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def live_targets_file(run_dir: str) -> str:
    """``<output_dir>/prometheus_targets/<run_name>.json``: the exporters of the runs in
    progress under one output folder, in one directory Prometheus can glob (it allows a
    wildcard only in the last path segment)."""
    output_dir, run_name = os.path.split(os.path.normpath(run_dir))
    return os.path.join(output_dir, "prometheus_targets", f"{run_name}.json")


def write_file_sd(path: str, endpoints: list[MetricsEndpoint]) -> None:
    """Write a Prometheus ``file_sd_configs`` target file for the run's exporters."""
    # No target labels: the series already carry run and rank, and a target label of
    # the same name would be renamed exported_run/exported_rank by the scrape.
    groups = [{"targets": [f"{e.host}:{e.port}" for e in sorted(endpoints, key=lambda e: e.rank)]}]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_json_atomic(path, groups)
