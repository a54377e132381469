"""Local pretrained backbone weights: reading a .safetensors or torch file (recognised by
its first bytes), unwrapping ``{"model": ...}``-style nesting, mapping the classifier's
keys onto timm's ``features_only`` model and one-line errors for every way a file can be
wrong (missing, damaged, another architecture, another size). No hub at run time.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from data_pipeline.shard_state import plural

logger = logging.getLogger(__name__)

# Keys a checkpoint may wrap its state dict in (training checkpoints, DeepSpeed/mmcv
# exports); unwrapped until a flat name -> tensor mapping remains.
_NESTING_KEYS = ("model", "state_dict", "module")
# Buffers that some exporters drop; they are bookkeeping, not weights.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
_SHOW = 3  # how many offending keys an error message names
# timm's features wrappers flatten ``layers.0`` into ``layers_0``.
_FLATTENED = re.compile(r"^([a-z]+)_(\d+)\.")
_ORIGINAL_SWIN_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def _file_format(path: str) -> str:
    """``"safetensors"``, ``"torch"`` or ``""`` from the file's first bytes, not its name:
    .pth/.pt/.bin/.ckpt are all torch's, and a renamed file still loads."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: a u64 header length, then its JSON
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch's zip format, or a legacy pickle
        return "torch"
    return ""


def _read_file(path: str, kind: str, shapes_only: bool) -> Any:
    if kind == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not shapes_only:
            return load_file(path, device="cpu")
        with safe_open(path, framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    # weights_only: a checkpoint is data, never code to execute. mmap needs torch's zip
    # format; an older file is read whole.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=shapes_only)
    except RuntimeError:
        if not shapes_only:
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str, shapes_only: bool = False) -> dict[str, Tensor]:
    """Read a .safetensors or torch (.pth/.pt/.bin) file and unwrap ``{"model": ...}``-style
    nesting. ``shapes_only``: tensors with the right shapes whose values are not read
    (``meta`` tensors, or a memory map of a torch file), to check a 1 GB file in a moment.
    An unreadable file is a one-line ValueError naming it (the readers' own errors are
    tracebacks of many lines that do not say which file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.backbone.pretrained_path: no such file: {path}")
    where = f"model.backbone.pretrained_path: {path} ({os.path.getsize(path):,} bytes)"
    kind = _file_format(path)
    if not kind:
        raise ValueError(f"{where} is neither a torch checkpoint (torch.save) nor a .safetensors file")
    try:
        state = _read_file(path, kind, shapes_only)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise ValueError(f"{where} is a damaged torch file (truncated download or copy?): {err}") from err
        found = re.search(r"GLOBAL ([\w.]+)", str(err))  # torch's own message is many lines
        raise ValueError(
            f"{where} pickles Python objects besides tensors{f' ({found.group(1)})' if found else ''}, which "
            "torch.load(weights_only=True) refuses; re-save just its state dict or convert it to .safetensors"
        ) from err
    except MemoryError:
        raise
    except Exception as err:  # a damaged file fails anywhere: EOFError, KeyError, zip or header errors
        reason = str(err).split(". ")[0] or type(err).__name__
        raise ValueError(f"{where} cannot be read as a {kind} file (truncated download or copy?): {reason}") from err
    while isinstance(state, Mapping):
        nested = [k for k in _NESTING_KEYS if isinstance(state.get(k), Mapping)]
        if not nested:
            break
        state = state[nested[0]]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        held = f"keys {', '.join(map(str, list(state)[:6]))}" if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"{where} does not hold a state dict of tensors (it holds {held}; a state dict is "
                         f"read at the top level or under {' / '.join(map(repr, _NESTING_KEYS))})")
    # Strip the "module." prefix of DataParallel/DDP exports.
    return {k.removeprefix("module."): v for k, v in state.items()}


def _swin_from_original(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Microsoft's Swin checkpoints end each stage with its patch merging
    (``layers.0.downsample``); timm starts the next stage with it (``layers.1.downsample``),
    with the same weights and the same order of the merged patches. Other files pass."""
    if not any(k.startswith("layers.0.downsample.") for k in state):
        return state
    return {_ORIGINAL_SWIN_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k): v
            for k, v in state.items()}


def _file_key(key: str) -> str:
    """A features-model key as the classifier's file names it (``layers_1.x`` -> ``layers.1.x``,
    ViT's ``model.x`` -> ``x``), so that an error names keys the user can find in the file."""
    return _FLATTENED.sub(r"\1.\2.", key.removeprefix("model."))


def match_pretrained(body: nn.Module, path: str, shapes_only: bool = False) -> tuple[dict[str, Tensor], int]:
    """The timm-format weights in ``path`` keyed as the features-only model ``body``'s state
    dict, and the number of the file's keys left unused. ``body`` may live on the ``meta``
    device: only its keys and shapes are read; with ``shapes_only`` only the file's (the
    driver checks a file this way before a run starts).

    The file may hold the full classification model: keys of the pruned head (and, for
    ViTs, of the blocks after the one read and the final norm) are ignored, and the
    renamings of timm's features wrappers are undone: ``flatten_sequential``
    (``layers.0.x`` -> ``layers_0.x``, Swin) and the ``model.`` prefix of the wrapper
    around ViTs. Every weight of ``body`` must be present with the same shape; otherwise a
    one-line ValueError names the file and the first offending keys. (The ViT pyramid and
    Swin's output norms are new layers, outside ``body``, and start from their init.)
    Microsoft's original Swin checkpoints (the ones MaskFormer's instructions download)
    load too: see ``_swin_from_original``.
    """
    source = _swin_from_original(read_state_dict(path, shapes_only))
    target = body.state_dict()
    mapped: dict[str, Tensor] = {}
    for key, value in source.items():
        for candidate in (key, key.replace(".", "_", 1), f"model.{key}"):
            if candidate in target:
                mapped[candidate] = value
                break
        # else: classifier head / final norm / pruned blocks of the full model

    missing = [k for k in target if k not in mapped and not k.endswith(_OPTIONAL_SUFFIXES)]
    mismatched = [
        f"{_file_key(k)} {tuple(mapped[k].shape)} vs {tuple(target[k].shape)}"
        for k in target
        if k in mapped and mapped[k].shape != target[k].shape
    ]
    where = f"model.backbone.pretrained_path: {path} does not fit the backbone"
    arch = getattr(body, "pretrained_cfg", {}).get("architecture", "this")
    if not mapped:
        # No key in common: the weights of another architecture (a ResNet file for a Swin preset).
        raise ValueError(
            f"{where}: no tensor name in common with timm's {arch!r} ({plural(len(source), 'tensor')}, first keys: "
            f"{', '.join([k for k in source if not k.endswith(_OPTIONAL_SUFFIXES)][:_SHOW])}; expected: "
            f"{', '.join(map(_file_key, missing[:_SHOW]))}): "
            "weights of another model? model.backbone.name must name the file's architecture"
        )
    if missing or mismatched:
        problems = []
        if missing:
            first = ", ".join(map(_file_key, missing[:_SHOW]))
            problems.append(f"{plural(len(missing), 'missing key')} (first: {first})")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches file vs model (first: {'; '.join(mismatched[:_SHOW])}; "
                            f"another width, depth or window size than timm's {arch!r}?)")
        raise ValueError(f"{where}: " + "; ".join(problems))
    return mapped, len(source) - len(mapped)


def load_pretrained(body: nn.Module, path: str) -> None:
    """Load the weights in ``path`` into ``body`` (``match_pretrained`` checks them first)."""
    mapped, unused = match_pretrained(body, path)
    body.load_state_dict(mapped, strict=False)  # strict checks done above, with better messages
    logger.info("loaded %d backbone tensors from %s (%d unused keys)", len(mapped), path, unused)
