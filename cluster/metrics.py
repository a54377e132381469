"""Per-worker Prometheus exporter.

Each Ray Train worker serves its own ``/metrics`` endpoint (port base + local rank) from
a private ``CollectorRegistry`` so that several workers in one process (tests) or a
restarted worker never collide on metric names. Names follow Prometheus conventions:
``segscale_`` prefix, base units, counters ending in ``_total``; labels are ``run`` and
``rank`` (never ``job``: a scrape renames it to ``exported_job``).
"""

from __future__ import annotations

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
        self.checkpoint_seconds = Counter(
            "segscale_checkpoint_save_seconds_total", "Time spent saving checkpoints", labels, registry=r
        )
        self.checkpoints = Counter("segscale_checkpoints_total", "Checkpoints saved", labels, registry=r)
        self.data_skipped = Counter(
            "segscale_data_skipped_samples_total", "Bad training samples left out (data.on_error=skip)", labels,
            registry=r,
        )
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
        self.last_step_time.labels(**labels).set(time.time())

    def observe_skipped(self, count: int) -> None:
        """``count`` more bad samples left out by the loader."""
        if count > 0:
            self.data_skipped.labels(**self._labels).inc(count)

    def observe_throughput(self, samples_per_second: float) -> None:
        self.samples_per_second.labels(**self._labels).set(samples_per_second)

    def observe_checkpoint(self, seconds: float) -> None:
        self.checkpoint_seconds.labels(**self._labels).inc(seconds)
        self.checkpoints.labels(**self._labels).inc()

    def write_textfile(self, path: str) -> None:
        """Snapshot in the Prometheus text format (node_exporter textfile style), so the
        final values stay readable after the worker exits."""
        write_to_textfile(path, self.registry)  # prometheus_client writes it atomically


def write_file_sd(path: str, endpoints: list[MetricsEndpoint]) -> None:
    """Write a Prometheus ``file_sd_configs`` target file for the run's exporters."""
    # No target labels: the series already carry run and rank, and a target label of
    # the same name would be renamed exported_run/exported_rank by the scrape.
    groups = [{"targets": [f"{e.host}:{e.port}" for e in sorted(endpoints, key=lambda e: e.rank)]}]
    write_json_atomic(path, groups)
