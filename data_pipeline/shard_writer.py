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

Every shard is written to a temp file in ``out_dir`` and renamed when complete, and the
manifest is written last (also atomically), so a crash never leaves a manifest that
names a partial shard. A dataset format plugs in as a ``Source``: its metadata plus a
picklable ``load(index)`` function (random access lets ``workers > 1`` encode in
parallel while keeping the order).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
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

from data_pipeline.manifest import Manifest, ShardInfo, write_manifest
from ops.atomic_file import atomic_write

IMAGE_EXT = "png"
JPEG_EXT = "jpg"
SEMANTIC_EXT = "seg.png"
PANOPTIC_EXT = "pan.png"
META_EXT = "json"
IGNORE_INDEX = 255
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


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


def _load_and_encode(load: Callable[[int], LabeledSample], split: str, index: int) -> dict[str, Any]:
    return encode_sample(load(index), sample_key(split, index))


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


def _write_shard(path: Path, samples: list[dict[str, Any]]) -> ShardInfo:
    """Write one complete shard atomically: temp file in the same folder, then rename."""
    with atomic_write(path, "wb") as f:
        hashing = _HashingWriter(f)
        # mtime=0 and fixed owner: identical input gives a byte-identical shard.
        with wds.TarWriter(hashing, encoder=False, mtime=0.0) as writer:
            for sample in samples:
                writer.write(sample)
    return ShardInfo(
        name=path.name, num_samples=len(samples), bytes=hashing.bytes, sha256=hashing.sha256.hexdigest()
    )


def _encoded_samples(source: Source, split: str, workers: int) -> Iterator[dict[str, Any]]:
    encode = partial(_load_and_encode, source.load, split)
    if workers <= 1:
        yield from map(encode, range(source.num_samples))
        return
    # imap keeps the order; chunks amortise the inter-process overhead of tiny samples.
    chunksize = max(1, min(64, source.num_samples // (workers * 4)))
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap(encode, range(source.num_samples), chunksize=chunksize)


def _created_by() -> str:
    try:
        return f"segscale {metadata.version('segscale')}"
    except metadata.PackageNotFoundError:
        return "segscale (not installed)"


def write_shards(
    source: Source,
    out_dir: str | os.PathLike[str],
    split: str,
    max_count: int = 64,
    workers: int = 1,
    progress: bool | None = None,
) -> Manifest:
    """Shard ``source`` into ``out_dir`` and write ``{split}-manifest.json`` last.

    Replaces a previous sharding of the same split in ``out_dir``: its manifest is removed
    first (so a crash leaves no manifest rather than a stale one) and shards it had beyond
    the new count are deleted at the end. ``progress=None`` shows a bar only on a TTY.
    """
    check_split(split)
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if source.num_samples < 1:
        raise ValueError(f"nothing to shard: the {source.format} source has {source.num_samples} samples")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / manifest_name(split)
    manifest_path.unlink(missing_ok=True)

    shards: list[ShardInfo] = []
    pending: list[dict[str, Any]] = []
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=source.num_samples, desc=f"shard {split}", unit="sample", disable=not show) as bar:
        for sample in _encoded_samples(source, split, workers):
            pending.append(sample)
            if len(pending) == max_count:
                shards.append(_write_shard(out / shard_name(split, len(shards)), pending))
                pending = []
            bar.update(1)
        if pending:
            shards.append(_write_shard(out / shard_name(split, len(shards)), pending))

    keep = {s.name for s in shards}
    stale = re.compile(rf"^{re.escape(split)}-\d{{6}}\.tar$")
    for old in out.iterdir():
        if stale.match(old.name) and old.name not in keep:
            old.unlink()

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
    return manifest
