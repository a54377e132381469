"""The run configuration: the sections owned by each package, composed, plus ``train``.

A run config is YAML with four sections (``model``, ``data``, ``train``, ``cluster``).
A file may start from another with ``base: other.yaml`` (relative to the file), and the
command line changes single keys with ``--set section.key=value``. See README.md.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import yaml

from cluster.config import ClusterConfig
from data_pipeline.config import DataConfig
from launcher.typed_config import ConfigError, from_dict, load_yaml, merge, parse_override, to_dict
from model.config import ModelConfig

__all__ = ["ConfigError", "RunConfig", "TrainConfig", "load_config", "config_from_dict", "to_dict"]


@dataclass
class TrainConfig:
    # A run's name is its identity: re-running with the same name (and output_dir)
    # resumes it from its latest checkpoint. "" = "<config stem>-<timestamp>".
    run_name: str = ""
    # Where Ray Train keeps the run (checkpoints, metrics snapshots, results): a local
    # folder, or a shared file system (NFS) path on a multi-node cluster (object storage,
    # s3://..., is refused: every rank writes its checkpoint shards here).
    output_dir: str = "runs"
    max_steps: int = 160_000
    # AdamW, MaskFormer's ADE20K recipe.
    lr: float = 1e-4
    weight_decay: float = 1e-4
    backbone_lr_multiplier: float = 0.1
    # Further lr multipliers by parameter-name fragment (mmcv's paramwise_cfg custom_keys),
    # on top of the backbone's: Deformable DETR and the official Panoptic SegFormer train
    # "sampling_offsets" and "reference_points" at 0.1. The longest matching fragment wins.
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    # The decay after the linear warm-up: "poly", lr * (1 - step / max_steps) ** poly_power
    # (MaskFormer's and PFT's recipe), or "step", mmcv's policy='step' (the official UN-EPT
    # and Panoptic SegFormer configs): lr * lr_step_factor ** (number of lr_steps <= step).
    lr_schedule: Literal["poly", "step"] = "poly"
    poly_power: float = 0.9
    # lr_schedule=step only: the optimizer steps (0-based, increasing, after the warm-up and
    # before max_steps) at which the lr is multiplied by lr_step_factor (mmcv's step, gamma).
    lr_steps: list[int] = field(default_factory=list)
    lr_step_factor: float = 0.1
    # Gradient-norm clipping over the whole model; 0 = off.
    grad_clip: float = 0.01
    grad_accum_steps: int = 1
    zero_stage: int = 1
    # Elements in one of DeepSpeed's gradient-reduction buckets at ZeRO >= 1 (its
    # reduce_bucket_size), capped at the model's trainable parameter count. The default
    # is 25 MiB of fp32 gradients, PyTorch DDP's bucket (bucket_cap_mb=25): well past
    # where NCCL and gloo reach their bandwidth. DeepSpeed's own default, 5e8, is sized
    # for billion-parameter models: ZeRO-3 allocates it up front (1.9 GiB of fp32 on
    # every worker, more than all of Swin-T's partitioned state), ZeRO-1/2 in each backward.
    zero_bucket_elements: int = 6_553_600
    # bf16 autocast keeps fp32 master weights; fp16 needs a GPU.
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    # Validation during training every N steps, and always at the end of the run (0, or
    # more than max_steps, = only at the end: a preset's interval stays valid for a short
    # --set train.max_steps run, so it is not an error).
    eval_every: int = 0
    # Stop early once validation mIoU reaches this value (0 = train to max_steps).
    target_miou: float = 0.0
    # Start from this checkpoint folder instead of the run's own latest one.
    resume_from: str = ""

    # Checked whenever a config is loaded, by every command (typed_config's check_rules);
    # launcher.preflight.check_run checks only what depends on several keys or the machine.
    RULES: ClassVar[dict[str, str]] = {
        "max_steps log_every checkpoint_every keep_checkpoints grad_accum_steps": "positive int",
        "lr": "> 0",
        "weight_decay backbone_lr_multiplier poly_power grad_clip warmup_steps seed": ">= 0",
        "target_miou": "[0, 1]",
    }

    def validate(self, path: str) -> None:
        if self.eval_every < 0:
            raise ValueError(f"{path}.eval_every: expected 0 (off) or a positive int, got {self.eval_every}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"{path}.zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage}")
        if self.zero_bucket_elements < 1:
            raise ValueError(f"{path}.zero_bucket_elements: expected a positive element count, "
                             f"got {self.zero_bucket_elements}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"{path}.betas: expected AdamW's two betas, each in [0, 1), got {self.betas}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def _read_chain(path: str, chain: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """``(file, data)`` of a config file and the files its ``base:`` links lead to, the
    last base first (cycles are an error)."""
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError(f"{path}: 'base' links form a cycle")
    try:
        with open(path) as f:
            data = load_yaml(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; expected a YAML config file (e.g. configs/demo.yaml)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; expected a YAML config file") from None
    except ConfigError as err:  # a duplicate key: the message starts with its line
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, train, cluster), "
                          f"got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return [(path, data)]
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected a file path (str), got {type(base).__name__} {base!r}")
    base_path = os.path.join(os.path.dirname(path), base)
    if not os.path.isfile(base_path):  # named with the file that links to it
        problem = "is a folder" if os.path.isdir(base_path) else "config file not found"
        raise ConfigError(f"{path}: base: {base!r}: {problem} ({os.path.abspath(base_path)}; "
                          "a relative base is relative to this file's folder)")
    return _read_chain(base_path, chain + (path,)) + [(path, data)]


def config_from_dict(data: dict, source: str = "config") -> RunConfig:
    try:
        return from_dict(RunConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load ``path`` (with its ``base`` chain) and apply ``--set`` overrides, strictly.

    An error names where the user has to look: the file of the chain, or the ``--set``,
    from which on the config fails with it (``_blame``)."""
    chain = _read_chain(path)
    shown = [(_shown(file) if i < len(chain) - 1 else path, data) for i, (file, data) in enumerate(chain)]
    steps = shown + [(f"--set {text}", parse_override(text)) for text in overrides]
    merged: dict = {}
    for _, data in steps:
        merged = merge(merged, data)
    try:
        return from_dict(RunConfig, merged)
    except ConfigError as err:
        raise ConfigError(f"{_blame(steps, str(err))}: {err}") from None


def _blame(steps: list[tuple[str, dict]], error: str) -> str:
    """The source (file or ``--set``) of the first step from which every merged prefix of
    ``steps`` fails with exactly ``error``: a value set by a base and mended by a later
    file is not blamed, nor is a ``--set`` that a later one replaces."""

    def fails_so(data: dict) -> bool:
        try:
            from_dict(RunConfig, data)
        except ConfigError as err:
            return str(err) == error
        return False

    prefixes, merged = [], {}
    for _, data in steps:
        merged = merge(merged, data)
        prefixes.append(merged)
    culprit = len(steps) - 1
    while culprit > 0 and fails_so(prefixes[culprit - 1]):
        culprit -= 1
    return steps[culprit][0]


def _shown(path: str) -> str:
    """A base file's path, relative to the working dir when it lies inside it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def default_run_name(config_path: str) -> str:
    """``<config stem>-<timestamp>``: unique per run, as Ray Train needs."""
    stem = os.path.splitext(os.path.basename(config_path))[0]
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
