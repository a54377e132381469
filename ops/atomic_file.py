"""Atomic file publication: readers see the old file or the new one, never half of one.

Dataset shards and manifests, checkpoint metadata and Prometheus target files are all
read by other processes (other ranks, Prometheus, a resumed run) while they may be
rewritten. Writing to a temp file in the same folder, fsyncing it and renaming it over
the target makes each publication atomic on POSIX file systems; a crash leaves at most
a hidden temp file, which is removed when the error is seen in-process.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

# mkstemp creates files 0600; published files are meant to be read by other users
# (shared dataset folders, a Prometheus server running as its own user).
PUBLISHED_FILE_MODE = 0o644


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on a clean exit fsync it and rename it to ``path``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, PUBLISHED_FILE_MODE)
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    with atomic_write(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")
