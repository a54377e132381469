"""PFT's query-pixel cross-attention, forward + backward: segscale's attention entry point
(``ops.attention.scaled_dot_product_attention``, backend ``auto``) against plain
matmul-softmax attention, side by side in one run.

Shapes are one PFT decoder layer at a 512×512 input: 150 category queries per scale
attend to that scale's pixel tokens (strides 4/8/16/32: 128², 64², 32², 16² tokens),
8 heads, hidden 256 (head dim 32), batch 2, no dropout (PFT's default). One call runs
the four scales' attentions and the gradients of q, k and v — the projections around
them are the same on both sides and left out.

Targets (issue 4): at most 0.25× the plain attention's peak memory and no slower.

    python benchmarks/pft_cross_attention.py [--device cpu|cuda] [--dtype fp32|bf16|both]

Takes ~15 s per precision on a 2-core CPU (`--dtype fp32 --steps 5`: 14 s), under a
minute at the defaults. Needs nothing beyond segscale's install.
"""

from __future__ import annotations

import sys

import torch
from measure import (
    DTYPES,
    compare_kernels,
    device_name,
    kernel_memory_child,
    kernel_parser,
    report_comparison,
)

from ops.attention import DEFAULT_MAX_MATRIX_MIB, choose_backends, matrix_bytes, scaled_dot_product_attention

QUERIES, HEADS, HEAD_DIM, BATCH, SIZE = 150, 8, 32, 2, 512
STRIDES = (4, 8, 16, 32)


def make_inputs(device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    scales = []
    for stride in STRIDES:
        tokens = (SIZE // stride) ** 2

        def tensor(length: int) -> torch.Tensor:
            t = torch.randn(BATCH, HEADS, length, HEAD_DIM, generator=g)
            return t.to(device, dtype).requires_grad_(True)

        q, k, v = tensor(QUERIES), tensor(tokens), tensor(tokens)
        grad = torch.randn(BATCH, HEADS, QUERIES, HEAD_DIM, generator=g).to(device, dtype)
        scales.append({"q": q, "k": k, "v": v, "grad": grad})
    return scales


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What a decoder without a fused kernel writes (DETR's nn.MultiheadAttention math)."""
    weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * HEAD_DIM**-0.5, dim=-1)
    return torch.matmul(weights, v)


def run(attention, scales: list[dict]) -> None:
    for s in scales:
        out = attention(s["q"], s["k"], s["v"])
        torch.autograd.grad(out, (s["q"], s["k"], s["v"]), s["grad"])


RUNNERS = {
    "segscale": lambda scales: run(scaled_dot_product_attention, scales),
    "plain": lambda scales: run(plain_attention, scales),
}


def main() -> int:
    args = kernel_parser(__doc__).parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        kernel_memory_child(RUNNERS, make_inputs, *args.memory_child)
        return 0
    device = torch.device(args.device)
    tokens = [(SIZE // s) ** 2 for s in STRIDES]
    print(
        f"PFT query-pixel cross-attention fwd+bwd at {SIZE}x{SIZE}: {QUERIES} queries x {tokens} tokens, "
        f"{HEADS} heads, head dim {HEAD_DIM}, batch {BATCH}; {device_name(args)}, torch {torch.__version__}"
    )
    all_met = True
    for dtype in ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]:
        backend = choose_backends(
            device.type,
            DTYPES[dtype],
            has_mask=False,
            dropout_p=0.0,
            matrix_size=matrix_bytes(BATCH * HEADS, QUERIES, tokens[0], 0.0),
            max_matrix_bytes=DEFAULT_MAX_MATRIX_MIB * 2**20,
            cuda_capability=torch.cuda.get_device_capability(device) if device.type == "cuda" else None,
        )
        result = compare_kernels(__file__, RUNNERS, make_inputs, dtype, args)
        label = f"{dtype} (segscale backend {'/'.join(backend)})"
        all_met &= report_comparison(label, "segscale", "plain", result, 1.0, 0.25)
    print("all targets met" if all_met else "some targets NOT met")
    return 0 if all_met else 1


if __name__ == "__main__":
    sys.exit(main())
