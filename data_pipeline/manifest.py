"""The manifest of one sharded split: what the loader needs to know before opening a tar.

A manifest is a JSON file next to its shards (shard names are relative to its folder,
so a dataset folder can be moved or synced to object storage as a whole)::

    {
      "manifest_version": 1,
      "format": "synthetic",            # the reader that produced the shards
      "split": "train",
      "classes": ["background", ...],   # index = label value in .seg.png
      "thing_classes": [1, 2, 3, 4],    # category ids that are "things" (panoptic)
      "category_ids": [1, 2, 3, ...],   # optional: the dataset's own id of each class (COCO's)
      "ignore_index": 255,
      "num_samples": 512,               # == sum of shards[*].num_samples
      "shards": [{"name": "train-000000.tar", "num_samples": 64,
                  "bytes": 123456, "sha256": "<64 hex digits>",
                  "sample_offsets": [0, 2560, ...]}, ...],
      "created_by": "segscale 0.1.0",
      "source": {...}                   # free-form provenance (reader options)
    }

``sample_offsets`` (optional, one per sample of the shard, increasing, 512-aligned) is the byte
offset in the tar of the first header of each sample; the sample's members follow
contiguously, so a reader can ``seek`` there and stream the tar from that point. It is
left out (an empty list after loading: unknown) by manifests written before it existed.

``category_ids`` (optional, one distinct int per class) is the dataset's own category id
of each class, where it has ids other than the class index (COCO panoptic: 1..200 with
gaps). Panoptic predictions and exported ground truth are written with these ids, so they
pair with the dataset's own annotation files; without it the class index is the id.

Errors are one line naming the file and the key at fault, because a bad manifest is a
user input error that the CLI reports without a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops.atomic_file import write_json_atomic

MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or inconsistent (one-line message)."""


@dataclass(frozen=True)
class ShardInfo:
    name: str  # path relative to the manifest's folder
    num_samples: int
    bytes: int
    sha256: str
    # Byte offset of each sample's first tar header, in sample order; [] = unknown
    # (manifests written before the field existed).
    sample_offsets: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "num_samples": self.num_samples,
            "bytes": self.bytes,
            "sha256": self.sha256,
        }
        if self.sample_offsets:
            data["sample_offsets"] = list(self.sample_offsets)
        return data


@dataclass
class Manifest:
    format: str
    split: str
    classes: list[str]
    ignore_index: int
    num_samples: int
    shards: list[ShardInfo]
    created_by: str
    thing_classes: list[int] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    category_ids: list[int] = field(default_factory=list)  # [] = the class index is the id
    manifest_version: int = MANIFEST_VERSION
    # Where the manifest lives (set by load/write); shard names resolve against its folder.
    # Not serialised.
    path: Path | None = field(default=None, compare=False)

    @property
    def root(self) -> Path:
        if self.path is None:
            raise ManifestError("manifest has no path: load it with load_manifest() or write it first")
        return self.path.parent

    def shard_paths(self) -> list[str]:
        """Absolute paths of the shards, in manifest order."""
        return [str(self.root / shard.name) for shard in self.shards]

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest_version": self.manifest_version,
            "format": self.format,
            "split": self.split,
            "classes": list(self.classes),
            "thing_classes": list(self.thing_classes),
            **({"category_ids": list(self.category_ids)} if self.category_ids else {}),
            "ignore_index": self.ignore_index,
            "num_samples": self.num_samples,
            "shards": [s.to_json() for s in self.shards],
            "created_by": self.created_by,
            "source": dict(self.source),
        }

    def summary(self) -> str:
        """Human-readable multi-line summary (``python -m data_pipeline info``)."""
        total_bytes = sum(s.bytes for s in self.shards)
        counts = sorted({s.num_samples for s in self.shards})
        lines = [
            f"manifest:     {self.path}",
            f"format:       {self.format} (manifest v{self.manifest_version}, {self.created_by})",
            f"split:        {self.split}",
            f"samples:      {self.num_samples}",
            f"shards:       {len(self.shards)} ({_human_bytes(total_bytes)}; samples per shard "
            f"{counts[0] if len(counts) == 1 else f'{counts[0]}-{counts[-1]}'})"
            if self.shards
            else "shards:       0",
            f"classes:      {len(self.classes)}: {', '.join(self.classes)}",
            f"thing ids:    {self.thing_classes}",
            f"ignore_index: {self.ignore_index}",
        ]
        if self.category_ids:
            lines.insert(-1, f"category ids: {self.category_ids} (the dataset's own, in panoptic outputs)")
        if self.source:
            lines.append("source:       " + ", ".join(f"{k}={v}" for k, v in self.source.items()))
        return "\n".join(lines)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- loading


def _get(obj: dict[str, Any], key: str, kind: type, where: str, path: Path) -> Any:
    """``obj[key]`` checked against ``kind``; ``where`` is the key's dotted path for errors."""
    if key not in obj:
        raise ManifestError(f"{path}: missing key '{where}'")
    value = obj[key]
    # bool is a subclass of int: "num_samples": true must not pass as an int.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ManifestError(f"{path}: key '{where}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def _list_of(items: list[Any], kind: type, where: str, path: Path) -> list[Any]:
    for i, item in enumerate(items):
        if not isinstance(item, kind) or (isinstance(item, bool) and kind is int):
            raise ManifestError(
                f"{path}: key '{where}[{i}]' must be {kind.__name__}, got {type(item).__name__}"
            )
    return list(items)


def training_classes(manifest: Manifest, reduce_zero_label: bool) -> list[str]:
    """Class names in the label space the model trains on.

    A manifest names the label values as stored in its shards; with ``reduce_zero_label``
    (ADE20K) stored label 0 becomes ignore and the rest shift down, so its name drops out.
    """
    return manifest.classes[1:] if reduce_zero_label else list(manifest.classes)


def parse_shard_info(raw: Any, where: str, path: Path) -> ShardInfo:
    """One validated ``shards[i]`` entry (also used by the shard writer's state file)."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: key '{where}' must be dict, got {type(raw).__name__}")
    offsets: list[int] = []
    if "sample_offsets" in raw:
        offsets = _list_of(
            _get(raw, "sample_offsets", list, f"{where}.sample_offsets", path),
            int,
            f"{where}.sample_offsets",
            path,
        )
    shard = ShardInfo(
        name=_get(raw, "name", str, f"{where}.name", path),
        num_samples=_get(raw, "num_samples", int, f"{where}.num_samples", path),
        bytes=_get(raw, "bytes", int, f"{where}.bytes", path),
        sha256=_get(raw, "sha256", str, f"{where}.sha256", path),
        sample_offsets=offsets,
    )
    if os.path.isabs(shard.name) or ".." in Path(shard.name).parts:
        raise ManifestError(
            f"{path}: key '{where}.name' must be relative to the manifest folder: {shard.name!r}"
        )
    if shard.num_samples < 0 or shard.bytes < 0:
        raise ManifestError(f"{path}: key '{where}' has a negative num_samples or bytes")
    if offsets and len(offsets) != shard.num_samples:
        raise ManifestError(
            f"{path}: key '{where}.sample_offsets' has {len(offsets)} entries but num_samples is {shard.num_samples}"
        )
    if offsets:
        if offsets[0] < 0 or any(b <= a for a, b in zip(offsets, offsets[1:])):
            raise ManifestError(f"{path}: key '{where}.sample_offsets' must be increasing and >= 0")
        if offsets[-1] >= shard.bytes:
            raise ManifestError(
                f"{path}: key '{where}.sample_offsets' has offset {offsets[-1]} "
                f"beyond the shard's {shard.bytes} bytes"
            )
        if any(o % 512 for o in offsets):
            raise ManifestError(f"{path}: key '{where}.sample_offsets' must be multiples of 512 (tar blocks)")
    return shard


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest. Raises ManifestError with a one-line message."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except (OSError, UnicodeDecodeError) as exn:
        raise ManifestError(f"{path}: cannot read manifest: {exn}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exn:
        raise ManifestError(
            f"{path}: invalid JSON at line {exn.lineno} column {exn.colno}: {exn.msg}"
        ) from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: manifest must be a JSON object, got {type(data).__name__}")

    version = (
        _get(data, "manifest_version", int, "manifest_version", path) if "manifest_version" in data else 1
    )
    if version != MANIFEST_VERSION:
        raise ManifestError(
            f"{path}: key 'manifest_version' is {version}, this segscale reads {MANIFEST_VERSION}"
        )
    shards = [
        parse_shard_info(raw, f"shards[{i}]", path)
        for i, raw in enumerate(_get(data, "shards", list, "shards", path))
    ]

    # Optional keys (a hand-written manifest may leave them out).
    thing_classes: list[int] = []
    if "thing_classes" in data:
        thing_classes = _list_of(
            _get(data, "thing_classes", list, "thing_classes", path), int, "thing_classes", path
        )
    manifest = Manifest(
        format=_get(data, "format", str, "format", path),
        split=_get(data, "split", str, "split", path),
        classes=_list_of(_get(data, "classes", list, "classes", path), str, "classes", path),
        ignore_index=_get(data, "ignore_index", int, "ignore_index", path),
        num_samples=_get(data, "num_samples", int, "num_samples", path),
        shards=shards,
        created_by=_get(data, "created_by", str, "created_by", path),
        thing_classes=thing_classes,
        source=_get(data, "source", dict, "source", path) if "source" in data else {},
        category_ids=_category_ids(data, path),
        manifest_version=version,
        path=path.resolve(),
    )
    total = sum(s.num_samples for s in shards)
    if total != manifest.num_samples:
        raise ManifestError(
            f"{path}: key 'num_samples' is {manifest.num_samples} but the shards hold {total}"
        )
    return manifest


def _category_ids(data: dict[str, Any], path: Path) -> list[int]:
    if "category_ids" not in data:
        return []
    ids = _list_of(_get(data, "category_ids", list, "category_ids", path), int, "category_ids", path)
    classes = data.get("classes")
    if isinstance(classes, list) and len(ids) != len(classes):
        raise ManifestError(f"{path}: key 'category_ids' has {len(ids)} ids for {len(classes)} classes")
    if len(set(ids)) != len(ids):
        raise ManifestError(f"{path}: key 'category_ids' repeats an id: {ids}")
    return ids


# ----------------------------------------------------------------------------- writing


def write_manifest(path: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``manifest`` atomically (temp file in the same folder + ``os.replace``).

    A reader therefore sees either the old manifest or the new one, never half a file;
    the shard writer calls this last so a manifest only ever names complete shards.
    Sets ``manifest.path`` and returns the resolved path.
    """
    path = Path(path).resolve()
    write_json_atomic(path, manifest.to_json())
    manifest.path = path
    return path


def check_shard_size(shard: ShardInfo, shard_path: str | os.PathLike[str]) -> str | None:
    """The problem with one shard file's size (no path prefix), or None: one stat, what a
    run checks of every shard before it starts (a copy cut short shows here)."""
    try:
        size = os.path.getsize(shard_path)
    except OSError as exn:
        return f"cannot read: {exn.strerror or exn}"
    if size == shard.bytes:
        return None
    return f"{size} bytes, manifest says {shard.bytes} (cut short or replaced: write it again)"


def check_shard_file(shard: ShardInfo, shard_path: str | os.PathLike[str]) -> str | None:
    """The problem with one shard file's size or sha256 (no path prefix), or None."""
    problem = check_shard_size(shard, shard_path)
    if problem is not None:
        return problem
    try:
        digest = hashlib.sha256()
        with open(shard_path, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exn:
        return f"cannot read: {exn.strerror or exn}"
    if digest.hexdigest() != shard.sha256:
        return "sha256 mismatch"
    return None


def verify_shards(manifest: Manifest) -> list[str]:
    """Check every shard's size and sha256 against the manifest; returns the problems found."""
    problems = []
    for shard, shard_path in zip(manifest.shards, manifest.shard_paths()):
        problem = check_shard_file(shard, shard_path)
        if problem is not None:
            problems.append(f"{shard_path}: {problem}")
    return problems
