"""Typed configuration of the kernels the model runs on (``model.ops`` in a run config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal


@dataclass
class OpsConfig:
    # Checked when a config is loaded (launcher.typed_config.check_rules): a budget of 0 or
    # less would run every attention one query row at a time, silently.
    RULES: ClassVar[dict[str, str]] = {"attention_max_matrix_mib": "> 0"}

    # Attention backend of every decoder attention (ops/attention.py): "auto" picks by
    # device, dtype, mask and dropout; the others force one ("flash" and "math" run on
    # CPU, "cudnn" / "efficient" only on CUDA, "chunked" anywhere, "blocked" — no masks,
    # no dropout — is tested on CPU).
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math", "chunked", "blocked"] = "auto"
    # Largest attention matrix (MiB per call) the math path may materialise; above it
    # the query-chunked path runs instead.
    attention_max_matrix_mib: float = 256.0
    # Multi-scale deformable attention: "auto" = Triton on CUDA when importable, else
    # the memory-lean torch implementation; "reference" is the plain grid_sample one.
    deform_attn: Literal["auto", "triton", "lean", "reference"] = "auto"
    # NVIDIA apex's FusedLayerNorm / FusedAdam: "auto" uses them when apex is importable
    # and CUDA is available; "off" always uses torch's LayerNorm / AdamW.
    apex: Literal["auto", "off"] = "auto"
    # The pixel decoders' 3×3 convolutions (ops/winograd_conv.py): "auto" runs Winograd
    # F(4×4, 3×3) for fp32 on CPU outside autocast on maps of at least 64 4×4 tiles
    # (32×32; about a third less training time at 64×64; ~1e-5 relative difference from
    # the direct kernel), the direct kernel elsewhere; "winograd" forces it for
    # fp32/fp64 outside autocast; "direct" never.
    conv3x3: Literal["auto", "winograd", "direct"] = "auto"
