"""``python -m launcher describe``: parameter counts per component and training memory per worker.

Counting needs shapes only, so the model is built on the ``meta`` device (Swin-L in well
under a second, no weights allocated, ``pretrained_path`` ignored).

The memory estimate per worker is the sum of

- parameters, gradients and AdamW states: exact byte counts from the parameter count,
  divided as DeepSpeed's ZeRO stage partitions them over ``cluster.num_workers``
  (stage >= 1: optimizer states and gradients, 3: parameters). ZeRO-1 does not partition
  gradients by definition, but DeepSpeed 0.19 reduces them into each worker's partition,
  bucket by bucket, during the backward pass of a gradient-accumulation boundary: with
  ``train.grad_accum_steps: 1`` (every step a boundary) stage 1 holds what stage 2 does
  (measured by ``benchmarks/zero_stages.py``: within 1 %); with more micro-steps it keeps
  whole gradients between them, and they are counted whole. The bucket in flight is one
  of the DeepSpeed buffers the total leaves out. bf16 autocast keeps
  fp32 weights and gradients; fp16 keeps 16-bit weights and gradients plus an fp32
  master copy. DeepSpeed's ZeRO-1/2 optimizer keeps its own fp32 copy of its partition
  even of an fp32 model (``single_partition_of_fp32_groups``), so stages 1 and 2 hold
  12 bytes per parameter (copy + two moments) where plain AdamW holds 8; at stage 3 the
  fp32 partitions serve as the master weights (``launcher.engine``). Frozen weights
  (FrozenBN's affine, kept as buffers) count in the total and as weights, whole on every
  worker, with no gradient or optimizer state;
- activations: *measured*. One training forward runs at the config's crop and per-worker
  batch under ``FakeTensorMode`` (tensors with shapes and dtypes but no data, so nothing
  is computed or allocated), with the config's autocast, and the storages autograd saves
  for the backward pass are added up, parameters and buffers excluded (autocast's 16-bit weight
  copies included, as they are kept too). Activation checkpointing shows up as what it
  saves. Attention kernels are traced as this machine's torch picks them; timm's Swin
  uses plain matmul + softmax attention by default (its fused path is "experimental"),
  so its per-window attention maps are a large share of the total on any device;
- recompute: under activation checkpointing, the largest checkpointed segment's
  activations, *measured* the same way: the backward pass rebuilds them one segment at
  a time;
- loss activations: *measured* by running the real criterion on stand-in predictions at
  two small sizes and extrapolating linearly in pixels (the full-resolution mask losses
  grow with H×W), assuming ``MASKS_PER_IMAGE`` ground-truth masks per image unless told
  otherwise (``describe --masks-per-image N``: the loss's saved tensors grow with it).

Not included: the transient peak inside the backward pass (one op's temporaries and
activation gradients), the matcher's no-grad cost matrices, allocator fragmentation, the
CUDA context, and DeepSpeed's communication buckets (``train.zero_bucket_elements``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import ops.torchvision_fix  # noqa: F401  (before anything imports timm)

# isort: split
import torch
import torch.utils.checkpoint
from timm.models import checkpoint as timm_checkpoint
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from launcher.config import RunConfig, load_config
from launcher.loss_memory import MASKS_PER_IMAGE, measure_loss_activations
from launcher.saved_tensors import SavedTensors
from model.build import build_meta_model
from ops.recompute import checkpointed_per_sample
from ops.weight_recast import recast_applies

_GIB = 2**30


def _named_weights(module: nn.Module, recurse: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters, and the frozen ones kept as buffers: a buffer named ``weight`` or
    ``bias`` (FrozenBN's affine, ``model.backbone.freeze_bn``) is a weight that is not
    trained. The papers' counts include it; running statistics are not weights."""
    yield from module.named_parameters(recurse=recurse)
    for name, buffer in module.named_buffers(recurse=recurse):
        if name.rpartition(".")[2] in ("weight", "bias"):
            yield name, buffer


def _weights(module: nn.Module) -> Iterator[torch.Tensor]:
    return (weight for _, weight in _named_weights(module))


def count_parameters(model: nn.Module) -> dict[str, Any]:
    """Total (all weights, frozen ones too) / trainable counts, per top-level child, and
    per child of each child."""
    seen: set[int] = set()

    def count(module: nn.Module) -> int:
        n = 0
        for p in _weights(module):
            if id(p) not in seen:  # a shared weight counts once, in its first owner
                seen.add(id(p))
                n += p.numel()
        return n

    components: dict[str, int] = {}
    details: dict[str, dict[str, int]] = {}
    for name, child in model.named_children():
        parts = {sub_name: count(sub) for sub_name, sub in child.named_children()}
        components[name] = sum(parts.values()) + count(child)  # + its own direct weights
        details[name] = {k: v for k, v in parts.items() if v}
    # Weights registered on the model itself (UN-EPT's query grid), each under its own name.
    for name, weight in _named_weights(model, recurse=False):
        if id(weight) not in seen:
            seen.add(id(weight))
            components[name] = weight.numel()
    total = sum(p.numel() for p in {id(p): p for p in _weights(model)}.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "components": components, "details": details}


def state_bytes(
    params: int, trainable: int, zero_stage: int, num_workers: int, precision: str, grad_accum_steps: int = 1
) -> dict[str, float]:
    """Bytes per worker of weights, gradients and AdamW states (see the module docstring)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"train.zero_stage: expected 0, 1, 2 or 3, got {zero_stage}")
    if num_workers < 1:
        raise ValueError(f"cluster.num_workers must be >= 1, got {num_workers}")
    low = precision == "fp16"
    weight_size = 2 if low else 4
    optimizer_size = 12 if (low or zero_stage in (1, 2)) else 8
    # ZeRO-1 accumulates whole gradients over the micro-steps and reduces them into the
    # partitions at the last one; with a single micro-step that is the backward pass itself.
    partitioned_gradients = zero_stage >= 2 or (zero_stage == 1 and grad_accum_steps == 1)
    # Frozen weights (FrozenBN's affine are buffers) stay whole on every worker: ZeRO-3
    # partitions parameters, not buffers.
    return {
        "parameters": (trainable / (num_workers if zero_stage >= 3 else 1) + params - trainable) * weight_size,
        "gradients": trainable * weight_size / (num_workers if partitioned_gradients else 1),
        "optimizer": trainable * optimizer_size / (num_workers if zero_stage >= 1 else 1),
    }


def _autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


# Keyword arguments of torch's / timm's checkpoint functions themselves; any others go to
# the checkpointed function (torch's non-reentrant mode forwards them).
_CHECKPOINT_OPTIONS = frozenset({"use_reentrant", "preserve_rng_state", "context_fn", "determinism_check", "debug"})


def _checkpoint_aliases() -> list[tuple[Any, str, Callable]]:
    """(module, attribute, function) for every loaded module attribute holding torch's
    ``checkpoint`` or timm's wrapper of it.

    timm's ``checkpoint_seq`` and its wrapper call ``torch.utils.checkpoint.checkpoint``
    through the module attribute, but timm's features wrapper and ViTs import the wrapper
    by name, and any module may ``from torch.utils.checkpoint import checkpoint``; patching
    one attribute would miss those. Finding every alias keeps the spy right whatever a
    module (timm's, ours, or a future one) imported.
    """
    functions = (torch.utils.checkpoint.checkpoint, timm_checkpoint, checkpointed_per_sample)
    aliases = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attribute, value in list(namespace.items()):
            for function in functions:
                if value is function:
                    aliases.append((module, attribute, function))
    return aliases


@contextlib.contextmanager
def _largest_checkpointed_segment(exclude: Sequence[torch.Tensor]) -> Iterator[list[int]]:
    """Measure what the backward pass recomputes under activation checkpointing.

    A checkpointed segment keeps only its inputs (torch saves them through the hooks, so
    the caller's count includes them); the backward pass rebuilds its activations one
    segment at a time. The yielded list's one element becomes the largest segment's
    saved bytes. Every alias of torch's and timm's checkpoint function and of
    ``checkpointed_per_sample`` (whose segments are rebuilt one sample at a time, so one
    sample's is measured) is patched (see ``_checkpoint_aliases``), so backbone and decoder
    segments are all seen; a checkpoint called while one is being measured (timm's
    wrapper calling torch's) passes straight through, so a segment is counted once.
    """
    largest = [0]
    inside = [False]

    def measure(function: Callable, *args: Any, **kwargs: Any) -> None:
        inside[0] = True
        try:
            segment = SavedTensors(exclude)
            with segment.hooks():  # innermost hooks win: they see the whole segment
                function(*args, **kwargs)  # fake tensors: a trace, not a computation
            largest[0] = max(largest[0], segment.total)
        finally:
            inside[0] = False

    def spy(original: Callable) -> Callable:
        def checkpoint(function: Callable, *args: Any, **kwargs: Any) -> Any:
            if not inside[0]:
                measure(function, *args, **{k: v for k, v in kwargs.items() if k not in _CHECKPOINT_OPTIONS})
            return original(function, *args, **kwargs)

        def per_sample(enabled: bool, function: Callable, *args: Any, parameters: Sequence[torch.Tensor]) -> Any:
            if enabled and torch.is_grad_enabled() and not inside[0]:
                measure(function, *(a[:1] if isinstance(a, torch.Tensor) else a for a in args))
            return original(enabled, function, *args, parameters=parameters)

        return per_sample if original is checkpointed_per_sample else checkpoint

    spies: dict[int, Callable] = {}
    with contextlib.ExitStack() as stack:
        for module, attribute, function in _checkpoint_aliases():
            replacement = spies.setdefault(id(function), spy(function))
            stack.enter_context(mock.patch.object(module, attribute, replacement))
        yield largest


class _DeformAttnStandIn(torch.autograd.Function):
    """Shapes-only stand-in for ``ops.ms_deform_attn.ms_deform_attn`` in the fake trace: the
    real implementations read the level layout (``spatial_shapes``) as Python ints, which
    fake tensors do not have. It saves what the lean implementation saves: its inputs."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(value, locations, weights)
        batch, queries, heads = weights.shape[:3]
        return value.new_empty(batch, queries, heads * value.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros_like(t) for t in ctx.saved_tensors)


def _deform_attn_stand_in(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                          locations: torch.Tensor, weights: torch.Tensor, implementation: str = "auto") -> torch.Tensor:
    return _DeformAttnStandIn.apply(value, locations, weights)


def measure_activations(
    model: nn.Module, batch_size: int, crop_size: int, precision: str, recast_weights: bool = False
) -> tuple[int, int, dict]:
    """Bytes saved for backward by one training forward of the meta-built ``model``, the
    largest checkpointed segment's bytes (recomputed during backward; 0 without
    checkpointing), and the outputs (fake tensors). Moves ``model`` to fake tensors.
    ``recast_weights``: the forward runs as the train loop's does in bf16 below ZeRO-3,
    saving no bf16 copies of the weights."""
    dtype = _autocast_dtype(precision)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")  # fake CPU tensors, so CPU autocast applies to them
        model.train()
        # Buffers too: FrozenBN's statistics and affine are weights, not activations.
        params = [*model.parameters(), *model.buffers()]
        saved = SavedTensors(exclude=params, recast_weights=recast_weights)
        images = torch.zeros(batch_size, 3, crop_size, crop_size)
        autocast = torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)
        stand_in = mock.patch("ops.ms_deform_attn.ms_deform_attn", _deform_attn_stand_in)
        with _largest_checkpointed_segment(params) as recompute, saved.hooks(), autocast, stand_in:
            outputs = model(images)
    return saved.total, recompute[0], outputs


def describe_model(cfg: RunConfig, masks_per_image: int = MASKS_PER_IMAGE) -> dict:
    """Parameter counts (``total``, ``trainable``, ``components``, ``details``) and the
    per-worker training memory estimate in bytes (``memory``) of ``cfg``, the loss's share
    for ``masks_per_image`` ground-truth masks per image."""
    if masks_per_image < 1:
        raise ValueError(f"--masks-per-image: expected a positive number of masks, got {masks_per_image}")
    model = build_meta_model(cfg.model)
    counts = count_parameters(model)
    batch, crop = cfg.data.batch_size, cfg.data.crop_size
    if batch < 1 or crop < 1:
        raise ValueError(f"data.batch_size and data.crop_size must be >= 1, got {batch} and {crop}")
    memory: dict[str, Any] = state_bytes(
        counts["total"], counts["trainable"], cfg.train.zero_stage, cfg.cluster.num_workers, cfg.train.precision,
        cfg.train.grad_accum_steps,
    )
    memory["activations"], memory["recompute"], outputs = measure_activations(
        model, batch, crop, cfg.train.precision, recast_weights=recast_applies(cfg.train.precision, cfg.train.zero_stage)
    )
    memory["loss_activations"] = measure_loss_activations(cfg.model, outputs, crop, masks_per_image)
    memory["total"] = sum(memory.values())
    memory.update(
        batch_size=batch,
        crop_size=crop,
        zero_stage=cfg.train.zero_stage,
        num_workers=cfg.cluster.num_workers,
        precision=cfg.train.precision,
        # Per-pixel models (UN-EPT) have no mask losses: the count does not enter theirs.
        masks_per_image=masks_per_image if "pred_masks" in outputs or "mask_features" in outputs else None,
    )
    return {"model": cfg.model.name, "backbone": cfg.model.backbone.name, "num_classes": cfg.model.num_classes,
            **counts, "memory": memory}


def _millions(n: int) -> str:
    return f"{n / 1e6:7.1f}M"


def _gib(n: float) -> str:
    return f"{n / _GIB:6.2f} GiB"


def format_description(desc: dict) -> str:
    m = desc["memory"]
    lines = [
        f"model: {desc['model']} on {desc['backbone']}, {desc['num_classes']} classes",
        f"total {_millions(desc['total'])} parameters ({desc['total']:,}; trainable {desc['trainable']:,})",
    ]
    for name, n in desc["components"].items():
        lines.append(f"  {name:<26}{_millions(n)}  ({n:,})")
        for sub, k in desc["details"].get(name, {}).items():
            lines.append(f"    {sub:<24}{_millions(k)}")
    zero = f"ZeRO-{m['zero_stage']} over {m['num_workers']} workers" if m["zero_stage"] else "no ZeRO"
    precision = {"bf16": "bf16 autocast", "fp16": "fp16", "fp32": "fp32"}[m["precision"]]
    lines += [
        f"training memory per worker (crop {m['crop_size']}x{m['crop_size']}, batch {m['batch_size']} per worker, "
        f"{precision}, AdamW, {zero}):",
        f"  parameters        {_gib(m['parameters'])}  exact",
        f"  gradients         {_gib(m['gradients'])}  exact",
        f"  optimizer states  {_gib(m['optimizer'])}  exact (AdamW moments"
        + (" + fp32 master copy)" if m["zero_stage"] in (1, 2) or m["precision"] == "fp16" else ")"),
        f"  activations       {_gib(m['activations'])}  measured: saved for backward by one forward (fake tensors)",
        f"  recompute         {_gib(m['recompute'])}  "
        + ("measured: largest checkpointed segment, rebuilt in backward" if m["recompute"]
           else "none (no activation checkpointing)"),
        f"  loss              {_gib(m['loss_activations'])}  estimate: measured at two small sizes, "
        + (f"extrapolated; assumes {m['masks_per_image']} masks per image" if m["masks_per_image"]
           else "extrapolated; per-pixel losses"),
        f"  total             {_gib(m['total'])}  estimate; excludes backward temporaries, fragmentation, "
        "CUDA context, DeepSpeed buckets",
    ]
    return "\n".join(lines)


def describe_command(config_path: str, overrides: list[str], masks_per_image: int | None = None) -> int:
    cfg = load_config(config_path, overrides)
    print(f"config: {config_path}")
    if cfg.model.backbone.pretrained_path:  # counting needs shapes only (meta device)
        print(f"model.backbone.pretrained_path: {cfg.model.backbone.pretrained_path} is not read by describe "
              "(train checks it before Ray starts)")
    print(format_description(describe_model(cfg, MASKS_PER_IMAGE if masks_per_image is None else masks_per_image)))
    return 0
