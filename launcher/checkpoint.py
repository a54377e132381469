"""Checkpoint layout, verification and weight consolidation.

A checkpoint is one folder (Ray Train merges every rank's files into it)::

    checkpoint_.../
      deepspeed/state/...          DeepSpeed engine state (all ranks' ZeRO shards)
      data_position_rank_<r>.json  rank r's training-stream position
      rng_state_rank_<r>.pt        rank r's Python/NumPy/torch generator states
      files_rank_<r>.json          what rank r wrote, with byte sizes
      segscale_checkpoint.json     written by rank 0: step, world size, resolved config

Each rank lists its own files after DeepSpeed has written them, so a checkpoint is
*verified* when the meta file exists and every rank's list matches what is on disk. A
folder cut short by a crash fails verification and is never picked for a resume or an
evaluation.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch

from launcher.progress import plural
from launcher.rng import save_rng_state
from ops.atomic_file import write_json_atomic

META_FILE = "segscale_checkpoint.json"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the folder."""


@dataclass
class CheckpointMeta:
    step: int
    world_size: int
    zero_stage: int
    config: dict
    # The training stream's position (data_pipeline.train_stream.LoaderPosition as JSON);
    # None in checkpoints written before exact loader resume.
    data_position: dict | None = None
    # How many times the run had been resumed when this checkpoint was written.
    resumes: int = 0
    # The run's latest validation when this checkpoint was written (semantic runs): its
    # step and mIoU, so that a run which reached train.target_miou is known complete
    # without starting Ray. None in checkpoints written before it was recorded.
    val_step: int | None = None
    val_miou: float | None = None


def _list_files(root: str) -> dict[str, int]:
    files = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            files[os.path.relpath(path, root)] = os.path.getsize(path)
    return files


def data_position_file(rank: int) -> str:
    return f"data_position_rank_{rank}.json"


def staging_path(run_dir: str, rank: int) -> str:
    """This rank's local folder for the checkpoint it writes before Ray copies it to the
    run folder. Its name is fixed per run and rank, not a fresh temporary folder, because
    a worker killed mid-save (SIGKILL: no cleanup) would leak a whole copy of its shards
    per failure; its successor reuses and empties it."""
    run_id = hashlib.sha1(run_dir.encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"segscale-ckpt-{run_id}-rank{rank}")


@contextmanager
def staging_directory(run_dir: str, rank: int) -> Iterator[str]:
    """``staging_path``, emptied first and removed after."""
    path = staging_path(run_dir, rank)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    engine,
    directory: str,
    *,
    step: int,
    rank: int,
    world_size: int,
    config: dict,
    data_position: dict | None = None,
    resumes: int = 0,
    validation: tuple[int, float] | None = None,
    before_seal: Callable[[], None] | None = None,
) -> int:
    """Every rank calls this with its own (empty) ``directory``; DeepSpeed's save is collective.

    ``validation``: the (step, mIoU) of the run's latest validation, if any. Returns the
    bytes this rank wrote. ``before_seal`` runs after the state is written
    and before the file list that makes the checkpoint valid (fault-injection tests).
    """
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    os.makedirs(directory, exist_ok=True)
    # The universal-checkpoint info lets ds_to_universal convert ZeRO-1/2 checkpoints for
    # a resume on a different number of workers.
    client_state = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(os.path.join(directory, DEEPSPEED_DIR), tag=DEEPSPEED_TAG, client_state=client_state,
                           save_latest=True)
    if data_position is not None:
        # Every rank's own stream position (its workers' places differ from rank 0's).
        write_json_atomic(os.path.join(directory, data_position_file(rank)), data_position)
    save_rng_state(directory, rank)
    if before_seal is not None:
        before_seal()
    # This rank's directory holds only its own files, so the listing is exactly its share.
    files = _list_files(directory)
    write_json_atomic(os.path.join(directory, f"files_rank_{rank}.json"), files)
    if rank == 0:
        meta = {"step": step, "world_size": world_size, "zero_stage": engine.zero_optimization_stage(),
                "config": config, "data_position": data_position, "resumes": resumes}
        if validation is not None:
            meta["val_step"], meta["val_miou"] = validation
        write_json_atomic(os.path.join(directory, META_FILE), meta)
    return sum(files.values())


def _optional(value, kind):
    return None if value is None else kind(value)


def read_meta(directory: str) -> CheckpointMeta:
    path = os.path.join(directory, META_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
        return CheckpointMeta(step=int(data["step"]), world_size=int(data["world_size"]),
                              zero_stage=int(data["zero_stage"]), config=data["config"],
                              data_position=data.get("data_position"), resumes=int(data.get("resumes", 0)),
                              val_step=_optional(data.get("val_step"), int),
                              val_miou=_optional(data.get("val_miou"), float))
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"{directory}: not a segscale checkpoint ({META_FILE} missing)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({err})") from None


def verify_checkpoint(directory: str) -> CheckpointMeta:
    """Return the checkpoint's metadata, or raise CheckpointError naming what is missing."""
    meta = read_meta(directory)
    for rank in range(meta.world_size):
        listing = os.path.join(directory, f"files_rank_{rank}.json")
        try:
            with open(listing) as f:
                files = json.load(f)
        except (FileNotFoundError, ValueError):
            raise CheckpointError(f"{directory}: incomplete checkpoint, rank {rank}'s file list is missing") from None
        for rel, size in files.items():
            path = os.path.join(directory, rel)
            if not os.path.exists(path) or os.path.getsize(path) != size:
                raise CheckpointError(f"{directory}: incomplete checkpoint, {rel} is missing or truncated")
    return meta


def find_latest_checkpoint(run_dir: str) -> str | None:
    """The newest *verified* checkpoint folder of a run, or None."""
    best: tuple[int, str] | None = None
    for directory in glob.glob(os.path.join(run_dir, "checkpoint_*")):
        if not os.path.isdir(directory):  # e.g. Ray's checkpoint_manager_snapshot.json
            continue
        try:
            meta = verify_checkpoint(directory)
        except CheckpointError:
            continue
        if best is None or meta.step > best[0]:
            best = (meta.step, directory)
    return best[1] if best else None


def damaged_checkpoints(run_dir: str) -> list[tuple[str, CheckpointError, bool]]:
    """The run's checkpoint folders that fail verification, oldest first (names sort by
    time), each with why and whether it had been *sealed* (metadata and every rank's file
    list written): a sealed one was complete once and lost or cut a file since, where an
    unsealed one is what a crash in the middle of a save leaves."""
    found = []
    for directory in sorted(glob.glob(os.path.join(run_dir, "checkpoint_*"))):
        if not os.path.isdir(directory):
            continue
        try:
            verify_checkpoint(directory)
        except CheckpointError as err:
            try:
                meta = read_meta(directory)
                sealed = all(os.path.isfile(os.path.join(directory, f"files_rank_{r}.json"))
                             for r in range(meta.world_size))
            except CheckpointError:
                sealed = False
            found.append((directory, err, sealed))
    return found


# Ray Train's record of the checkpoints it keeps (and deletes beyond num_to_keep).
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


def prune_untracked_checkpoints(run_dir: str) -> list[tuple[str, int]]:
    """Delete the run's checkpoints that Ray Train does not track and that a checkpoint it
    tracks supersedes; returns them as (folder, step).

    A checkpoint written just before a worker failed can miss Ray's record: the resumed
    run starts from it (``find_latest_checkpoint``), but Ray never counts it against
    ``train.keep_checkpoints`` and so never deletes it — one more folder per failure.
    Once a newer checkpoint is in Ray's record the untracked one is redundant. Checkpoints
    newer than every tracked one are kept: they are where the run resumes."""
    try:
        with open(os.path.join(run_dir, RAY_CHECKPOINT_SNAPSHOT)) as f:
            snapshot = json.load(f)
        tracked = {entry["checkpoint_dir_name"] for entry in snapshot["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return []  # no record (yet) or another Ray's format: leave everything
    steps = {}
    for directory in glob.glob(os.path.join(run_dir, "checkpoint_*")):
        if os.path.isdir(directory):
            with suppress(CheckpointError):
                steps[os.path.basename(directory)] = verify_checkpoint(directory).step
    newest_tracked = max((steps[name] for name in tracked if name in steps), default=None)
    if newest_tracked is None:
        return []
    pruned = []
    for name, step in sorted(steps.items(), key=lambda item: item[1]):
        if name not in tracked and step < newest_tracked:
            shutil.rmtree(os.path.join(run_dir, name))
            pruned.append((os.path.join(run_dir, name), step))
    return pruned


def newest_verified_checkpoint(candidates) -> str | None:
    """The newest verified checkpoint among folder paths (None entries ignored); a
    candidate that fails verification is skipped with a warning naming it."""
    best: tuple[int, str] | None = None
    for directory in filter(None, candidates):
        try:
            step = verify_checkpoint(directory).step
        except CheckpointError as err:
            print(f"warning: skipping checkpoint: {err}", flush=True)
            continue
        if best is None or step > best[0]:
            best = (step, directory)
    return best[1] if best else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder as given, or a run folder's latest verified checkpoint; where
    there is none, the error says why (a file given for a folder, a checkpoint whose
    metadata rank 0 never wrote, a run folder whose newest checkpoint fails verification)."""
    if os.path.isfile(path):
        raise CheckpointError(f"{path}: is a file; expected a checkpoint folder (checkpoint_*/, with {META_FILE}) "
                              "or a run folder")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    if os.path.exists(os.path.join(path, META_FILE)):
        return path
    if os.path.isdir(os.path.join(path, DEEPSPEED_DIR)) or glob.glob(os.path.join(path, "files_rank_*.json")):
        raise CheckpointError(f"{path}: incomplete checkpoint, {META_FILE} is missing (rank 0 never finished "
                              "saving it); use an earlier checkpoint of the run")
    latest = find_latest_checkpoint(path)
    if latest is not None:
        return latest
    folders = sorted(d for d in glob.glob(os.path.join(path, "checkpoint_*")) if os.path.isdir(d))
    if not folders:
        raise CheckpointError(f"{path}: no checkpoint here: not a checkpoint folder ({META_FILE} missing) and no "
                              "checkpoint_* folders in it (a run that has not saved one yet?)")
    try:  # names sort by time: the newest one's problem is the likely question
        verify_checkpoint(folders[-1])
    except CheckpointError as err:
        raise CheckpointError(f"{path}: no verified checkpoint in this run folder (of "
                              f"{plural(len(folders), 'checkpoint folder')}, the newest: {err})") from None
    raise CheckpointError(f"{path}: no verified checkpoint in this run folder")


def load_model_weights(directory: str) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of the model in a verified checkpoint (any ZeRO stage).
    A weights file of the listed size whose bytes are damaged is a CheckpointError."""
    meta = verify_checkpoint(directory)
    ds_dir = os.path.join(directory, DEEPSPEED_DIR)
    try:
        if meta.zero_stage < 3:
            # Below ZeRO-3 rank 0's model-states file holds the whole module (fp32 under
            # torch_autocast), which is far cheaper than merging optimizer partitions.
            path = os.path.join(ds_dir, DEEPSPEED_TAG, "mp_rank_00_model_states.pt")
            state = torch.load(path, map_location="cpu", weights_only=False)
            return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag=DEEPSPEED_TAG)
    except (RuntimeError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as err:
        if _out_of_memory(err):  # the file may be fine: say what happened, not "damaged"
            raise CheckpointError(f"{directory}: not enough memory to load the model weights "
                                  f"({str(err).strip().splitlines()[0]})") from err
        # torch's messages run on for several sentences: the first names the problem.
        reason = str(err).strip().split(". ")[0] or type(err).__name__
        raise CheckpointError(f"{directory}: cannot read the model weights under {DEEPSPEED_DIR}/ ({reason}): a damaged "
                              "file, or one another torch or DeepSpeed wrote; use another checkpoint") from err


def _out_of_memory(err: BaseException) -> bool:
    """torch reports an allocation that failed as a RuntimeError too: on CPU with this
    message, on a GPU as its OutOfMemoryError subclass."""
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)
