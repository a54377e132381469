"""Build-on-first-use C kernels for the CPU (``ops/*.c``), loaded with ctypes.

Why not ``torch.utils.cpp_extension``: these kernels take raw fp32 pointers and need no
torch headers, and a plain C file builds in about a second where an extension that
includes ``torch/extension.h`` takes a minute on a 2-core machine — on every worker of a
fresh node, and in CI on every clean clone.

The shared library is built with the system's C compiler (``$CC``, else ``cc``) for the
CPU it runs on (``-march=native``) and cached under ``$SEGSCALE_NATIVE_DIR`` (default
``~/.cache/segscale/native``), keyed by the source, the flags and the CPU's feature list,
so a cache shared between different machines never hands one a library built for
another. Concurrent builds (several workers on one node) each write a private file and
rename it into place. It links OpenMP as ``libgomp.so.1``: torch's CPU wheels load their
own copy under that name first, so the kernels share torch's thread pool rather than
starting a second one that would compete with it for the cores.

Without a compiler, or with ``SEGSCALE_NATIVE_OPS=0``, :func:`load` returns ``None``
(with one warning naming the reason where a build failed; :func:`why_unavailable` keeps
it) and callers use their PyTorch path. Any other value of ``SEGSCALE_NATIVE_OPS`` than
0 or 1 is an error.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")


def _cpu_features() -> str:
    """The CPU's model and feature flags (Linux), so a cached build matches the machine."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    lines = [line for line in text.splitlines() if line.startswith(("flags", "model name", "Features"))]
    return "\n".join(sorted(set(lines)))


def cache_dir() -> Path:
    return Path(os.environ.get("SEGSCALE_NATIVE_DIR") or Path.home() / ".cache" / "segscale" / "native")


def _build(source: Path, compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".so")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(source), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# Why ``load`` returned None, by library name (``launcher build-ops`` prints it).
_UNAVAILABLE: dict[str, str] = {}


def enabled() -> bool:
    """``SEGSCALE_NATIVE_OPS``: unset or 1 builds and uses the kernels, 0 switches them off.
    Anything else is refused rather than read as "on" (``off``, ``false`` would otherwise
    leave the kernels running while the user thinks they are off)."""
    setting = os.environ.get("SEGSCALE_NATIVE_OPS", "1").strip()
    if setting not in ("0", "1"):
        raise ValueError(f"SEGSCALE_NATIVE_OPS must be 0 (PyTorch path) or 1 (C kernels), got {setting!r}")
    return setting == "1"


def why_unavailable(name: str) -> str | None:
    """The reason the last ``load(name)`` returned None (None if it loaded or never ran)."""
    return _UNAVAILABLE.get(name)


def _unavailable(name: str, reason: str, warn: bool = True) -> None:
    _UNAVAILABLE[name] = reason
    if warn:
        warnings.warn(f"segscale: {reason}; using the PyTorch path", stacklevel=3)


@cache
def load(name: str) -> ctypes.CDLL | None:
    """The library built from ``ops/<name>.c``, or ``None`` where it cannot be had."""
    _UNAVAILABLE.pop(name, None)
    if not enabled():
        _unavailable(name, "switched off by SEGSCALE_NATIVE_OPS=0", warn=False)
        return None
    source = Path(__file__).with_name(f"{name}.c")
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        _unavailable(name, f"no C compiler ({os.environ.get('CC', 'cc')}) for ops/{name}.c")
        return None
    key = hashlib.sha256(
        b"\0".join([source.read_bytes(), " ".join(FLAGS).encode(), compiler.encode(), _cpu_features().encode()])
    ).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    try:
        if not target.exists():
            _build(source, compiler, target)
        return ctypes.CDLL(str(target))
    except subprocess.CalledProcessError as error:
        reason = (error.stderr or "").strip().splitlines()[-1:] or [f"exit {error.returncode}"]
        _unavailable(name, f"building ops/{name}.c with {compiler} failed ({reason[0]})")
    except OSError as error:
        _unavailable(name, f"ops/{name}.c unavailable ({error})")
    return None
