"""ops.host_allocator: glibc keeps what a step frees, unless the user set glibc's thresholds.

mallopt settings are process-wide and cannot be undone, so each case runs in a fresh
interpreter. The probe mallocs four 8 MiB blocks, touches them and frees them, in the
main thread and in a second thread (Ray Train runs the training function in one), and
reads glibc's own account (mallinfo2): how many blocks were mmapped and how much freed
memory the heap keeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r"""
import ctypes, json, sys, threading
from ops.host_allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
note = keep_freed_memory() if sys.argv[1] == "keep" else ""
results = {"note": note}

def probe(name):
    before = libc.mallinfo2()
    blocks = [libc.malloc(8 << 20) for _ in range(4)]
    for block in blocks:
        ctypes.memset(block, 1, 8 << 20)
    live = libc.mallinfo2()
    for block in blocks:
        libc.free(block)
    after = libc.mallinfo2()
    results[name] = {"mmapped": live.hblks - before.hblks, "kept_free_mib": (after.fordblks - before.fordblks) >> 20}

probe("main")
thread = threading.Thread(target=probe, args=("thread",))
thread.start()
thread.join()
print(json.dumps(results))
"""


def _probe(mode: str, env: dict[str, str] | None = None) -> dict:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    child_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=child_env,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_freed_blocks_stay_in_the_heap():
    kept = _probe("keep")
    assert kept["note"].startswith("glibc keeps freed memory"), kept["note"]
    for where in ("main", "thread"):
        assert kept[where]["mmapped"] == 0, kept  # from the heap, below the 32 MiB threshold
        assert kept[where]["kept_free_mib"] >= 31, kept  # and not trimmed once freed


def test_glibc_defaults_give_the_blocks_back():
    # The control: without the setting glibc gives the same blocks back to the OS (what
    # costs a training step its page faults), so the test above can fail. In the main
    # thread they are mmapped and unmapped; in the second, glibc has raised its threshold
    # to 8 MiB by then (the first frees move it), so they come from a heap that is
    # trimmed once they are freed.
    default = _probe("default")
    assert default["main"]["mmapped"] == 4, default
    for where in ("main", "thread"):
        assert default[where]["kept_free_mib"] < 8, default


def test_the_users_malloc_settings_win():
    for env, name in (({"MALLOC_MMAP_THRESHOLD_": "131072"}, "MALLOC_MMAP_THRESHOLD_"),
                      ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}, "glibc.malloc.trim_threshold")):
        result = _probe("keep", env)
        assert result["note"] == f"malloc left to the environment's {name}", result
        assert result["main"]["mmapped"] == 4, result  # the user's 128 KiB threshold (or glibc's) applies

