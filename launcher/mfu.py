"""Model FLOPs utilisation: the FLOP/s the model's arithmetic needs, over the peak.

The model's FLOPs are counted, not guessed: torch's ``FlopCounterMode`` watches the
first training forward pass (matmuls, convolutions, attention), and a training step is
taken as 3x the forward (the backward pass costs about twice the forward). Activation
checkpointing's recomputation is not counted, as in the usual MFU definition (it is
hardware work, not model work).

The peak is, in order: ``cluster.peak_tflops_per_worker`` when set; the datasheet dense
tensor-core peak of a known GPU; otherwise a measured peak, the rate of a large matmul in
the training dtype on this worker's threads (a CPU has no datasheet number that holds
for a given thread count).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

from ops.winograd_conv import direct_convolutions

# Dense (no sparsity) peak TFLOP/s per GPU, (bf16/fp16 tensor cores, fp32 without TF32),
# from the vendors' datasheets; SXM parts where a PCIe variant differs.
_GPU_PEAK_TFLOPS = (
    ("H200", 989.0, 67.0),
    ("H100", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("A10G", 70.0, 31.2),
    ("V100", 125.0, 15.7),
)


def gpu_datasheet_peak(device_name: str, half_precision: bool) -> float | None:
    for fragment, half, single in _GPU_PEAK_TFLOPS:
        if fragment in device_name:
            return (half if half_precision else single) * 1e12
    return None


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of repeated ``size``-square matmuls on ``device`` (after one warm-up)."""
    # A private generator: the global one belongs to the run (dropout, point sampling),
    # and a resumed run must draw exactly what the uninterrupted run drew.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    torch.mm(a, b)
    runs, started = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return 2 * size**3 * runs / elapsed


def peak_flops(device: torch.device, precision: str, override_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one worker, where the number comes from)."""
    if override_tflops > 0:
        return override_tflops * 1e12, "cluster.peak_tflops_per_worker"
    half = precision in ("bf16", "fp16")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_datasheet_peak(name, half)
        if peak is not None:
            return peak, f"{name} datasheet"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    return measure_matmul_peak(device, dtype), f"measured {str(dtype).removeprefix('torch.')} matmul rate"


@contextmanager
def count_forward_flops():
    """``with count_forward_flops() as counted: model(x)``; then ``counted()`` is the FLOPs
    (the model's: 3×3 convolutions count as direct ones, not as Winograd's products)."""
    mode = FlopCounterMode(display=False)
    with mode, direct_convolutions():
        yield mode.get_total_flops


def training_flops_per_sample(forward_flops: int, batch_size: int) -> float:
    return 3.0 * forward_flops / max(1, batch_size)
