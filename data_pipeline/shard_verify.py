"""Deep verification of a sharded split: ``python -m data_pipeline verify MANIFEST``.

Beyond each shard's size and sha256 (``manifest.verify_shards``, the ``--quick`` check)
every shard is read as a tar and every sample checked the way the loader will use it:

* members of a sample (key = member name up to the first dot) are contiguous;
* it has an image (``.png``/``.jpg``/``.jpeg``) and a ``.seg.png`` label, and its
  ``.json`` (if any) parses and names its source file, if at all, by a plain stem;
* both decode with PIL, the image in a mode the loader converts to RGB (not 32-bit), the
  label single-channel and the same size;
* label values are < the number of classes or == the manifest's ``ignore_index``;
* the shard's sample count, and the offset of each sample's first tar header when the
  manifest records ``sample_offsets``, match the manifest.

Each shard gets a ``ShardReport`` with its problems (the first one is what the CLI
prints, with the first bad sample when that is not it already) and the number of bad
samples. Samples are named by key and, where the shard records it, source file
(``sample val_00000000 (ADE_val_00000001)``).
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from data_pipeline.manifest import Manifest, ShardInfo, check_shard_file
from data_pipeline.sample_members import (
    SOURCE_FIELD,
    MemberDecodeError,
    check_source_name,
    image_mode_problem,
    open_member,
    sample_label,
    sample_source,
)

IMAGE_EXTS = ("png", "jpg", "jpeg")
SEMANTIC_EXT = "seg.png"
META_EXT = "json"
LABEL_MODES = ("L", "P", "I", "I;16")  # single-channel modes the loader accepts


@dataclass
class ShardReport:
    name: str
    path: str
    problems: list[str] = field(default_factory=list)
    bad_samples: int = 0
    first_bad: str | None = None  # "sample KEY (SOURCE): problem" of the first bad sample

    def add_bad_sample(self, problem: str) -> None:
        self.bad_samples += 1
        self.problems.append(problem)
        if self.first_bad is None:
            self.first_bad = problem

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        """One line naming the shard, its first problem, the number of bad samples and,
        when the first problem is about the whole shard (a checksum), the first bad sample."""
        extra = []
        if self.bad_samples:
            extra.append(f"{self.bad_samples} bad sample{'s' if self.bad_samples != 1 else ''}")
        if len(self.problems) > 1:
            extra.append(f"{len(self.problems)} problems")
        bad = f" ({', '.join(extra)})" if extra else ""
        first = f"; first bad {self.first_bad}" if self.first_bad not in (None, self.problems[0]) else ""
        return f"{self.path}: {self.problems[0]}{bad}{first}"


def iter_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, int, dict[str, bytes]]]:
    """``(key, offset of its first header, {ext: bytes})`` per sample, in tar order.

    Raises ValueError if a key's members are not contiguous (webdataset would split it).
    """
    seen: set[str] = set()
    key: str | None = None
    offset = 0
    members: dict[str, bytes] = {}
    for info in tar:
        if not info.isfile():
            continue
        name = os.path.basename(info.name)
        member_key, _, ext = name.partition(".")
        if member_key != key:
            if key is not None:
                yield key, offset, members
            if member_key in seen:
                raise ValueError(f"members of sample {member_key} are not contiguous")
            seen.add(member_key)
            key, offset, members = member_key, info.offset, {}
        data = tar.extractfile(info)
        members[ext] = data.read() if data is not None else b""
    if key is not None:
        yield key, offset, members


def check_sample(members: dict[str, bytes], num_classes: int, ignore_index: int) -> str | None:
    """The first problem of one sample's members, or None if it is good."""
    image_ext = next((ext for ext in IMAGE_EXTS if ext in members), None)
    if image_ext is None:
        return f"no image (.png/.jpg/.jpeg), has {sorted(members)}"
    if SEMANTIC_EXT not in members:
        return f"no .{SEMANTIC_EXT} label, has {sorted(members)}"
    if META_EXT in members:
        try:
            meta = json.loads(members[META_EXT])
        except (UnicodeDecodeError, json.JSONDecodeError) as exn:
            return f".{META_EXT} does not parse: {exn}"
        if isinstance(meta, dict) and SOURCE_FIELD in meta:
            problem = check_source_name(meta[SOURCE_FIELD])
            if problem is not None:
                return f".{META_EXT} {SOURCE_FIELD!r} {problem}"
    try:
        image = open_member(members[image_ext], image_ext)
        label = open_member(members[SEMANTIC_EXT], SEMANTIC_EXT)
    except MemberDecodeError as exn:
        return str(exn)
    problem = image_mode_problem(image.mode)  # the loader's rule: gray, palette, RGBA convert
    if problem is not None:
        return f".{image_ext} {problem}"
    if label.mode not in LABEL_MODES:
        return f".{SEMANTIC_EXT} must be single-channel, got PIL mode {label.mode}"
    if label.size != image.size:
        return f"image is {image.size[0]}x{image.size[1]} but label is {label.size[0]}x{label.size[1]} (WxH)"
    values = np.unique(np.asarray(label))
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if bad.size:
        return f"label value {int(bad[0])} out of range ({num_classes} classes, ignore {ignore_index})"
    return None


def _deep_check(manifest: Manifest, info: ShardInfo, path: str, report: ShardReport) -> None:
    num_classes, ignore = len(manifest.classes), manifest.ignore_index
    offsets: list[int] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for key, offset, members in iter_samples(tar):
                offsets.append(offset)
                problem = check_sample(members, num_classes, ignore)
                if problem is not None:
                    report.add_bad_sample(f"sample {sample_label(key, sample_source(members))}: {problem}")
    except (tarfile.TarError, ValueError, OSError, EOFError) as exn:
        report.problems.append(f"not a readable tar after {len(offsets)} samples: {exn}")
        return
    if len(offsets) != info.num_samples:
        report.problems.append(f"holds {len(offsets)} samples, manifest says {info.num_samples}")
    elif info.sample_offsets and offsets != info.sample_offsets:
        first = next(i for i, (a, b) in enumerate(zip(offsets, info.sample_offsets)) if a != b)
        report.problems.append(
            f"sample {first} starts at byte {offsets[first]}, manifest sample_offsets says "
            f"{info.sample_offsets[first]}"
        )


def verify_manifest(
    manifest: Manifest, quick: bool = False, progress: bool | None = None
) -> list[ShardReport]:
    """A report per shard, in manifest order (``quick``: sizes and sha256 only)."""
    reports = []
    show = sys.stderr.isatty() if progress is None else progress
    shards = list(zip(manifest.shards, manifest.shard_paths()))
    for info, path in tqdm(shards, desc="verify", unit="shard", disable=not show):
        report = ShardReport(info.name, path)
        problem = check_shard_file(info, path)
        if problem is not None:
            report.problems.append(problem)
            if problem.startswith("cannot read"):
                reports.append(report)
                continue
        if not quick:
            _deep_check(manifest, info, path, report)
        reports.append(report)
    return reports
