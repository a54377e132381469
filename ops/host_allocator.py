"""Host memory allocator of processes that run models on the CPU (training workers,
``eval`` and ``predict``).

glibc gives large freed blocks back to the OS: a block above its mmap threshold is
unmapped when freed, and free memory at the top of a heap is trimmed once it exceeds the
trim threshold. A training step frees and allocates the same activations, gradients and
weight casts every step, so the next step takes a page fault on every page of them again,
and the kernel zeroes each one. On the 2-core machines this project is measured on,
MaskFormer Swin-T at 256x256 (batch 2) took ~40,000 minor faults a step in bf16, and its
steps were 9 % (bf16) and 15 % (fp32) slower than with the settings below (benchmarks/
RESULTS.md, "MaskFormer vs Hugging Face transformers", seventeenth session).

Two ways to keep what a step frees for the next one, as a GPU's caching allocator does:

- **jemalloc** (Debian's ``libjemalloc2``), preloaded into a CPU worker when it starts
  (``worker_allocator_env``: ``LD_PRELOAD``, which only works at process start) and told
  never to purge freed pages (``JEMALLOC_CONF``). Its size classes fragment less than
  glibc's heap, whose holes between long-lived small blocks held 400 MiB of freed
  activations in the checkpointed Swin-L-depth run: there jemalloc's peak resident set
  was 0.48x the uncheckpointed one against glibc's 0.55x, at the same step time
  (benchmarks/RESULTS.md, "Activation checkpointing", nineteenth session).
- **glibc** with ``keep_freed_memory``: a fixed mmap threshold at glibc's maximum (32 MiB
  on 64-bit; fixing it also stops glibc from moving it) and a trim threshold of 2 GiB.
  Tensors above 32 MiB are still their own mappings (glibc allows no higher threshold).

``cluster.host_allocator`` picks: ``auto`` (jemalloc where its library is installed,
else glibc), ``jemalloc`` (an error where it is not) or ``glibc``. Either way the peak is
what the step needs; what changes is that the process no longer shrinks between steps.
A user who sets glibc's thresholds in the environment gets glibc with those settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit; higher is refused
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int

# glibc's settings by which a user chooses its behaviour themselves (README "Troubleshooting":
# MALLOC_MMAP_THRESHOLD_ to make a CPU worker's memory follow its live tensors), each set
# either as GLIBC_TUNABLES' glibc.malloc.<name> or as its variable MALLOC_<NAME>_.
USER_TUNABLES = ("mmap_threshold", "trim_threshold", "top_pad", "mmap_max")
MALLOC_VARIABLES = tuple(f"MALLOC_{name.upper()}_" for name in USER_TUNABLES)
# Every variable that carries a user's malloc settings: glibc's, and jemalloc's MALLOC_CONF
# (which replaces JEMALLOC_CONF). Allocators read them when a process starts, so a worker
# must be started with them (launcher/environment.USER_ENV_VARS forwards them).
MALLOC_ENV_VARS = (*MALLOC_VARIABLES, "GLIBC_TUNABLES", "MALLOC_CONF")

HOST_ALLOCATORS = ("auto", "jemalloc", "glibc")
# Preloaded by name, so that ld.so finds it in each node's own library path.
JEMALLOC_LIBRARY = "libjemalloc.so.2"
# Freed pages are never purged ("decay"): with jemalloc's default of 10 s they went back to
# the OS between two 10 s steps, and the checkpointed step was 27-38 % slower than glibc's
# (tenth session); never purging made it as fast as glibc's.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def _glibc() -> ctypes.CDLL | None:
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    if not version or not version.startswith("glibc"):
        return None
    return ctypes.CDLL(None)  # the C library the interpreter is linked against


def user_malloc_settings(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The environment's glibc malloc settings, which take precedence over segscale's."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    named = [name for name in MALLOC_VARIABLES if name in environ]
    return named + [f"glibc.malloc.{name}" for name in USER_TUNABLES if f"glibc.malloc.{name}" in tunables]


def jemalloc_installed() -> bool:
    """Whether ld.so can find ``JEMALLOC_LIBRARY`` on this machine."""
    return ctypes.util.find_library("jemalloc") == JEMALLOC_LIBRARY


def jemalloc_loaded() -> bool:
    """Whether this process runs with jemalloc (preloaded: it is mapped)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libjemalloc" in line for line in maps)
    except OSError:
        return False


def worker_allocator_env(allocator: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables a CPU worker must start with to run on ``allocator`` (one of
    ``HOST_ALLOCATORS``), for a driver to put in its workers' runtime env: jemalloc's
    preload and settings, or nothing (glibc is set up in the worker, by
    ``configure_process``). Nothing either where ``environ`` sets glibc's thresholds.
    Raises ValueError for ``jemalloc`` where the library is not installed."""
    if allocator not in HOST_ALLOCATORS:
        raise ValueError(f"cluster.host_allocator: expected one of {', '.join(HOST_ALLOCATORS)}, got {allocator!r}")
    if allocator == "glibc" or user_malloc_settings(environ):
        return {}
    if not jemalloc_installed():
        if allocator == "jemalloc":
            raise ValueError(f"cluster.host_allocator: 'jemalloc', but {JEMALLOC_LIBRARY} is not installed here "
                             "(Debian/Ubuntu: apt-get install libjemalloc2; or set it to 'auto' or 'glibc')")
        return {}
    preload = environ.get("LD_PRELOAD", "")
    return {"LD_PRELOAD": f"{JEMALLOC_LIBRARY}:{preload}" if preload else JEMALLOC_LIBRARY,
            "MALLOC_CONF": environ.get("MALLOC_CONF", JEMALLOC_CONF)}


def keep_freed_memory() -> str:
    """Sets glibc to keep freed memory for re-use (see the module docstring) and says what
    it did, in a phrase for the worker's log. Does nothing where the C library is not glibc
    or where the user set glibc's thresholds in the environment."""
    libc = _glibc()
    if libc is None:
        return "not glibc: malloc left as it is"
    named = user_malloc_settings()
    if named:
        return f"malloc left to the environment's {', '.join(named)}"
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "glibc refused mallopt: malloc left as it is"
    return (f"glibc keeps freed memory for the next step (mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
            f"trim threshold {(TRIM_THRESHOLD + 1) >> 30} GiB)")


def configure_process(require_jemalloc: bool = False) -> str:
    """In a process that runs a model on the CPU, before the model exists: jemalloc if it
    was preloaded (``worker_allocator_env``), else glibc keeps freed memory. Returns what
    it found or did, in a phrase for the log. ``require_jemalloc`` (``host_allocator:
    jemalloc`` on a worker) makes a process that started without it an error, e.g. a node
    where the library is missing (ld.so then only warns and starts the process anyway)."""
    if jemalloc_loaded():
        conf = os.environ.get("MALLOC_CONF")
        return (f"jemalloc keeps freed memory for the next step (MALLOC_CONF={conf})" if conf == JEMALLOC_CONF
                else f"jemalloc, with {f'MALLOC_CONF={conf}' if conf else 'its defaults'}")
    if require_jemalloc:
        raise RuntimeError(f"cluster.host_allocator: 'jemalloc', but {JEMALLOC_LIBRARY} is not loaded in this "
                           f"process on {os.uname().nodename} (Debian/Ubuntu: apt-get install libjemalloc2 on "
                           "every node; or set it to 'auto' or 'glibc')")
    note = keep_freed_memory()
    if preload_failed():
        note += f" ({JEMALLOC_LIBRARY} could not be preloaded here)"
    return note


def preload_failed() -> bool:
    """Whether this process was to start with jemalloc and did not (ld.so only warns)."""
    return JEMALLOC_LIBRARY in os.environ.get("LD_PRELOAD", "") and not jemalloc_loaded()
