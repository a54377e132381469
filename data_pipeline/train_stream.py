"""The training stream of one consumer, and how to resume it exactly.

A consumer's stream is a pure function of (seed, world size, DataLoader workers, the
manifest): per epoch, a read plan (``loader.plan_reads``), the plan's samples in reading
order, a buffer shuffle whose draws come from a generator seeded by (seed, epoch, rank,
worker), and an augmentation generator seeded per output sample by (seed, epoch, rank,
worker, position in the epoch). Nothing depends on what happened before, so the stream
can be restarted at any sample:

1. whole epochs before the resume point are skipped without reading a byte (their
   lengths follow from the manifest's sample counts);
2. inside the resume epoch the buffer shuffle is replayed on sample *indices* (the same
   draws, no I/O), which tells which samples sit in the buffer and how far the
   sequential reader had got;
3. the buffered samples are fetched by seeking to their byte offsets (the manifest's
   ``sample_offsets``), and sequential reading continues from the next sample's offset.

Without offsets (manifests written before they existed) a shard is read from its start
and the samples before the position are discarded: still exact, only slower.

``LoaderPosition`` is what a checkpoint stores: batches consumed per rank plus the
layout they were counted in. Exact resume needs the same layout; see
``batches_to_skip`` for the rule when it changed.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from data_pipeline.loader_io import ReadPlan, ShardReadError, ShardRef, plan_reads, read_shard


@dataclass(frozen=True)
class LoaderPosition:
    """Where a rank's training stream stood: ``batches`` consumed by the trainer, counted
    in the layout (world size, DataLoader workers, batch size, seed, manifest) they came from."""

    batches: int
    world_size: int
    num_workers: int
    batch_size: int
    seed: int
    manifest: str
    # Per DataLoader worker role of this rank: the stream position to restart at. Bad
    # samples left out under data.on_error=skip occupy positions too, so with skips only
    # these (not batches * batch_size) say where a stream stands. Empty: unknown.
    next_index: tuple[int, ...] = ()
    skipped: int = 0  # bad samples this rank left out so far

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["next_index"] = list(self.next_index)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoaderPosition:
        return cls(
            batches=int(data["batches"]),
            world_size=int(data["world_size"]),
            num_workers=int(data["num_workers"]),
            batch_size=int(data["batch_size"]),
            seed=int(data["seed"]),
            manifest=str(data["manifest"]),
            next_index=tuple(int(i) for i in data.get("next_index", ())),
            skipped=int(data.get("skipped", 0)),
        )


def batches_to_skip(saved: LoaderPosition, current: LoaderPosition) -> tuple[int, tuple[int, ...], bool]:
    """(batches each rank's new stream skips, per-worker stream positions to restart at
    (empty: derive them from the batches), whether the resume is exact).

    Same layout: exactly the saved count and positions. Changed layout (another world size, worker
    count, batch size or seed; the same manifest): the new layout's streams are
    different sequences, so no exact continuation exists; each rank skips as many
    batches as keep the global number of samples seen, which re-reads nothing in the
    common case of whole epochs but may repeat or skip up to a shuffle buffer per
    consumer inside the current epoch. A different manifest starts from the beginning.
    """
    if saved.manifest != current.manifest:
        return 0, (), False
    layout = ("world_size", "num_workers", "batch_size", "seed")
    if all(getattr(saved, k) == getattr(current, k) for k in layout):
        return saved.batches, saved.next_index, True
    samples = saved.batches * saved.batch_size * saved.world_size
    per_rank_batch = current.batch_size * current.world_size
    return samples // per_rank_batch, (), False


def worker_batches(batches: int, worker: int, num_workers: int) -> int:
    """How many of the first ``batches`` a DataLoader took from ``worker``: with an
    IterableDataset it asks its workers in turn, batch j from worker j % num_workers."""
    workers = max(1, num_workers)
    return 0 if batches <= worker else (batches - worker + workers - 1) // workers


def stream_start(
    role: int, num_workers: int, batch_size: int, start_batches: int, start_positions: Sequence[int] = ()
) -> int:
    """The stream position worker ``role`` restarts at: its saved position if known,
    else the samples of the batches the trainer took from it."""
    if start_positions:
        return start_positions[role]
    return worker_batches(start_batches, role, num_workers) * batch_size


class StreamTracker:
    """The trainer's side of exact resume: follows the (worker role, next position,
    skipped) that every training batch carries and turns it into ``LoaderPosition``s."""

    def __init__(self, layout: LoaderPosition, start_batches: int, start_positions: Sequence[int] = ()) -> None:
        self.layout = layout
        self.batches = start_batches
        workers = max(1, layout.num_workers)
        # Roles that produce no batch before the next checkpoint stay where they started.
        self.next_index = [
            stream_start(role, layout.num_workers, layout.batch_size, start_batches, start_positions)
            for role in range(workers)
        ]
        self.skipped_by_role = [0] * workers
        self.skipped_before = layout.skipped  # carried over from the resumed run

    def observe(self, batch: dict[str, Any]) -> int:
        """Record one consumed batch; returns how many bad samples were newly skipped."""
        self.batches += 1
        role, next_index, skipped = batch["stream"]
        self.next_index[role] = next_index
        new = skipped - self.skipped_by_role[role]
        self.skipped_by_role[role] = skipped
        return new

    @property
    def skipped(self) -> int:
        return self.skipped_before + sum(self.skipped_by_role)

    def position(self) -> LoaderPosition:
        return replace(self.layout, batches=self.batches, next_index=tuple(self.next_index), skipped=self.skipped)


# ------------------------------------------------------------------- index-level plan


def epoch_items(shards: Sequence[ShardRef], plan: ReadPlan) -> list[tuple[int, int]]:
    """(shard, sample-in-shard) of every sample the plan reads, in reading order."""
    items = []
    for shard in plan.shards:
        ref = shards[shard]
        for local in range(ref.num_samples):
            if (ref.first_index + local) % plan.modulo == plan.remainder:
                items.append((shard, local))
    return items


class BufferShuffle:
    """Shuffle through a buffer of ``size`` items: each push beyond the size pops a
    random item; ``drain`` empties the rest in random order. The same draws whatever the
    items are, which is what lets the index-level replay stand in for the real one."""

    def __init__(self, size: int, rng: np.random.Generator, buffer: list[Any] | None = None) -> None:
        self.size = max(1, size)
        self.rng = rng
        self.buffer = buffer if buffer is not None else []

    def push(self, item: Any) -> Any | None:
        self.buffer.append(item)
        if len(self.buffer) >= self.size:
            return self.buffer.pop(int(self.rng.integers(len(self.buffer))))
        return None

    def drain(self) -> list[Any]:
        order = self.rng.permutation(len(self.buffer))
        drained = [self.buffer[j] for j in order]
        self.buffer = []
        return drained


# --------------------------------------------------------------------------- reading


def _fetch(
    shards: Sequence[ShardRef], items: Sequence[tuple[int, int]], tolerate: bool
) -> dict[tuple[int, int], dict | ShardReadError]:
    """Random access: the raw samples of ``items``, one seek each (or one pass per shard
    without offsets). With ``tolerate`` an unreadable sample maps to its error."""
    fetched: dict[tuple[int, int], dict | ShardReadError] = {}
    for shard, group in itertools.groupby(sorted(items), key=lambda item: item[0]):
        wanted = sorted({local for _, local in group})
        ref = shards[shard]
        if ref.offsets:  # each sample on its own: one bad sample must not take its shard mates along
            for local in wanted:
                fetched[(shard, local)] = _fetch_one(ref, local, tolerate)
            continue
        try:
            for raw in read_shard(ref):
                local = raw["__index__"] - ref.first_index
                if local in wanted:
                    fetched[(shard, local)] = raw
        except ShardReadError as exn:
            if not tolerate:
                raise
            for local in wanted:
                fetched.setdefault((shard, local), exn)
    return fetched


def _fetch_one(ref: ShardRef, local: int, tolerate: bool) -> dict | ShardReadError:
    """Sample ``local`` of a shard with offsets, read alone from its offset."""
    try:
        return next(read_shard(ref, start=local, limit=1))
    except StopIteration:
        error = ShardReadError(f"shard {ref.path} ends before its sample {local}")
    except ShardReadError as exn:
        error = exn
    if not tolerate:
        raise error
    return error


def _read_from(
    shards: Sequence[ShardRef], items: Sequence[tuple[int, int]], start: int, tolerate: bool
) -> Iterator[tuple[tuple[int, int], dict | ShardReadError]]:
    """Sequentially read ``items[start:]`` (in reading order), seeking to the first. With
    ``tolerate`` the samples a broken shard cannot deliver come out as its error, so the
    stream keeps one entry per item (exact resume counts on that)."""
    remaining = items[start:]
    for shard, group in itertools.groupby(remaining, key=lambda item: item[0]):
        locals_ = [local for _, local in group]
        for local, raw in _read_shard_items(shards[shard], locals_, tolerate):
            yield (shard, local), raw


def _can_resync(ref: ShardRef, local: int) -> bool:
    """Whether reading can start again at sample ``local`` of a shard that failed before it:
    its offset is known and inside the file (a cut-off file has nothing more to give)."""
    if not ref.offsets or local >= ref.num_samples:
        return False
    try:
        return ref.offsets[local] < os.path.getsize(ref.path)
    except OSError:
        return False


def _read_shard_items(
    ref: ShardRef, locals_: Sequence[int], tolerate: bool
) -> Iterator[tuple[int, dict | ShardReadError]]:
    """(sample in shard, raw sample or its error) of the increasing ``locals_`` of one shard.

    A broken sample in the middle of a shard (a damaged tar header) costs only itself when
    the manifest has offsets: reading starts again at the next sample's offset. That also
    makes the sequential read agree with ``_fetch``'s per-sample seeks, which a resumed
    stream uses for its buffer: sample i reads here iff it reads alone from its offset."""
    wanted = set(locals_)
    begin = locals_[0]
    while True:
        failing = begin  # the sample the reader is inside when an error comes
        try:
            for raw in read_shard(ref, start=begin):
                local = raw["__index__"] - ref.first_index
                failing = local + 1
                if local in wanted:
                    yield local, raw
            return
        except ShardReadError as exn:
            if not tolerate:
                raise
            if failing < ref.num_samples and _can_resync(ref, failing + 1):
                if failing in wanted:
                    yield failing, exn
                begin = failing + 1
                continue
            for local in locals_:
                if local >= failing:
                    yield local, exn
            return


def consumer_stream(
    shards: Sequence[ShardRef],
    *,
    seed: int,
    rank: int,
    worker: int,
    consumer: int,
    num_consumers: int,
    shuffle_buffer: int,
    skip: int = 0,
    tolerate: bool = False,
) -> Iterator[tuple[dict | ShardReadError, int, int, int]]:
    """Infinite (raw sample, epoch, position in epoch, position in the stream) of one
    consumer, from stream position ``skip``. With ``tolerate`` an unreadable sample comes
    out as its ``ShardReadError`` in its place instead of raising."""
    sizes = [s.num_samples for s in shards]
    index = skip
    for epoch in itertools.count():
        plan = plan_reads(sizes, consumer, num_consumers, order_seed=(seed, epoch), allow_empty=False)
        items = epoch_items(shards, plan)
        if not items:  # would otherwise spin forever without yielding
            raise ShardReadError(f"rank {rank} worker {worker}: epoch {epoch} reads no samples from {plan}")
        if skip >= len(items):
            skip -= len(items)  # a whole epoch before the resume point: nothing to read
            continue
        shuffle = BufferShuffle(shuffle_buffer, np.random.default_rng([seed, epoch, rank, worker, 0]))
        position, inserted, pending = _replay(shuffle, len(items), skip)
        skip = 0
        if pending is None:  # still filling the buffer, or reading: restore the buffer's samples
            fetched = _fetch(shards, [items[i] for i in shuffle.buffer], tolerate)
            shuffle.buffer = [(items[i], fetched[items[i]]) for i in shuffle.buffer]
            for item_raw in _read_from(shards, items, inserted, tolerate):
                out = shuffle.push(item_raw)
                if out is not None:
                    yield out[1], epoch, position, index
                    position += 1
                    index += 1
            pending = shuffle.drain()
        else:  # resumed inside the final drain: fetch what is left of it
            fetched = _fetch(shards, [items[i] for i in pending], tolerate)
            pending = [(items[i], fetched[items[i]]) for i in pending]
        for _, raw in pending:
            yield raw, epoch, position, index
            position += 1
            index += 1


def _replay(shuffle: BufferShuffle, num_items: int, skip: int) -> tuple[int, int, list | None]:
    """Advance ``shuffle`` over item indices until ``skip`` items came out.

    Returns (position reached, items inserted, the rest of the drain order if the skip
    ends inside the final drain else None). On return ``shuffle.buffer`` holds the
    indices waiting in the buffer.
    """
    emitted = inserted = 0
    while emitted < skip and inserted < num_items:
        if shuffle.push(inserted) is not None:
            emitted += 1
        inserted += 1
    if emitted == skip:
        return emitted, inserted, None
    drained = shuffle.drain()
    return skip, num_items, drained[skip - emitted :]
