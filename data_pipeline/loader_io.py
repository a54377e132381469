"""Reading shards: which consumer reads what (``plan_reads``) and the tar reader with
seeking (``read_shard``), shared by the training stream and the eval loader."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn

import numpy as np

from data_pipeline.tar_reader import tar_samples


class ShardReadError(RuntimeError):
    """A shard is missing, corrupt or disagrees with its manifest (message names the shard)."""


# ------------------------------------------------------------------------ read planning


@dataclass(frozen=True)
class ShardRef:
    path: str
    num_samples: int
    first_index: int  # global index (manifest order) of the shard's first sample
    # Byte offset of each sample's first tar header (manifest ``sample_offsets``); empty
    # when the manifest predates them (seeking then reads from the shard's start).
    offsets: tuple[int, ...] = ()


@dataclass(frozen=True)
class ReadPlan:
    """What one consumer reads in one epoch."""

    shards: tuple[int, ...]  # indices into the shard list, in reading order
    modulo: int = 1  # keep samples whose global index % modulo == remainder
    remainder: int = 0


def plan_reads(
    shard_sizes: Sequence[int],
    consumer: int,
    num_consumers: int,
    order_seed: Sequence[int] | None,
    allow_empty: bool,
) -> ReadPlan:
    """Assign shards (or, if too few, sample indices) to ``consumer`` of ``num_consumers``.

    ``order_seed=None`` keeps the manifest order (evaluation). ``allow_empty=False``
    (training) wraps consumers around when there are fewer samples than consumers.
    """
    if not 0 <= consumer < num_consumers:
        raise ValueError(f"consumer {consumer} out of range for {num_consumers} consumers")
    num_shards = len(shard_sizes)
    order = list(range(num_shards))
    if order_seed is not None:
        order = [int(i) for i in np.random.default_rng(list(order_seed)).permutation(num_shards)]
    if num_shards >= num_consumers:
        return ReadPlan(tuple(order[consumer::num_consumers]))
    total = sum(shard_sizes)
    modulo = num_consumers if allow_empty else max(1, min(num_consumers, total))
    return ReadPlan(tuple(order), modulo, consumer % modulo)


# ---------------------------------------------------------------------------- reading


def _raise_shard_error(path: str, exn: Exception) -> NoReturn:
    if isinstance(exn, OSError) and exn.strerror:
        detail = exn.strerror  # e.g. "No such file or directory" rather than errno 2
    else:
        detail = str(exn.args[0]) if exn.args else ""
    raise ShardReadError(f"corrupt or unreadable shard {path}: {type(exn).__name__}: {detail}") from exn


def _tar_samples(stream: Any, url: str, handler: Any) -> Iterator[dict[str, Any]]:
    """webdataset's samples of an open tar stream (``tar_reader``); format errors go to ``handler``."""
    try:
        yield from tar_samples(stream, url)
    except (ValueError, OSError) as exn:  # TarFormatError is a ValueError
        handler(exn)


def read_shard(ref: ShardRef, start: int = 0, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (member bytes by extension, ``__key__``, ``__url__``, ``__index__``)
    from sample ``start`` on (a seek when the shard's offsets are known), at most ``limit``.

    Reading to the end checks the count against the manifest's.
    """
    handler = partial(_raise_shard_error, ref.path)
    try:
        stream = open(ref.path, "rb")
    except OSError as exn:
        _raise_shard_error(ref.path, exn)
    with stream:
        local = 0
        if start and ref.offsets:
            size = os.fstat(stream.fileno()).st_size
            if ref.offsets[start] >= size:  # else it would read as "holds {start} samples"
                raise ShardReadError(f"shard {ref.path} ends at byte {size}, before its sample {start} "
                                     f"(at byte {ref.offsets[start]} by the manifest): truncated")
            stream.seek(ref.offsets[start])
            local = start
        produced = 0
        for sample in _tar_samples(stream, ref.path, handler):
            if local >= start:
                sample["__index__"] = ref.first_index + local
                yield sample
                produced += 1
                if limit is not None and produced >= limit:
                    return
            local += 1
        if local != ref.num_samples:
            raise ShardReadError(f"shard {ref.path} holds {local} samples, its manifest says {ref.num_samples}")
