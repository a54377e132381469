"""Stale JIT-build locks: a worker killed while loading a DeepSpeed op must not hang every
later run.

torch's ``cpp_extension.load`` (which DeepSpeed's op builders call, at every worker's
``deepspeed.initialize``) takes a ``<build dir>/lock`` file for the duration of the load,
even when the op is already built, and every other process waits for that file to
disappear, forever. A worker SIGKILLed inside that window (an OOM kill, a failure drill,
a node lost mid start-up) leaves the file behind, and every later run on the machine
hangs at start-up. While a worker initialises DeepSpeed, a watchdog thread removes lock
files older than any real build takes, so the waiting process goes on.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from launcher.environment import torch_extensions_dir

# A real build of the shared-memory op takes ~25 s on 2 cores (a few minutes at worst
# on a loaded machine); a lock older than this has lost its owner.
STALE_AFTER_SECONDS = 300.0


def remove_stale_build_locks(stale_after: float = STALE_AFTER_SECONDS, root: str | None = None) -> list[str]:
    """Remove ``lock`` files under the extensions cache older than ``stale_after`` s."""
    removed = []
    for lock in glob.glob(os.path.join(root or torch_extensions_dir(), "**", "lock"), recursive=True):
        try:
            age = time.time() - os.path.getmtime(lock)
            if age > stale_after:
                os.remove(lock)
        except FileNotFoundError:  # released meanwhile
            continue
        if age > stale_after:
            removed.append(lock)
            print(f"warning: removed stale build lock {lock} ({age:.0f} s old; a process was killed while "
                  "loading a DeepSpeed op)", flush=True)
    return removed


@contextmanager
def stale_build_lock_watchdog(
    stale_after: float = STALE_AFTER_SECONDS, period: float = 5.0, root: str | None = None
) -> Iterator[None]:
    """Within the block, stale build locks are removed every ``period`` seconds."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(period):
            remove_stale_build_locks(stale_after, root)

    remove_stale_build_locks(stale_after, root)
    thread = threading.Thread(target=watch, name="segscale-build-lock-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
