"""Training loader throughput against the decode-bound limit, side by side in one run.

Data: ``--num`` ADE20K-sized samples (683×512 JPEG photos-like images, PNG index labels
of 150 classes) in the ``folder`` layout, sharded with ``python -m data_pipeline shard``
(JPEG bytes pass through). Baseline: a plain loop over the same files doing what no
loader can skip — PIL decode of image and label, and a resize of both to the crop's
short side (bilinear / nearest). segscale: ``build_train_loader`` in this process
(``data.num_workers=0``, so both sides are one worker), batch 2, crop 512, the full
ADE20K recipe: reading the shards, decoding, and drawing each sample's augmentation
(resize, crop windows, flip, photometric parameters). Applying it and building the
MaskFormer targets is the trainer's part (``prepare_batch``, on the training device):
the script also times it on this CPU, per batch, and the loader with it in the same
loop, so nothing is left out. Alternating passes; median samples/s, and the median of
the per-pass ratios (each loader pass against the decode-bound pass just before it, so
a machine whose load drifts between passes does not tilt the ratio).

Target (issue 5): the loader at least 0.85× the decode-bound samples/s per worker.

    python benchmarks/loader_throughput.py [--num 48] [--passes 3]

Takes seconds on a 2-core CPU (`--num 8 --passes 1`: 3 s), under a minute at the
defaults; the shards go to a temporary folder, removed at the end. Needs nothing beyond
segscale's install.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ops.torchvision_fix  # noqa: F401

# isort: split
import numpy as np
import torch
from measure import benchmark_parser  # benchmarks/ is on sys.path when run as a script
from PIL import Image

from data_pipeline.cli import main as shard_main
from data_pipeline.config import DataConfig
from data_pipeline.device_batch import prepare_batch
from data_pipeline.loader import build_train_loader

CROP, HEIGHT, WIDTH, CLASSES = 512, 512, 683, 150


def write_folder(root: Path, num: int) -> list[tuple[Path, Path]]:
    """A ``folder``-layout dataset of smooth, textured images (JPEG-compressible like
    photos, unlike noise) and label maps of rectangular regions."""
    rng = np.random.default_rng(0)
    (root / "images" / "train").mkdir(parents=True)
    (root / "masks" / "train").mkdir(parents=True)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    pairs = []
    for i in range(num):
        freq = rng.uniform(0.005, 0.05, size=(3, 2))
        phase = rng.uniform(0, 6.3, size=3)
        image = np.stack([127 + 100 * np.sin(freq[c, 0] * yy + freq[c, 1] * xx + phase[c]) for c in range(3)], -1)
        image = (image + rng.normal(0, 8, image.shape)).clip(0, 255).astype(np.uint8)
        # ~12 classes per image, about ADE20K's typical count (not all 150 at once).
        cells = rng.choice(rng.choice(CLASSES, size=12, replace=False), size=(8, 10))
        labels = cells[(yy // (HEIGHT / 8)).astype(int), (xx // (WIDTH / 10)).astype(int)].astype(np.uint8)
        image_path = root / "images" / "train" / f"img_{i:04d}.jpg"
        label_path = root / "masks" / "train" / f"img_{i:04d}.png"
        Image.fromarray(image).save(image_path, quality=90)
        Image.fromarray(labels).save(label_path)
        pairs.append((image_path, label_path))
    (root / "classes.txt").write_text("\n".join(f"class_{c}" for c in range(CLASSES)) + "\n")
    return pairs


def decode_bound(pairs: list[tuple[Path, Path]]) -> float:
    """Samples/s of PIL decode + resize to the crop's short side, from bytes in memory."""
    blobs = [(p.read_bytes(), q.read_bytes()) for p, q in pairs]
    started = time.perf_counter()
    for image_bytes, label_bytes in blobs:
        image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        labels = Image.open(io.BytesIO(label_bytes))
        scale = CROP / min(image.size)
        size = (round(image.size[0] * scale), round(image.size[1] * scale))
        np.asarray(image.resize(size, Image.BILINEAR))
        np.asarray(labels.resize(size, Image.NEAREST))
    return len(blobs) / (time.perf_counter() - started)


def loader_rate(cfg: DataConfig, num: int, prepare: bool = False) -> float:
    """Samples/s of the training loader; with ``prepare``, of the loader and prepare_batch
    on this CPU in one loop (a CPU trainer's whole data cost)."""
    batches = build_train_loader(cfg, rank=0, world_size=1)
    next(batches)  # open the stream, fill the shuffle buffer
    started = time.perf_counter()
    count = 0
    for batch in itertools.islice(batches, num // cfg.batch_size):
        if prepare:
            prepare_batch(batch, "cpu")
        count += len(batch["keys"])
    rate = count / (time.perf_counter() - started)
    batches.close()
    return rate


def prepare_ms(cfg: DataConfig, num: int) -> float:
    """Median ms of prepare_batch on this CPU per training batch (the trainer's part)."""
    batches = build_train_loader(cfg, rank=0, world_size=1)
    times = []
    for batch in itertools.islice(batches, max(2, num // cfg.batch_size)):
        started = time.perf_counter()
        prepare_batch(batch, "cpu")
        times.append(time.perf_counter() - started)
    batches.close()
    return 1e3 * statistics.median(times)


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--num", type=int, default=48, help="samples in the dataset (>= 8)")
    parser.add_argument("--passes", type=int, default=3, help="alternating passes per side")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one loader worker = one core
    with tempfile.TemporaryDirectory(prefix="segscale-loader-bench-") as tmp:
        root = Path(tmp)
        print(f"writing {args.num} samples ({WIDTH}x{HEIGHT} JPEG + PNG labels) ...", flush=True)
        pairs = write_folder(root / "data", args.num)
        code = shard_main(["shard", "--format", "folder", "--root", str(root / "data"), "--split", "train",
                           "--out", str(root / "shards"), "--max-count", "16"])
        if code != 0:
            return code
        cfg = DataConfig(train_manifest=str(root / "shards" / "train-manifest.json"), crop_size=CROP,
                         batch_size=2, num_workers=0, shuffle_buffer=8)
        no_photo = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, photometric=False))
        rates: dict[str, list[float]] = {"decode-bound": [], "segscale loader": [],
                                         "segscale loader + prepare_batch on this core": []}
        costs: dict[str, list[float]] = {"full ADE20K recipe": [], "no photometric distortion": []}
        for _ in range(args.passes):
            rates["decode-bound"].append(decode_bound(pairs))
            rates["segscale loader"].append(loader_rate(cfg, args.num))
            rates["segscale loader + prepare_batch on this core"].append(loader_rate(cfg, args.num, prepare=True))
            costs["full ADE20K recipe"].append(prepare_ms(cfg, args.num))
            costs["no photometric distortion"].append(prepare_ms(no_photo, args.num))
    limit = statistics.median(rates["decode-bound"])
    print(f"loader throughput, 1 worker ({os.cpu_count()} cores on the machine), crop {CROP}, batch 2, "
          f"torch {torch.__version__}")
    met = True
    for name, values in rates.items():
        rate = statistics.median(values)
        line = f"  {name}: {rate:.1f} samples/s (passes {[round(v, 1) for v in values]})"
        if name != "decode-bound":
            paired = statistics.median(v / d for v, d in zip(values, rates["decode-bound"]))
            met &= name != "segscale loader" or paired >= 0.85
            line += f" -> {rate / limit:.2f}x the decode-bound limit (per-pass ratios: median {paired:.2f}x)"
        print(line)
    print("  (the loader decodes and draws the augmentation; resize, crop, flip, photometric distortion and "
          "targets run in prepare_batch on the training device)")
    print("prepare_batch on this CPU, 1 thread, per batch of 2 (the trainer's part; on a GPU it runs there):")
    for name, values in costs.items():
        print(f"  {name}: {statistics.median(values):.1f} ms (passes {[round(v, 1) for v in values]})")
    print(f"target: segscale loader >= 0.85x the decode-bound limit (median per-pass ratio): "
          f"{'MET' if met else 'NOT MET'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
