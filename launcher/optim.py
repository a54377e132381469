"""Optimizer parameter groups and the learning-rate schedule (MaskFormer's recipe).

AdamW with a lower learning rate for the backbone (x ``backbone_lr_multiplier``), and, as
MaskFormer's ``build_optimizer``: no weight decay on normalisation layers, ``nn.Embedding``
tables (the queries), absolute position embeddings and relative-position bias tables;
everything else, biases included, decays. Then a linear warm-up and either a poly decay,
``lr * (1 - step / max_steps) ** power``, or mmcv's step policy (``train.lr_schedule: step``,
the official UN-EPT / Panoptic SegFormer recipes): ``lr * factor ** (number of lr_steps <= step)``.
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

from launcher.config import TrainConfig
from ops.apex_optional import adamw

_NORM_TYPES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm2d,
)
# Parameter names of position tables that must not be decayed (Swin's relative bias
# tables, ViT/Swin absolute position embeddings).
_NO_DECAY_NAMES = ("relative_position_bias_table", "pos_embed")


def _no_weight_decay(module: nn.Module, param_name: str) -> bool:
    # timm's own norm classes (LayerNorm2d, ...) subclass torch's or carry "Norm" in the name.
    if isinstance(module, (*_NORM_TYPES, nn.Embedding)) or "norm" in type(module).__name__.lower():
        return True
    return any(fragment in param_name for fragment in _NO_DECAY_NAMES)


# Parts of the backbone module that are new, randomly initialised layers (ViTDet's
# simple feature pyramid): they learn at the head's rate, as in ViTDet.
_NEW_BACKBONE_PREFIXES = ("backbone.pyramid.",)


def build_param_groups(model: nn.Module, cfg: TrainConfig, backbone_prefix: str = "backbone.") -> list[dict]:
    """Split parameters into (backbone?, decay?, extra multiplier) groups with their own
    lr/weight decay (``train.lr_multipliers`` gives the extra multiplier by name fragment).

    The schedule (LambdaLR) multiplies each group's own initial lr, so the backbone
    multiplier holds for the whole run.
    """
    groups: dict[tuple[bool, bool, float], dict] = {}
    # Longest fragment first: the most specific key decides, as in mmcv.
    fragments = sorted(cfg.lr_multipliers.items(), key=lambda item: -len(item[0]))
    matched: set[str | None] = set()
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            is_backbone = full_name.startswith(backbone_prefix) and not full_name.startswith(
                _NEW_BACKBONE_PREFIXES
            )
            decay = not _no_weight_decay(module, param_name)
            fragment = next((f for f, _ in fragments if f in full_name), None)
            extra = cfg.lr_multipliers[fragment] if fragment is not None else 1.0
            matched.add(fragment)
            key = (is_backbone, decay, extra)
            if key not in groups:
                scale = (cfg.backbone_lr_multiplier if is_backbone else 1.0) * extra
                groups[key] = {
                    "params": [],
                    "lr": cfg.lr * scale,
                    "weight_decay": cfg.weight_decay if decay else 0.0,
                    "name": ("backbone" if is_backbone else "head")
                    + ("" if decay else "_no_decay")
                    + ("" if extra == 1.0 else f"_x{extra:g}"),
                }
            groups[key]["params"].append(param)
    unused = [f for f in cfg.lr_multipliers if f not in matched]
    if unused:
        raise ValueError(f"train.lr_multipliers: {unused[0]!r} matches no trainable parameter name of the model "
                         "(or only names a longer fragment decides)")
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: TrainConfig, apex_mode: str = "auto") -> torch.optim.Optimizer:
    groups = build_param_groups(model, cfg)
    # A torch (or apex) optimizer, not DeepSpeed's: avoids JIT-building cpu_adam/fused_adam ops.
    return adamw(groups, apex_mode, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    ``step`` schedule, as mmcv's ``StepLrUpdaterHook`` (``progress`` = iterations done):
    from step ``lr_steps[i]`` on, the factor includes ``lr_step_factor ** (i + 1)``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "step":
        return cfg.lr_step_factor ** bisect.bisect_right(cfg.lr_steps, step)
    progress = min(step, cfg.max_steps) / max(1, cfg.max_steps)
    return (1.0 - progress) ** cfg.poly_power


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


# What a run's config sets in each AdamW group. A checkpoint's optimizer and scheduler
# states hold the values of the run that wrote them (``initial_lr`` is the schedule's
# base lr): loaded as they are, a resume with another train.lr or weight decay would
# silently train on with the old ones.
_CONFIGURED = ("initial_lr", "weight_decay", "betas", "eps")


def configured_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each group's name and configured hyperparameters, as built (before a load)."""
    return [{"name": g.get("name"), **{k: g[k] for k in _CONFIGURED if k in g}} for g in optimizer.param_groups]


def reapply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler, built: list[dict]) -> list[str]:
    """After a checkpoint load: ``built``'s hyperparameters back into the groups, the
    schedule's base lrs with them and each group's current lr recomputed at the loaded
    step (the schedule's own function is this run's: it is not part of its state).
    Returns ``"group: key old -> new"`` for each value that differs from the checkpoint.
    Groups that do not line up by name are left as loaded."""
    groups = optimizer.param_groups
    if [g.get("name") for g in groups] != [b["name"] for b in built]:
        return []
    changed = [f"{b['name']}: {'lr' if k == 'initial_lr' else k} {g.get(k)} -> {v}"
               for g, b in zip(groups, built) for k, v in b.items() if k != "name" and not _same(g.get(k), v)]
    for group, values in zip(groups, built):
        group.update({k: v for k, v in values.items() if k != "name"})
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        scheduler.base_lrs = [g["initial_lr"] for g in groups]
        for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in groups]
    return changed


def _same(a, b) -> bool:
    """Equal, counting a list and a tuple of the same values (``betas`` after some loads)."""
    return tuple(a) == tuple(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b
