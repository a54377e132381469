"""ops.host_allocator: glibc or a preloaded jemalloc keeps what a step frees, unless the
user set glibc's thresholds.

mallopt settings are process-wide and cannot be undone, and jemalloc is preloaded only
when a process starts, so each case runs in a fresh interpreter. The glibc probe mallocs
four 8 MiB blocks, touches them and frees them, in the main thread and in a second thread
(Ray Train runs the training function in one), and reads glibc's own account (mallinfo2):
how many blocks were mmapped and how much freed memory the heap keeps. The jemalloc probe
does the same and reads the resident set (glibc's account no longer sees the blocks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ops import host_allocator
from ops.host_allocator import JEMALLOC_CONF, JEMALLOC_LIBRARY, jemalloc_installed, worker_allocator_env

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


JEMALLOC_PROBE = r"""
import ctypes, json, os
from ops.host_allocator import configure_process

note = configure_process()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20

before = resident_mib()
blocks = [libc.malloc(8 << 20) for _ in range(4)]
for block in blocks:
    ctypes.memset(block, 1, 8 << 20)
live = resident_mib() - before
for block in blocks:
    libc.free(block)
print(json.dumps({"note": note, "live_mib": live, "kept_mib": resident_mib() - before}))
"""
# .ci/run installs Debian's libjemalloc2, so in CI the jemalloc cases run (and fail
# without it); elsewhere they need it installed.
needs_jemalloc = pytest.mark.skipif(not jemalloc_installed() and os.environ.get("CI") != "true",
                                    reason=f"{JEMALLOC_LIBRARY} is not installed (apt-get install libjemalloc2)")


def _clean_env(**env: str) -> dict[str, str]:
    """This environment without any malloc setting or preload, and ``env`` on top."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    return {**clean, **env}


def _probe(mode: str, env: dict[str, str] | None = None, script: str = PROBE) -> dict:
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                         env=_clean_env(**(env or {})), check=True).stdout
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



@needs_jemalloc
def test_a_worker_started_with_jemalloc_keeps_freed_memory():
    env = worker_allocator_env("auto", environ={})
    assert env == {"LD_PRELOAD": JEMALLOC_LIBRARY, "MALLOC_CONF": JEMALLOC_CONF}
    kept = _probe("", env, JEMALLOC_PROBE)
    assert kept["note"] == f"jemalloc keeps freed memory for the next step (MALLOC_CONF={JEMALLOC_CONF})", kept
    assert kept["live_mib"] >= 31 and kept["kept_mib"] >= 31, kept
    # The control: jemalloc told to purge at once gives the blocks back, so the above can fail.
    purged = _probe("", {**env, "MALLOC_CONF": "dirty_decay_ms:0,muzzy_decay_ms:0"}, JEMALLOC_PROBE)
    assert purged["note"] == "jemalloc, with MALLOC_CONF=dirty_decay_ms:0,muzzy_decay_ms:0", purged
    assert purged["live_mib"] >= 31 and purged["kept_mib"] < 8, purged


@needs_jemalloc
def test_worker_allocator_env_follows_the_choice_and_the_users_settings():
    assert worker_allocator_env("glibc", environ={}) == {}
    assert worker_allocator_env("jemalloc", environ={})["LD_PRELOAD"] == JEMALLOC_LIBRARY
    # The user's own preloads stay, and their jemalloc settings replace segscale's.
    env = worker_allocator_env("auto", environ={"LD_PRELOAD": "libextra.so", "MALLOC_CONF": "narenas:1"})
    assert env == {"LD_PRELOAD": f"{JEMALLOC_LIBRARY}:libextra.so", "MALLOC_CONF": "narenas:1"}
    # glibc's thresholds set by the user mean glibc: nothing is preloaded.
    assert worker_allocator_env("auto", environ={"MALLOC_MMAP_THRESHOLD_": "131072"}) == {}
    with pytest.raises(ValueError, match="cluster.host_allocator: expected one of auto, jemalloc, glibc, got 'tcmalloc'"):
        worker_allocator_env("tcmalloc", environ={})


def test_jemalloc_missing_is_a_clear_error_or_glibc(monkeypatch):
    monkeypatch.setattr(host_allocator, "jemalloc_installed", lambda: False)
    assert worker_allocator_env("auto", environ={}) == {}  # auto: the worker sets glibc up itself
    with pytest.raises(ValueError, match=r"'jemalloc', but libjemalloc\.so\.2 is not installed here \(Debian"):
        worker_allocator_env("jemalloc", environ={})
    # A worker asked for jemalloc that started without it (a node without the library).
    script = "from ops.host_allocator import configure_process; configure_process(require_jemalloc=True)"
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_clean_env())
    assert child.returncode != 0
    assert "RuntimeError: cluster.host_allocator: 'jemalloc', but libjemalloc.so.2 is not loaded" in child.stderr


def test_a_worker_whose_preload_failed_says_so_and_keeps_memory_with_glibc():
    # A node without the library: ld.so warns and starts the process on glibc. (Here the
    # library may be installed, so the probe is told it is not loaded.)
    script = ("import ops.host_allocator as h; h.jemalloc_loaded = lambda: False; "
              "print(h.preload_failed()); print(h.configure_process())")
    lines = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env=_clean_env(LD_PRELOAD=JEMALLOC_LIBRARY)).stdout.splitlines()
    assert lines[0] == "True"
    assert lines[1].startswith("glibc keeps freed memory for the next step"), lines
    assert lines[1].endswith(f"({JEMALLOC_LIBRARY} could not be preloaded here)"), lines


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI machines only")
def test_ci_has_jemalloc():
    assert jemalloc_installed(), ".ci/run installs Debian's libjemalloc2; the jemalloc tests need it"
