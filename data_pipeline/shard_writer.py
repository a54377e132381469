"""Write a labelled dataset into webdataset tar shards plus a manifest.

Layout of ``out_dir`` for one split (train and val may share a folder)::

    train-000000.tar  train-000001.tar  ...  train-manifest.json

Each shard holds at most ``max_count`` samples, sample ``i`` going to shard
``i // max_count`` whatever the number of workers, so re-running with the same source
gives byte-identical shards (tar mtimes are pinned to 0). Members of sample ``i``
(key ``{split}_{i:08d}``; keys must not contain dots, webdataset splits the member name
at the first dot):

* ``{key}.png``      RGB image. PNG rather than JPEG so the synthetic data round-trips
  exactly (a JPEG's ringing would blur the label/colour relation the demo relies on).
  A sample that carries its original JPEG (``image_bytes``, ``image_ext="jpg"``, see
  ``formats.common.FormatSample``) is stored as ``{key}.jpg`` byte for byte instead:
  re-encoding a photo dataset as PNG would multiply its size and change nothing.
* ``{key}.seg.png``  single-channel uint8 semantic labels, 255 = ignore.
* ``{key}.pan.png``  panoptic segment ids, COCO-style RGB: id = R + 256 G + 256^2 B.
* ``{key}.json``     ``{"height", "width", "segments_info": [...]}`` (COCO panoptic).

Shard limits: a shard is closed when adding the next sample would take it past
``max_count`` samples or past ``max_size`` bytes (the final tar size, end-of-archive
padding included); a sample bigger than ``max_size`` on its own gets a shard of its own.
Samples are encoded in order (in parallel with ``workers > 1``) and assigned to shards
sequentially, so the layout depends only on the source and the limits.

Every shard is written to a temp file in ``out_dir`` and renamed when complete, and the
manifest is written last (also atomically), so a crash never leaves a manifest that
names a partial shard. The manifest records, per shard, the byte offset of each
sample's first tar header (``sample_offsets``) so a reader can seek to a sample.

Resuming: after each finished shard ``{split}-shard-state.json`` is rewritten
atomically with a fingerprint of the job (format, source options, split, sample count,
classes, limits) and the finished shards' infos. A re-run with the same fingerprint
checks the finished shards' sizes and sha256, keeps the good leading ones and continues
with the next sample, which gives the same bytes as an uninterrupted run; a different
fingerprint is an error (``ShardStateError``) unless ``overwrite=True``. The state file
is removed once the manifest is written. Hidden temp files left by a killed run
(``.{split}-....tmp``) are removed at the start.

``out_dir`` may also be ``pipe:CMD`` with ``{name}`` in CMD (e.g. ``pipe:aws s3 cp -
s3://bucket/ade/{name}``): each shard is staged in a local folder (``staging`` or a
temp folder), then its bytes are piped to CMD with ``{name}`` replaced by the shard's
file name, and the manifest last. Resuming is local-only: a piped job starts over.

A dataset format plugs in as a ``Source``: its metadata plus a picklable
``load(index)`` function (random access lets ``workers > 1`` encode in parallel while
keeping the order).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from data_pipeline.manifest import Manifest, ManifestError, ShardInfo, parse_shard_info, write_manifest
from ops.atomic_file import atomic_write, write_json_atomic

IMAGE_EXT = "png"
JPEG_EXT = "jpg"
SEMANTIC_EXT = "seg.png"
PANOPTIC_EXT = "pan.png"
META_EXT = "json"
IGNORE_INDEX = 255
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
PIPE_PREFIX = "pipe:"
STATE_VERSION = 1
# Bump when the bytes written for the same samples change: a state file from another
# layout must not be resumed into a mixed dataset.
WRITER_LAYOUT = 1
_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 20 blocks: tarfile pads the archive to a multiple of this
# An int, not 0.0: tarfile's (PAX) writer adds a 1 KiB extended header to every member
# whose mtime is a float.
_TAR_MTIME = 0


class ShardStateError(ValueError):
    """An interrupted sharding in the output folder cannot be resumed (one-line message)."""


class PipeError(OSError):
    """A ``pipe:`` output command failed (message names the file and the exit code)."""


class LabeledSample(Protocol):
    """What a format reader returns per sample (``synthetic.SyntheticSample`` is one)."""

    image: np.ndarray  # uint8 H x W x 3 RGB
    semantic: np.ndarray  # uint8 H x W, 255 = ignore
    panoptic: np.ndarray  # int32 H x W segment ids, 0 = void
    segments: list[dict[str, Any]]  # COCO panoptic segments_info
    # Optional (read with getattr): ``image_bytes`` + ``image_ext`` "jpg" store the
    # original JPEG as ``{key}.jpg`` instead of re-encoding ``image`` as PNG.


@dataclass(frozen=True)
class Source:
    """A dataset split ready to shard: metadata plus random access to its samples."""

    format: str  # reader name, recorded in the manifest
    classes: list[str]
    num_samples: int
    # Must be picklable (a top-level function or functools.partial of one) for workers > 1.
    load: Callable[[int], LabeledSample]
    thing_classes: list[int] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # provenance -> manifest "source"


def check_split(split: str) -> None:
    """Raise ValueError unless ``split`` is usable in keys and shard names (no dots)."""
    if not _SPLIT_RE.match(split):
        raise ValueError(
            f"split must match {_SPLIT_RE.pattern} (it prefixes keys and shard names), got {split!r}"
        )


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def manifest_name(split: str) -> str:
    return f"{split}-manifest.json"


def state_name(split: str) -> str:
    return f"{split}-shard-state.json"


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:08d}"


def encode_panoptic(ids: np.ndarray) -> np.ndarray:
    """int32 H x W segment ids -> uint8 H x W x 3, COCO's id = R + 256 G + 256^2 B."""
    ids = ids.astype(np.uint32)
    return np.stack([ids & 0xFF, (ids >> 8) & 0xFF, (ids >> 16) & 0xFF], axis=-1).astype(np.uint8)


def decode_panoptic(rgb: np.ndarray) -> np.ndarray:
    """Inverse of ``encode_panoptic``."""
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _image_member(sample: LabeledSample, key: str) -> tuple[str, bytes]:
    """(extension, bytes) of the image member: the original JPEG if the sample has one."""
    data: bytes | None = getattr(sample, "image_bytes", None)
    if data is None:
        return IMAGE_EXT, _png(sample.image)
    ext = getattr(sample, "image_ext", None)
    if ext not in ("jpg", "jpeg"):
        raise ValueError(f"{key}: image_bytes must come with image_ext 'jpg', got {ext!r}")
    try:
        size = Image.open(io.BytesIO(data)).size  # header only: cheap
    except Exception as exn:
        raise ValueError(f"{key}: image_bytes is not a decodable image: {exn}") from None
    if size != (sample.image.shape[1], sample.image.shape[0]):
        raise ValueError(
            f"{key}: image_bytes is {size[0]}x{size[1]} (WxH) but the image array is "
            f"{sample.image.shape[1]}x{sample.image.shape[0]}"
        )
    return JPEG_EXT, data


def encode_sample(sample: LabeledSample, key: str) -> dict[str, Any]:
    """A webdataset sample dict (``__key__`` + member bytes) for one labelled sample."""
    image, semantic, panoptic = sample.image, sample.semantic, sample.panoptic
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{key}: image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    if semantic.dtype != np.uint8 or semantic.shape != image.shape[:2]:
        raise ValueError(
            f"{key}: semantic must be uint8 {image.shape[:2]}, got {semantic.dtype} {semantic.shape}"
        )
    if panoptic.shape != image.shape[:2]:
        raise ValueError(f"{key}: panoptic must be {image.shape[:2]}, got {panoptic.shape}")
    meta = {"height": int(image.shape[0]), "width": int(image.shape[1]), "segments_info": sample.segments}
    image_ext, image_bytes = _image_member(sample, key)
    return {
        "__key__": key,
        image_ext: image_bytes,
        SEMANTIC_EXT: _png(semantic),
        PANOPTIC_EXT: _png(encode_panoptic(panoptic)),
        META_EXT: json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


@dataclass
class _Encoded:
    members: dict[str, Any]  # webdataset sample dict
    size: int  # bytes it takes in a tar: headers + data padded to 512-byte blocks


def _tar_size(members: dict[str, Any]) -> int:
    size = 0
    for ext, data in members.items():
        if ext.startswith("__"):
            continue
        # The header webdataset's TarWriter writes for this member (see _TAR_MTIME).
        info = tarfile.TarInfo(f"{members['__key__']}.{ext}")
        info.size = len(data)
        info.mtime = _TAR_MTIME
        info.mode = 0o444
        info.uname = info.gname = "bigdata"
        header = len(info.tobuf(tarfile.DEFAULT_FORMAT, "utf-8", "surrogateescape"))
        size += header + -(-len(data) // _BLOCK) * _BLOCK
    return size


def archive_size(content: int) -> int:
    """Final size of a tar whose members take ``content`` bytes: end blocks + record padding."""
    return -(-(content + 2 * _BLOCK) // _RECORD) * _RECORD


def _load_and_encode(load: Callable[[int], LabeledSample], split: str, index: int) -> _Encoded:
    members = encode_sample(load(index), sample_key(split, index))
    return _Encoded(members, _tar_size(members))


class _HashingWriter:
    """File wrapper that hashes and counts what tarfile's stream mode writes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._f.write(data)


def _encoded_samples(source: Source, split: str, workers: int, start: int = 0) -> Iterator[_Encoded]:
    encode = partial(_load_and_encode, source.load, split)
    indices = range(start, source.num_samples)
    if workers <= 1:
        yield from map(encode, indices)
        return
    # imap keeps the order; chunks amortise the inter-process overhead of tiny samples.
    chunksize = max(1, min(64, len(indices) // (workers * 4)))
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap(encode, indices, chunksize=chunksize)


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
        "source": dict(source.options),
        "max_count": max_count,
        "max_size": max_size,
        "layout": WRITER_LAYOUT,
    }
    return json.loads(json.dumps(fingerprint, sort_keys=True))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_state(path: Path) -> tuple[dict[str, Any], list[ShardInfo]]:
    hint = "pass --overwrite (overwrite=True) to start over"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ShardStateError(f"{path}: unreadable shard state file ({exn}); {hint}") from None
    if (
        not isinstance(data, dict)
        or data.get("state_version") != STATE_VERSION
        or not isinstance(data.get("fingerprint"), dict)
        or not isinstance(data.get("shards"), list)
    ):
        raise ShardStateError(f"{path}: not a version {STATE_VERSION} shard state file; {hint}")
    try:
        shards = [parse_shard_info(raw, f"shards[{i}]", path) for i, raw in enumerate(data["shards"])]
    except ManifestError as exn:
        raise ShardStateError(f"{exn}; {hint}") from None
    return data["fingerprint"], shards


def _resumable_shards(out: Path, split: str, state: list[ShardInfo]) -> list[ShardInfo]:
    """The leading shards of an interrupted run whose files are intact, in order."""
    kept: list[ShardInfo] = []
    for index, info in enumerate(state):
        path = out / info.name
        if info.name != shard_name(split, index):
            break
        try:
            if path.stat().st_size != info.bytes or _file_sha256(path) != info.sha256:
                break
        except OSError:
            break
        kept.append(info)
    return kept


def _remove_temp_files(folder: Path, split: str) -> None:
    """Hidden temp files a killed run left behind (``atomic_write`` names them so)."""
    pattern = re.compile(rf"^\.{re.escape(split)}-(\d{{6}}\.tar|manifest\.json|shard-state\.json)\..+\.tmp$")
    for path in folder.iterdir():
        if pattern.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)


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
) -> Manifest:
    """Shard ``source`` into ``out_dir`` and write ``{split}-manifest.json`` last.

    Replaces a previous complete sharding of the same split in ``out_dir``: its manifest
    is removed first (so a crash leaves no manifest rather than a stale one) and shards
    it had beyond the new count are deleted at the end. An interrupted sharding (a
    ``{split}-shard-state.json``) with the same arguments is resumed; with other
    arguments it raises ``ShardStateError`` unless ``overwrite``. ``out_dir`` may be
    ``pipe:CMD`` (see the module docstring); ``staging`` is then where shards are
    built. ``progress=None`` shows a bar only on a TTY.
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
    try:
        return _write_shards(source, out, split, max_count, max_size, workers, progress, overwrite, command)
    finally:
        if made_staging:
            shutil.rmtree(out, ignore_errors=True)


def _write_shards(
    source: Source,
    out: Path,
    split: str,
    max_count: int,
    max_size: int | None,
    workers: int,
    progress: bool | None,
    overwrite: bool,
    command: str | None,
) -> Manifest:
    manifest_path = out / manifest_name(split)
    state_path = out / state_name(split)
    _remove_temp_files(out, split)
    fingerprint = _fingerprint(source, split, max_count, max_size)
    shards: list[ShardInfo] = []
    if command is None and state_path.exists() and not overwrite:
        old, state = _read_state(state_path)
        if old != fingerprint:
            changed = sorted(k for k in fingerprint.keys() | old.keys() if fingerprint.get(k) != old.get(k))
            raise ShardStateError(
                f"{out} holds an interrupted sharding of split {split!r} made with other arguments "
                f"(differing: {', '.join(changed)}); re-run with the same arguments to resume it, "
                f"or use a new --out or pass --overwrite to start over"
            )
        shards = _resumable_shards(out, split, state)
    state_path.unlink(missing_ok=True)
    manifest_path.unlink(missing_ok=True)
    if shards:
        write_json_atomic(state_path, _state(fingerprint, shards))

    def fits(count: int, content: int, sample: _Encoded) -> bool:
        if count == 0:
            return True  # a sample larger than max_size gets a shard of its own
        if count + 1 > max_count:
            return False
        return max_size is None or archive_size(content + sample.size) <= max_size

    start = sum(s.num_samples for s in shards)
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(
        total=source.num_samples, initial=start, desc=f"shard {split}", unit="sample", disable=not show
    ) as bar:
        samples = _encoded_samples(source, split, workers, start)
        try:
            _fill_shards(samples, out, split, shards, fits, bar, state_path, fingerprint, command)
        finally:
            samples.close()  # stops the worker pool now, also on an error

    if command is None:
        keep = {s.name for s in shards}
        stale = re.compile(rf"^{re.escape(split)}-\d{{6}}\.tar$")
        for old_shard in out.iterdir():
            if stale.match(old_shard.name) and old_shard.name not in keep:
                old_shard.unlink()

    manifest = Manifest(
        format=source.format,
        split=split,
        classes=list(source.classes),
        thing_classes=list(source.thing_classes),
        ignore_index=IGNORE_INDEX,
        num_samples=source.num_samples,
        shards=shards,
        created_by=_created_by(),
        source=dict(source.options),
    )
    write_manifest(manifest_path, manifest)
    if command is None:
        state_path.unlink(missing_ok=True)
    else:
        _pipe_file(command, manifest_path)
        manifest_path.unlink()
    return manifest


def _fill_shards(
    samples: Iterator[_Encoded],
    out: Path,
    split: str,
    shards: list[ShardInfo],
    fits: Callable[[int, int, _Encoded], bool],
    bar: tqdm,
    state_path: Path,
    fingerprint: dict[str, Any],
    command: str | None,
) -> None:
    """Write shards from ``samples`` in order, appending their infos to ``shards``."""
    upcoming = next(samples, None)
    while upcoming is not None:
        path = out / shard_name(split, len(shards))
        offsets: list[int] = []
        content = 0
        with atomic_write(path, "wb") as f:
            hashing = _HashingWriter(f)
            # mtime=0 and fixed owner: identical input gives a byte-identical shard.
            with wds.TarWriter(hashing, encoder=False, mtime=_TAR_MTIME) as writer:
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
        if command is None:
            write_json_atomic(state_path, _state(fingerprint, shards))
        else:
            _pipe_file(command, path)
            path.unlink()


def _state(fingerprint: dict[str, Any], shards: list[ShardInfo]) -> dict[str, Any]:
    return {
        "state_version": STATE_VERSION,
        "fingerprint": fingerprint,
        "shards": [s.to_json() for s in shards],
    }
