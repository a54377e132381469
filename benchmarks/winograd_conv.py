"""Training time of a 3×3 convolution: Winograd F(4×4, 3×3) (ops/winograd_conv.py) vs
torch's direct kernel, forward + backward (input, weight and bias gradients), fp32.

The pixel decoders' convolutions by default: 256→256 channels, batch 2, the stride-4,
-8 and -16 maps of a 256×256 crop (64², 32², 16²) and of a 640×640 crop's stride 4 (160²).
Both sides alternate, median of the measured repetitions; also prints the largest
relative difference of the outputs against an fp64 direct convolution.

    python benchmarks/winograd_conv.py [--sizes 64 32 16 160] [--channels 256] [--repeats 7]

Takes seconds on a 2-core CPU (`--sizes 16 32 --repeats 3`: 2 s), well under a minute at
the defaults. Needs nothing beyond segscale's install (a C compiler for the native tile
transforms; without one the PyTorch transforms run).
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from measure import benchmark_parser  # benchmarks/ is on sys.path when run as a script

from ops.winograd_conv import auto_min_tiles, winograd_conv3x3


def train_step_seconds(conv, x, weight, bias) -> float:
    started = time.perf_counter()
    conv(x, weight, bias).sum().backward()
    elapsed = time.perf_counter() - started
    x.grad = weight.grad = bias.grad = None
    return elapsed


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 32, 16, 160])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    direct = lambda x, w, b: F.conv2d(x, w, b, padding=1)  # noqa: E731
    print(
        f"3x3 conv {args.channels}->{args.channels}, batch {args.batch}, fp32, forward+backward, "
        f"CPU x{args.threads} threads, torch {torch.__version__}"
    )
    for size in args.sizes:
        x = torch.randn(args.batch, args.channels, size, size, requires_grad=True)
        weight = (torch.randn(args.channels, args.channels, 3, 3) * 0.02).requires_grad_()
        bias = torch.zeros(args.channels, requires_grad=True)
        exact = F.conv2d(x.detach().double(), weight.detach().double(), bias.detach().double(), padding=1)
        error = ((winograd_conv3x3(x, weight, bias).detach() - exact).abs().max() / exact.abs().max()).item()
        times: dict[str, list[float]] = {"direct": [], "winograd": []}
        for i in range(args.repeats + 1):  # the first round warms up
            for name, conv in (("direct", direct), ("winograd", winograd_conv3x3)):
                seconds = train_step_seconds(conv, x, weight, bias)
                if i:
                    times[name].append(seconds)
        median = {name: statistics.median(t) for name, t in times.items()}
        tiles = math.ceil(size / 4) ** 2
        picked = "winograd" if tiles >= auto_min_tiles() else "direct"
        print(
            f"{size:4d}x{size:<4d} direct {1000 * median['direct']:7.1f} ms  winograd "
            f"{1000 * median['winograd']:7.1f} ms  ratio {median['winograd'] / median['direct']:.2f}  "
            f"relative error {error:.1e}  ({tiles} tiles/image: auto picks {picked})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
