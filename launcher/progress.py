"""Rank-0 progress lines: step, loss terms, lr, samples/s, loader share and ETA."""

from __future__ import annotations

import datetime
import json
import time

from data_pipeline.shard_state import plural  # noqa: F401  (one definition for both packages)


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


class StepLogger:
    """Prints one line per logging window; throughput and ETA come from that window."""

    def __init__(self, total_steps: int, samples_per_step: int, enabled: bool):
        self.total_steps = total_steps
        self.samples_per_step = samples_per_step  # across all ranks
        self.enabled = enabled
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._window_wait = 0.0
        self._window_compute = 0.0

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def step(self, step: int, terms: dict[str, float], lr: float, step_seconds: float, loader_wait: float,
             force: bool) -> float | None:
        """Record a step; on ``force`` print a line and return the window's samples/s."""
        self._window_steps += 1
        self._window_wait += loader_wait
        self._window_compute += step_seconds
        if not force:
            return None
        elapsed = time.perf_counter() - self._window_start
        seconds_per_step = elapsed / self._window_steps
        throughput = self.samples_per_step / seconds_per_step
        wait_share = self._window_wait / max(self._window_compute, 1e-9)
        eta = seconds_per_step * (self.total_steps - step)
        loss_text = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
        self.print(
            f"step {step}/{self.total_steps} | {loss_text} | lr {lr:.2e} | {throughput:.1f} samples/s"
            f" | loader wait {100 * wait_share:.1f}% | eta {format_duration(eta)}"
        )
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._window_wait = 0.0
        self._window_compute = 0.0
        return throughput


class StepRecords:
    """Rank 0's per-step record, one JSON line per step in ``<run>/train_log.jsonl``:
    the full-precision losses, lr and gradient norm. A resumed run appends the steps it
    re-runs after its checkpoint, so the last line of a step is the one that counts."""

    def __init__(self, path: str):
        self.path = path  # "" = off (other ranks, remote run folders)

    def write(self, step: int, terms: dict[str, float], lr: float, grad_norm: float | None) -> None:
        if not self.path:
            return
        record = {"step": step, **terms, "lr": lr, "grad_norm": grad_norm, "time": time.time()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_step_records(path: str) -> dict[int, dict]:
    """Step -> its last record (see StepRecords)."""
    records: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                records[record["step"]] = record
    return records
