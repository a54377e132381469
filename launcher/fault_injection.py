"""Deterministic fault injection, for the fault-tolerance tests and for drills on a cluster.

``SEGSCALE_FAULT=<point>:<step>:<rank>`` kills the worker of rank ``<rank>`` with SIGKILL
(no cleanup, no Python exception: what an OOM kill or a lost node looks like) when it
reaches ``<point>`` at optimizer step ``<step>``. A marker file in the run folder makes
each fault fire once per run, so the worker group that Ray restarts runs through.

Points:
  ``after_step``      the step's optimizer update is done; its checkpoint is not written
  ``mid_checkpoint``  DeepSpeed's shards of the checkpoint are on disk; this rank's file
                      list and the checkpoint metadata are not
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_step", "mid_checkpoint")
ENV_VAR = "SEGSCALE_FAULT"


def parse_fault(text: str) -> tuple[str, int, int] | None:
    if not text:
        return None
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in POINTS or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"{ENV_VAR}={text!r}: expected <point>:<step>:<rank> with point one of {', '.join(POINTS)}")
    return parts[0], int(parts[1]), int(parts[2])


def fault_point(point: str, step: int, rank: int, run_dir: str) -> None:
    """Kill this process here if ``SEGSCALE_FAULT`` asks for it and it has not fired yet."""
    fault = parse_fault(os.environ.get(ENV_VAR, ""))
    if fault != (point, step, rank):
        return
    marker = os.path.join(run_dir, f"fault_fired_{point}_{step}_{rank}")
    try:
        # O_EXCL: exactly one firing per run, even if two processes raced here.
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    print(f"fault injection: killing rank {rank} at {point}, step {step} ({ENV_VAR})", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
