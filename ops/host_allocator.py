"""glibc malloc settings for processes that run models on the CPU (training workers,
``eval`` and ``predict``).

glibc gives large freed blocks back to the OS: a block above its mmap threshold is
unmapped when freed, and free memory at the top of a heap is trimmed once it exceeds the
trim threshold. A training step frees and allocates the same activations, gradients and
weight casts every step, so the next step takes a page fault on every page of them again,
and the kernel zeroes each one. On the 2-core machines this project is measured on,
MaskFormer Swin-T at 256x256 (batch 2) took ~40,000 minor faults a step in bf16, and its
steps were 9 % (bf16) and 15 % (fp32) slower than with the settings below (benchmarks/
RESULTS.md, "MaskFormer vs Hugging Face transformers", seventeenth session).

``keep_freed_memory`` makes glibc keep what a step frees for the next one, as a GPU's
caching allocator does: a fixed mmap threshold at glibc's maximum (32 MiB on 64-bit;
fixing it also stops glibc from moving it) and a trim threshold of 2 GiB. The step re-uses
what it freed, so the peak resident memory is unchanged; what changes is that the
process no longer shrinks between steps. Tensors above 32 MiB are still their own
mappings (glibc allows no higher threshold), as with glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os

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
# Every variable that carries them: glibc reads these when a process starts, so a worker
# must be started with them (launcher/environment.USER_ENV_VARS forwards them).
MALLOC_ENV_VARS = (*MALLOC_VARIABLES, "GLIBC_TUNABLES")


def _glibc() -> ctypes.CDLL | None:
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    if not version or not version.startswith("glibc"):
        return None
    return ctypes.CDLL(None)  # the C library the interpreter is linked against


def user_malloc_settings() -> list[str]:
    """The environment's malloc settings that ``keep_freed_memory`` leaves in charge."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    named = [name for name in MALLOC_VARIABLES if name in os.environ]
    return named + [f"glibc.malloc.{name}" for name in USER_TUNABLES if f"glibc.malloc.{name}" in tunables]


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
