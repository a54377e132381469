"""Telling a Ctrl-C'd run from other exits of Ray Train's ``fit()``.

During ``fit()`` Ray Train installs its own SIGINT handler, which aborts the run and does
not chain to any other; ``fit()`` then ends in ``sys.exit(0)``, or in Ray's
``SystemExit(1)`` when the signal cut a wait short. The second looks like any failure, so
``train`` and ``demo`` watch for the signal itself: through the wakeup fd, which the
interpreter writes for every signal a Python handler (Ray's included) receives.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


@contextmanager
def sigint_watch() -> Iterator[Callable[[], bool]]:
    """Yields a function telling whether a SIGINT arrived inside the block. Off the main
    thread (where Python delivers no signals and refuses a wakeup fd) it says no."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    received: set[int] = set()

    def seen() -> bool:
        try:
            received.update(os.read(read_fd, 4096))
        except BlockingIOError:  # nothing arrived since the last read
            pass
        return signal.SIGINT in received

    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        yield seen
    finally:
        signal.set_wakeup_fd(previous)
        os.close(read_fd)
        os.close(write_fd)


def was_interrupted(stop: KeyboardInterrupt | SystemExit, sigint_seen: Callable[[], bool]) -> bool:
    """Whether ``stop``, raised out of ``fit()``, ended a run the user stopped with Ctrl-C:
    a KeyboardInterrupt, Ray's ``sys.exit(0)``, or any exit after a SIGINT. Another exit
    code without one is someone else's exit, to be re-raised."""
    if isinstance(stop, KeyboardInterrupt):
        return True
    return stop.code in (0, None) or sigint_seen()


def run_unless_interrupted(run: Callable[[], T], resume_hint: Callable[[], str]) -> T | None:
    """``run()``'s result, or None after a Ctrl-C, having printed ``interrupted; `` and
    ``resume_hint()`` (asked then: the run may have saved its config by that time; the
    caller exits 130). Every other exception passes through."""
    with sigint_watch() as sigint_seen:
        try:
            return run()
        except (KeyboardInterrupt, SystemExit) as stop:
            # Without this a Ctrl-C'd run exited 1 with no word, or 0 as if it had finished.
            if not was_interrupted(stop, sigint_seen):
                raise
            print(f"\ninterrupted; {resume_hint()}", flush=True)
            return None
