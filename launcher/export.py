"""``python -m launcher export``: a checkpoint's consolidated fp32 weights as safetensors.

Whatever the ZeRO stage the run trained with, the file holds the whole model in fp32
(``launcher.checkpoint.load_model_weights`` merges the partitions), plus the resolved
run config and the step in the file's metadata, so ``build_model`` can rebuild the
model for it without the run folder.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from launcher.checkpoint import load_model_weights, read_meta, resolve_checkpoint
from ops.atomic_file import PUBLISHED_FILE_MODE


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights, views): copy those."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        shared = key in seen or not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes
        seen.add(key)
        out[name] = tensor.contiguous().clone() if shared else tensor
    return out


def export_weights(checkpoint: str, out: str) -> tuple[str, int, int]:
    """Write the weights of ``checkpoint`` (a checkpoint or run folder) to ``out``;
    returns (checkpoint folder, tensors, parameters)."""
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder; give a file name, e.g. {os.path.join(out, 'model.safetensors')}")
    directory = resolve_checkpoint(checkpoint)
    meta = read_meta(directory)
    state = _unshared(load_model_weights(directory))
    metadata = {"format": "pt", "segscale_step": str(meta.step), "segscale_config": json.dumps(meta.config)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    partial = f"{out}.partial"
    try:
        save_file(state, partial, metadata=metadata)
        os.chmod(partial, PUBLISHED_FILE_MODE)  # safetensors creates it 0600: readable by its writer only
        os.replace(partial, out)  # a reader never sees a half-written file
    except BaseException:  # a full disk or Ctrl-C: leave no stray .partial beside the output
        if os.path.exists(partial):
            os.remove(partial)
        raise
    return directory, len(state), sum(t.numel() for t in state.values())


def export_command(checkpoint: str, out: str) -> int:
    directory, tensors, params = export_weights(checkpoint, out)
    size = os.path.getsize(out) / 2**20
    print(f"wrote {tensors} tensors ({params / 1e6:.2f} M values, fp32, {size:.1f} MiB) from {directory} to {out}")
    return 0
