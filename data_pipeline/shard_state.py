"""What a ``shard`` job may do with the files already in its output folder.

The writer (``shard_writer``) owns only the files of its split that a record lists: the
shards of a finished dataset's manifest it replaces, the shards an interrupted run's
``{split}-shard-state.json`` lists, and hidden temp files named after the split. A
``{split}-NNNNNN.tar`` that nothing lists (copied in by hand, left by another tool) is
someone else's: without ``overwrite`` the job refuses to start, with it such a file may
be overwritten when the job needs its name but is never deleted.

The state file (rewritten atomically after every finished shard) holds the job's
fingerprint, its finished shards and the shards of the dataset it replaces, so a run
killed at any point still knows on its re-run which files it may delete at the end.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.manifest import ManifestError, ShardInfo, parse_shard_info

STATE_VERSION = 1
_HINT = "pass --overwrite (overwrite=True) to start over"


class ShardStateError(ValueError):
    """The output folder's contents stop the job from starting (one-line message)."""


class ShardingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``write_shards``; ``str()`` says what is finished and how to resume."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def manifest_name(split: str) -> str:
    return f"{split}-manifest.json"


def state_name(split: str) -> str:
    return f"{split}-shard-state.json"


def note(message: str) -> None:
    """A line for the person running the job, on stderr beside the progress bar."""
    print(message, file=sys.stderr, flush=True)


def plural(count: int, word: str) -> str:
    """``"1 shard"``, ``"2 shards"`` (``launcher.progress`` uses this one too)."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def state_json(fingerprint: dict[str, Any], shards: list[ShardInfo], replaced: list[str]) -> dict[str, Any]:
    return {
        "state_version": STATE_VERSION,
        "fingerprint": fingerprint,
        "shards": [s.to_json() for s in shards],
        "replaced": list(replaced),
    }


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_state(path: Path, split: str) -> tuple[dict[str, Any], list[ShardInfo], list[str]]:
    """(fingerprint, finished shards, names of replaced shards) of a state file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ShardStateError(f"{path}: unreadable shard state file ({exn}); {_HINT}") from None
    if (
        not isinstance(data, dict)
        or data.get("state_version") != STATE_VERSION
        or not isinstance(data.get("fingerprint"), dict)
        or not isinstance(data.get("shards"), list)
    ):
        raise ShardStateError(f"{path}: not a version {STATE_VERSION} shard state file; {_HINT}")
    try:
        shards = [parse_shard_info(raw, f"shards[{i}]", path) for i, raw in enumerate(data["shards"])]
    except ManifestError as exn:
        raise ShardStateError(f"{exn}; {_HINT}") from None
    # Absent in state files written before it was recorded.
    replaced = [n for n in data.get("replaced", []) if isinstance(n, str) and _is_shard(n, split)]
    return data["fingerprint"], shards, replaced


def _is_shard(name: str, split: str) -> bool:
    return re.fullmatch(rf"{re.escape(split)}-\d{{6}}\.tar", name) is not None


def _manifest_shards(path: Path, split: str) -> list[str]:
    """Shard names a (possibly damaged) manifest lists: read leniently, it is being replaced."""
    try:
        shards = json.loads(path.read_text(encoding="utf-8")).get("shards", [])
        names = [s.get("name") for s in shards if isinstance(s, dict)]
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError):
        return []
    return [n for n in names if isinstance(n, str) and _is_shard(n, split)]


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


def remove_temp_files(folder: Path, split: str) -> None:
    """Hidden temp files a killed run left behind (``atomic_write`` names them so)."""
    pattern = re.compile(rf"^\.{re.escape(split)}-(\d{{6}}\.tar|manifest\.json|shard-state\.json)\..+\.tmp$")
    for path in folder.iterdir():
        if pattern.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)


@dataclass
class Plan:
    """How a job starts in its folder."""

    shards: list[ShardInfo] = field(default_factory=list)  # finished shards it continues after
    replaced: list[str] = field(default_factory=list)  # shard files of earlier data it may delete
    foreign: list[str] = field(default_factory=list)  # shard-named files nothing lists: never deleted


def plan_folder(
    out: Path, split: str, fingerprint: dict[str, Any], overwrite: bool, keep_finished: bool, total: int
) -> Plan:
    """Check ``out`` and decide what to keep; raises ShardStateError before changing anything.

    ``keep_finished``: a finished dataset of the split (its manifest) is an error rather
    than replaced. ``overwrite``: an interrupted run with another fingerprint is
    discarded, and unlisted shard-named files may be overwritten, instead of an error.
    """
    manifest_path, state_path = out / manifest_name(split), out / state_name(split)
    if keep_finished and manifest_path.exists():
        raise ShardStateError(
            f"{out} already holds a finished {split} dataset ({manifest_path}); pass --overwrite to "
            "replace it, or choose another --out"
        )
    listed = set(_manifest_shards(manifest_path, split))
    plan = Plan()
    if state_path.exists():
        old, recorded, replaced = _read_state(state_path, split)
        # A killed run may have published its next shard but not yet recorded it.
        ours = {s.name for s in recorded} | set(replaced) | {shard_name(split, len(recorded))}
        if old == fingerprint:
            plan.shards = _resumable_shards(out, split, recorded)
            _note_resume(out, split, plan.shards, recorded, total)
        elif (recorded or replaced) and not overwrite:
            changed = sorted(k for k in fingerprint.keys() | old.keys() if fingerprint.get(k) != old.get(k))
            if changed == ["layout"]:  # same arguments, but a segscale that wrote other shard bytes
                raise ShardStateError(
                    f"{out} holds an interrupted sharding of split {split!r} started by an older segscale "
                    "(its shards are laid out differently); pass --overwrite to start over"
                )
            raise ShardStateError(
                f"{out} holds an interrupted sharding of split {split!r} made with other arguments "
                f"(differing: {', '.join(changed)}); re-run with the same arguments to resume it, "
                f"or use a new --out or pass --overwrite to start over"
            )
        listed |= ours
    present = sorted(p.name for p in out.iterdir() if _is_shard(p.name, split) and p.is_file())
    plan.foreign = [name for name in present if name not in listed]
    if plan.foreign and not overwrite:
        more = f" and {len(plan.foreign) - 1} more" if len(plan.foreign) > 1 else ""
        raise ShardStateError(
            f"{out / plan.foreign[0]}{more}: not listed by any {split} manifest or shard state in {out}, "
            "so this job will not overwrite or delete such files; move them away, choose another --out, "
            "or pass --overwrite"
        )
    kept = {s.name for s in plan.shards}
    plan.replaced = sorted(listed - kept)
    return plan


def _note_resume(out: Path, split: str, kept: list[ShardInfo], recorded: list[ShardInfo], total: int) -> None:
    if not recorded:
        return
    done = sum(s.num_samples for s in kept)
    extra = ""
    if len(kept) < len(recorded):  # shards are kept up to the first bad one: the rest follow it
        extra = (f"; rewriting the other {plural(len(recorded) - len(kept), 'recorded shard')} "
                 f"({recorded[len(kept)].name} is missing or failed its size/sha256 check)")  # fmt: skip
    note(f"resuming the interrupted {split} sharding in {out}: kept {plural(len(kept), 'finished shard')} "
         f"({done} of {total} samples){extra}")  # fmt: skip


def finish_folder(out: Path, plan: Plan, shards: list[ShardInfo]) -> None:
    """Delete the replaced shards the new dataset did not rewrite; name unlisted files left."""
    written = {s.name for s in shards}
    for name in plan.replaced:
        if name not in written:
            (out / name).unlink(missing_ok=True)
    overwritten = [name for name in plan.foreign if name in written]
    if overwritten:
        note(f"note: overwrote {plural(len(overwritten), 'file')} in {out} that no manifest or shard state "
             f"listed (--overwrite): {', '.join(overwritten)}")  # fmt: skip
    left = [name for name in plan.foreign if name not in written]
    if left:
        note(f"note: left {plural(len(left), 'file')} in {out} that no manifest or shard state listed "
             f"(not part of the new dataset): {', '.join(left)}")  # fmt: skip
