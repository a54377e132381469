"""Write a labelled dataset into webdataset tar shards plus a manifest.

Layout of ``out_dir`` for one split (train and val may share a folder)::

    train-000000.tar  train-000001.tar  ...  train-manifest.json

Each shard holds at most ``max_count`` samples, sample ``i`` going to shard
``i // max_count`` whatever the number of workers, so re-running with the same source
gives byte-identical shards (tar mtimes are pinned to 0). Members of sample ``i``
(key ``{split}_{i:08d}``; keys must not contain dots, webdataset splits the member name
at the first dot):

* the members ``sample_encode.encode_sample`` writes: the image (``.png``, or the
  original ``.jpg``), ``.seg.png``, ``.pan.png`` and ``.json`` (with the source file's stem).

Shard limits: a shard is closed when adding the next sample would take it past
``max_count`` samples or past ``max_size`` bytes (the final tar size, end-of-archive
padding included); a sample bigger than ``max_size`` on its own gets a shard of its own.
Samples are encoded in order (in parallel with ``workers > 1``) and assigned to shards
sequentially, so the layout depends only on the source and the limits.

Every shard is written to a temp file in ``out_dir`` and renamed when complete, and the
manifest is written last (also atomically), so a crash never leaves a manifest that
names a partial shard. The manifest records, per shard, the byte offset of each
sample's first tar header (``sample_offsets``) so a reader can seek to a sample.

Resuming and existing files (``shard_state``): after each finished shard
``{split}-shard-state.json`` is rewritten atomically with a fingerprint of the job (format,
source options, split, sample count, classes, limits), the finished shards' infos and the
shards of the dataset being replaced. A re-run with the same fingerprint checks the
finished shards' sizes and sha256, keeps the good leading ones and continues with the next
sample, which gives the same bytes as an uninterrupted run; a different fingerprint is an
error (``ShardStateError``) unless ``overwrite=True``. The job deletes only shard files a
manifest or state of its split listed, never an unlisted ``{split}-NNNNNN.tar`` (which,
without ``overwrite``, stops it from starting). The state file is removed once the
manifest is written. Hidden temp files left by a killed run (``.{split}-....tmp``) are
removed at the start. Ctrl-C raises ``ShardingInterrupted`` saying what is finished;
pool workers ignore SIGINT so that only the main process reports it.

``out_dir`` may also be ``pipe:CMD`` with ``{name}`` in CMD (e.g. ``pipe:aws s3 cp -
s3://bucket/ade/{name}``): each shard is staged in a local folder (``staging`` or a
temp folder), then its bytes are piped to CMD with ``{name}`` replaced by the shard's
file name, and the manifest last. Resuming is local-only: a piped job starts over.

A dataset format plugs in as a ``Source``: its metadata plus a picklable
``load(index)`` function (random access lets ``workers > 1`` encode in parallel while
keeping the order).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from data_pipeline.manifest import Manifest, ShardInfo, write_manifest
from data_pipeline.sample_encode import (  # noqa: F401  (decode/encode_panoptic: re-exported for callers)
    LabeledSample,
    decode_panoptic,
    encode_panoptic,
    encode_sample,
)
from data_pipeline.shard_state import (  # noqa: F401  (ShardStateError, names: re-exported for callers)
    Plan,
    ShardingInterrupted,
    ShardStateError,
    finish_folder,
    manifest_name,
    plan_folder,
    plural,
    remove_temp_files,
    shard_name,
    state_json,
    state_name,
)
from data_pipeline.tar_bytes import TAR_MTIME, HashingWriter, archive_size, member_bytes
from ops.atomic_file import atomic_write, write_json_atomic

IGNORE_INDEX = 255
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
PIPE_PREFIX = "pipe:"
# Bump when the bytes written for the same samples change: a state file from another
# layout must not be resumed into a mixed dataset. 2: readers' samples carry "source".
WRITER_LAYOUT = 2


class PipeError(OSError):
    """A ``pipe:`` output command failed (message names the file and the exit code)."""


@dataclass(frozen=True)
class Source:
    """A dataset split ready to shard: metadata plus random access to its samples."""

    format: str  # reader name, recorded in the manifest
    classes: list[str]
    num_samples: int
    # Must be picklable (a top-level function or functools.partial of one) for workers > 1.
    load: Callable[[int], LabeledSample]
    thing_classes: list[int] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)  # the dataset's own id per class, if not the index
    options: dict[str, Any] = field(default_factory=dict)  # provenance -> manifest "source"


def check_split(split: str) -> None:
    """Raise ValueError unless ``split`` is usable in keys and shard names (no dots)."""
    if not _SPLIT_RE.match(split):
        raise ValueError(
            f"split must match {_SPLIT_RE.pattern} (it prefixes keys and shard names), got {split!r}"
        )


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:08d}"


@dataclass
class _Encoded:
    members: dict[str, Any]  # webdataset sample dict
    size: int  # bytes it takes in a tar: headers + data padded to 512-byte blocks


def _load_and_encode(load: Callable[[int], LabeledSample], split: str, index: int) -> _Encoded:
    members = encode_sample(load(index), sample_key(split, index))
    return _Encoded(members, member_bytes(members))


def _encoded_samples(source: Source, split: str, workers: int, start: int = 0) -> Iterator[_Encoded]:
    encode = partial(_load_and_encode, source.load, split)
    indices = range(start, source.num_samples)
    if workers <= 1:
        yield from map(encode, indices)
        return
    # imap keeps the order; chunks amortise the inter-process overhead of tiny samples.
    chunksize = max(1, min(64, len(indices) // (workers * 4)))
    with multiprocessing.get_context().Pool(workers, initializer=_ignore_sigint) as pool:
        yield from pool.imap(encode, indices, chunksize=chunksize)


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the main process, which stops them and says what is
    finished; else each worker prints its own KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _created_by() -> str:
    try:
        return f"segscale {metadata.version('segscale')}"
    except metadata.PackageNotFoundError:
        return "segscale (not installed)"


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"500M"`` -> bytes. Suffixes K, M, G, T are powers of 1024 (``MB``/``MiB`` too)."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: expected bytes or a number with K, M, G or T (e.g. 500M, 1G)"
        )
    number, unit = match.groups()
    size = int(float(number) * 1024 ** "_KMGT".index(unit.upper() or "_"))
    if size < 1:
        raise ValueError(f"size must be >= 1 byte, got {text!r}")
    return size


def _fingerprint(source: Source, split: str, max_count: int, max_size: int | None) -> dict[str, Any]:
    """What must match for a re-run to continue an interrupted one (JSON-normalised)."""
    fingerprint = {
        "format": source.format,
        "split": split,
        "num_samples": source.num_samples,
        "classes": list(source.classes),
        "thing_classes": list(source.thing_classes),
        # Only where a reader has them: older fingerprints stay valid for the rest.
        **({"category_ids": list(source.category_ids)} if source.category_ids else {}),
        "source": dict(source.options),
        "max_count": max_count,
        "max_size": max_size,
        "layout": WRITER_LAYOUT,
    }
    return json.loads(json.dumps(fingerprint, sort_keys=True))


def _pipe_file(command: str, path: Path) -> None:
    """Stream ``path`` into ``command`` (``{name}`` -> the file name); PipeError on failure."""
    cmd = command.replace("{name}", path.name)
    with open(path, "rb") as f:
        try:
            code = subprocess.run(cmd, shell=True, stdin=f, check=False).returncode
        except OSError as exn:
            raise PipeError(f"pipe command for {path.name} could not run: {exn}: {cmd}") from None
    if code != 0:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise PipeError(f"pipe command for {path.name} {how}: {cmd}")


def write_shards(
    source: Source,
    out_dir: str | os.PathLike[str],
    split: str,
    max_count: int = 64,
    workers: int = 1,
    progress: bool | None = None,
    max_size: int | None = None,
    overwrite: bool = False,
    staging: str | os.PathLike[str] | None = None,
    keep_finished: bool = False,
) -> Manifest:
    """Shard ``source`` into ``out_dir`` and write ``{split}-manifest.json`` last.

    Replaces a previous complete sharding of the same split in ``out_dir`` (unless
    ``keep_finished``: then that is a ``ShardStateError``, what the CLI does without
    ``--overwrite``): its manifest is removed first (so a crash leaves no manifest rather
    than a stale one) and shards it listed beyond the new count are deleted at the end.
    An interrupted sharding (a ``{split}-shard-state.json``) with the same arguments is
    resumed; with other arguments it raises ``ShardStateError`` unless ``overwrite``, as
    does a ``{split}-NNNNNN.tar`` that no manifest or state lists (see ``shard_state``).
    ``out_dir`` may be ``pipe:CMD`` (see the module docstring); ``staging`` is then where
    shards are built. ``progress=None`` shows a bar only on a TTY. Ctrl-C raises
    ``ShardingInterrupted`` (a KeyboardInterrupt) whose message says what is finished.
    """
    check_split(split)
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    if max_size is not None and max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if source.num_samples < 1:
        raise ValueError(f"nothing to shard: the {source.format} source has {source.num_samples} samples")

    out_text = os.fspath(out_dir)
    command: str | None = None
    made_staging = False
    if out_text.startswith(PIPE_PREFIX):
        command = out_text[len(PIPE_PREFIX) :].strip()
        if "{name}" not in command:
            raise ValueError(f"--out {out_text!r}: a pipe: command must contain {{name}} (the file name)")
        if staging is None:
            out = Path(tempfile.mkdtemp(prefix=f"segscale-{split}-"))
            made_staging = True
        else:
            out = Path(staging).resolve()
    else:
        out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(source, split, max_count, max_size)
    if command is None:
        plan = plan_folder(out, split, fingerprint, overwrite, keep_finished, source.num_samples)
    else:
        plan = Plan()  # a staging folder: nothing to resume or protect (see the module docstring)
    job = _Job(out, split, fingerprint, plan, command)
    try:
        return _write_shards(source, job, max_count, max_size, workers, progress)
    finally:
        if made_staging:
            shutil.rmtree(out, ignore_errors=True)


@dataclass
class _Job:
    out: Path
    split: str
    fingerprint: dict[str, Any]
    plan: Plan
    command: str | None  # pipe: command, None for a local folder
    recorded: list[ShardInfo] = field(default_factory=list)  # listed in the state file, or piped

    @property
    def state_path(self) -> Path:
        return self.out / state_name(self.split)

    def record(self, shards: list[ShardInfo]) -> None:
        """After each finished shard: the state file (local) or the shard piped away."""
        if self.command is None:
            write_json_atomic(self.state_path, state_json(self.fingerprint, shards, self.plan.replaced))
        else:
            path = self.out / shards[-1].name
            _pipe_file(self.command, path)
            path.unlink()
        self.recorded = list(shards)

    def interrupted(self, total: int) -> ShardingInterrupted:
        """The exception for Ctrl-C, counting the shards a re-run will find recorded: Ctrl-C may
        land after the state file was replaced but before ``record`` returned, so read it back."""
        counts = [s.num_samples for s in self.recorded]
        if self.command is None:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                recorded = json.loads(self.state_path.read_text())["shards"]
                counts = [int(s["num_samples"]) for s in recorded]
        done = f"{plural(len(counts), 'shard')} ({sum(counts)} of {total} samples)"
        if self.command is not None:
            return ShardingInterrupted(
                f"interrupted: {done} of split {self.split} were piped; a pipe: output cannot resume, "
                "run the same command again to start over"
            )
        return ShardingInterrupted(
            f"interrupted: {done} of split {self.split} are finished in {self.out}; "
            "run the same command again to resume"
        )


def _write_shards(
    source: Source, job: _Job, max_count: int, max_size: int | None, workers: int, progress: bool | None
) -> Manifest:
    out, split = job.out, job.split
    manifest_path = out / manifest_name(split)
    remove_temp_files(out, split)
    shards = list(job.plan.shards)
    job.recorded = list(shards)
    if job.command is None:
        # Recorded before the old manifest goes: a run killed from here on still knows on
        # its re-run which shard files it replaces (and may delete).
        write_json_atomic(job.state_path, state_json(job.fingerprint, shards, job.plan.replaced))
    manifest_path.unlink(missing_ok=True)

    def fits(count: int, content: int, sample: _Encoded) -> bool:
        if count == 0:
            return True  # a sample larger than max_size gets a shard of its own
        if count + 1 > max_count:
            return False
        return max_size is None or archive_size(content + sample.size) <= max_size

    start = sum(s.num_samples for s in shards)
    show = sys.stderr.isatty() if progress is None else progress
    try:
        with tqdm(
            total=source.num_samples, initial=start, desc=f"shard {split}", unit="sample", disable=not show
        ) as bar:
            samples = _encoded_samples(source, split, workers, start)
            try:
                _fill_shards(samples, job, shards, fits, bar)
            finally:
                samples.close()  # stops the worker pool now, also on an error
    except ShardingInterrupted:
        raise
    except KeyboardInterrupt:
        raise job.interrupted(source.num_samples) from None

    if job.command is None:
        finish_folder(out, job.plan, shards)
    manifest = Manifest(
        format=source.format,
        split=split,
        classes=list(source.classes),
        thing_classes=list(source.thing_classes),
        category_ids=list(source.category_ids),
        ignore_index=IGNORE_INDEX,
        num_samples=source.num_samples,
        shards=shards,
        created_by=_created_by(),
        source=dict(source.options),
    )
    write_manifest(manifest_path, manifest)
    if job.command is None:
        job.state_path.unlink(missing_ok=True)
    else:
        _pipe_file(job.command, manifest_path)
        manifest_path.unlink()
    return manifest


def _fill_shards(
    samples: Iterator[_Encoded],
    job: _Job,
    shards: list[ShardInfo],
    fits: Callable[[int, int, _Encoded], bool],
    bar: tqdm,
) -> None:
    """Write shards from ``samples`` in order, appending their infos to ``shards``."""
    upcoming = next(samples, None)
    while upcoming is not None:
        path = job.out / shard_name(job.split, len(shards))
        offsets: list[int] = []
        content = 0
        with atomic_write(path, "wb") as f:
            hashing = HashingWriter(f)
            # mtime=0 and fixed owner: identical input gives a byte-identical shard.
            with wds.TarWriter(hashing, encoder=False, mtime=TAR_MTIME) as writer:
                while upcoming is not None and fits(len(offsets), content, upcoming):
                    # TarFile.offset: where the next member's header starts in the tar.
                    offsets.append(writer.tarstream.offset)
                    writer.write(upcoming.members)
                    content += upcoming.size
                    bar.update(1)
                    upcoming = next(samples, None)
        info = ShardInfo(
            name=path.name,
            num_samples=len(offsets),
            bytes=hashing.bytes,
            sha256=hashing.sha256.hexdigest(),
            sample_offsets=offsets,
        )
        shards.append(info)
        job.record(shards)
