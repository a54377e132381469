"""Byte accounting of the tar shards the shard writer produces: the size a sample takes
before it is written (so a shard closes before ``max_size``), the final archive size,
and the sha256 of what is written, taken on the way to disk."""

from __future__ import annotations

import hashlib
import tarfile
from typing import Any, BinaryIO

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 20 blocks: tarfile pads the archive to a multiple of this
# An int, not 0.0: tarfile's (PAX) writer adds a 1 KiB extended header to every member
# whose mtime is a float.
TAR_MTIME = 0


def member_bytes(members: dict[str, Any]) -> int:
    """Bytes a webdataset sample takes in a tar: each member's header plus its data padded
    to 512-byte blocks."""
    size = 0
    for ext, data in members.items():
        if ext.startswith("__"):
            continue
        # The header webdataset's TarWriter writes for this member (see TAR_MTIME).
        info = tarfile.TarInfo(f"{members['__key__']}.{ext}")
        info.size = len(data)
        info.mtime = TAR_MTIME
        info.mode = 0o444
        info.uname = info.gname = "bigdata"
        header = len(info.tobuf(tarfile.DEFAULT_FORMAT, "utf-8", "surrogateescape"))
        size += header + -(-len(data) // BLOCK) * BLOCK
    return size


def archive_size(content: int) -> int:
    """Final size of a tar whose members take ``content`` bytes: end blocks + record padding."""
    return -(-(content + 2 * BLOCK) // RECORD) * RECORD


class HashingWriter:
    """File wrapper that hashes and counts what tarfile's stream mode writes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._f.write(data)
