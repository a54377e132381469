"""timm backbone as a feature pyramid: a list of NCHW maps at increasing strides (4/8/16/32).

Everything timm-specific lives here: building the ``features_only`` model, converting
NHWC outputs (Swin, MambaOut, ...) to NCHW, activation checkpointing and loading local
pretrained weights. The rest of the model only sees ``channels``, ``strides`` and a list
of NCHW tensors.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import ops.torchvision_fix  # noqa: F401  (must run before timm imports torchvision)

# isort: split
import timm
import torch
from torch import Tensor, nn

from model.config import BackboneConfig

logger = logging.getLogger(__name__)

# Keys a checkpoint may wrap its state dict in (training checkpoints, DeepSpeed/mmcv
# exports); unwrapped until a flat name -> tensor mapping remains.
_NESTING_KEYS = ("model", "state_dict", "module")
# Buffers that some exporters drop; they are bookkeeping, not weights.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
_SHOW = 3  # how many offending keys an error message names


class Backbone(nn.Module):
    """``forward(x: B×3×H×W) -> [B×C_i×H/s_i×W/s_i for each out index]``, strides increasing."""

    def __init__(
        self,
        name: str,
        out_indices: Sequence[int] = (1, 2, 3, 4),
        pretrained_path: str = "",
        grad_checkpointing: bool = False,
        timm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        try:
            # pretrained=False: weights never come from a hub at run time, only from
            # ``pretrained_path`` (clusters often have no internet, and runs must be
            # reproducible from local files).
            self.body = timm.create_model(
                name, pretrained=False, features_only=True, out_indices=tuple(out_indices), **dict(timm_kwargs or {})
            )
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ValueError(f"model.backbone.name={name!r} is not a timm model (see timm.list_models())") from None
            raise
        except TypeError as err:
            if "unexpected keyword argument" in str(err):
                raise ValueError(f"model.backbone.timm_kwargs: {err}") from None
            raise
        except IndexError:
            # timm fails deep inside with "list index out of range".
            raise ValueError(
                f"model.backbone.out_indices={list(out_indices)} is out of range for {name!r} "
                "(ResNets have levels 0-4 with 0 at stride 2; Swin/ConvNeXt have 0-3 starting at stride 4)"
            ) from None
        info = self.body.feature_info
        self.channels: list[int] = list(info.channels())
        self.strides: list[int] = list(info.reduction())
        if any(b <= a for a, b in zip(self.strides, self.strides[1:])):
            # e.g. plain ViTs: every block is at stride 16 and needs a simple feature
            # pyramid (ViTDet) in front of the pixel decoder — not implemented yet.
            raise ValueError(
                f"model.backbone: {name!r} with out_indices={list(out_indices)} gives strides {self.strides}; "
                "the pixel decoder needs strictly increasing strides (e.g. 4/8/16/32)"
            )
        # Some timm feature wrappers report their layout (Swin: NHWC); others are NCHW.
        # (timm's Format is a str enum, so it compares equal to its value.)
        self.nhwc = getattr(self.body, "output_fmt", "NCHW") == "NHWC"
        if grad_checkpointing:
            self.set_grad_checkpointing(True)
        if pretrained_path:
            load_pretrained(self.body, pretrained_path)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # timm's feature wrappers checkpoint stage by stage (non-reentrant by default,
        # see DESIGN.md on ZeRO-3); features-only ViTs keep the switch on the inner model.
        target = self.body if hasattr(self.body, "set_grad_checkpointing") else getattr(self.body, "model", None)
        if target is None or not hasattr(target, "set_grad_checkpointing"):
            raise ValueError(f"model.backbone.grad_checkpointing: timm model {self.name!r} does not support it")
        target.set_grad_checkpointing(enable)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = self.body(x)
        if self.nhwc:
            # The one place layouts are reconciled; contiguous so later convs get the
            # fast NCHW kernels instead of strided views.
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        return list(features)


def build_backbone(cfg: BackboneConfig) -> Backbone:
    return Backbone(
        cfg.name,
        out_indices=cfg.out_indices,
        pretrained_path=cfg.pretrained_path,
        grad_checkpointing=cfg.grad_checkpointing,
        timm_kwargs=cfg.timm_kwargs,
    )


# ---------------------------------------------------------------------------------------
# Local pretrained weights


def read_state_dict(path: str) -> dict[str, Tensor]:
    """Read a .safetensors / .pth / .pt file and unwrap ``{"model": ...}``-style nesting."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.backbone.pretrained_path: no such file: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state: Any = load_file(path, device="cpu")
    else:
        try:
            # weights_only: a checkpoint is data, never code to execute.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # torch's own message is many lines about trusting the source.
            raise ValueError(
                f"model.backbone.pretrained_path: {path} pickles Python objects besides tensors, which "
                "torch.load(weights_only=True) refuses; re-save just its state dict or convert it to .safetensors"
            ) from None
    while isinstance(state, Mapping):
        nested = [k for k in _NESTING_KEYS if isinstance(state.get(k), Mapping)]
        if not nested:
            break
        state = state[nested[0]]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"model.backbone.pretrained_path: {path} does not hold a state dict of tensors")
    # Strip the "module." prefix of DataParallel/DDP exports.
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(body: nn.Module, path: str) -> None:
    """Load the timm-format weights in ``path`` into the features-only model ``body``.

    The file may hold the full classification model: keys of the pruned head are ignored,
    and timm's ``flatten_sequential`` renaming (``layers.0.x`` -> ``layers_0.x``) is
    undone. Every weight of ``body`` must be present with the same shape; otherwise a
    one-line ValueError names the file and the first offending keys.
    """
    source = read_state_dict(path)
    target = body.state_dict()
    mapped: dict[str, Tensor] = {}
    for key, value in source.items():
        if key not in target:
            flat = key.replace(".", "_", 1)
            if flat not in target:
                continue  # classifier head / final norm of the full model
            key = flat
        mapped[key] = value

    missing = [k for k in target if k not in mapped and not k.endswith(_OPTIONAL_SUFFIXES)]
    mismatched = [
        f"{k} {tuple(mapped[k].shape)} vs {tuple(target[k].shape)}"
        for k in target
        if k in mapped and mapped[k].shape != target[k].shape
    ]
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:_SHOW])})")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches file vs model (first: {'; '.join(mismatched[:_SHOW])})")
        raise ValueError(f"model.backbone.pretrained_path: {path} does not fit the backbone: " + "; ".join(problems))
    body.load_state_dict(mapped, strict=False)  # strict checks done above, with better messages
    logger.info("loaded %d backbone tensors from %s (%d unused keys)", len(mapped), path, len(source) - len(mapped))
