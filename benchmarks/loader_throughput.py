"""Training loader throughput against the decode-bound limit, side by side in one run.

Data: ``--num`` ADE20K-sized samples (683×512 JPEG photos-like images, PNG index labels
of 150 classes) in the ``folder`` layout, sharded with ``python -m data_pipeline shard``
(JPEG bytes pass through). Baseline: a plain loop over the same files doing what no
loader can skip — PIL decode of image and label, and a resize of both to the crop's
short side (bilinear / nearest). segscale: ``build_train_loader`` in this process
(``data.num_workers=0``, so both sides are one worker), batch 2, crop 512, reading the
shards, decoding, augmenting (the full ADE20K recipe, and again without the photometric
distortion) and building MaskFormer targets. Alternating passes; median samples/s.

Target (issue 5): at least 0.85× the decode-bound samples/s per worker.

    python benchmarks/loader_throughput.py [--num 48] [--passes 3]
"""

from __future__ import annotations

import argparse
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
from PIL import Image

from data_pipeline.cli import main as shard_main
from data_pipeline.config import DataConfig
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


def loader_rate(cfg: DataConfig, num: int) -> float:
    batches = build_train_loader(cfg, rank=0, world_size=1)
    next(batches)  # open the stream, fill the shuffle buffer
    started = time.perf_counter()
    count = 0
    for batch in itertools.islice(batches, num // cfg.batch_size):
        count += len(batch["keys"])
    rate = count / (time.perf_counter() - started)
    batches.close()
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        rates: dict[str, list[float]] = {"decode-bound": [], "segscale": [], "segscale, no photometric": []}
        for _ in range(args.passes):
            rates["decode-bound"].append(decode_bound(pairs))
            rates["segscale"].append(loader_rate(cfg, args.num))
            rates["segscale, no photometric"].append(loader_rate(no_photo, args.num))
    limit = statistics.median(rates["decode-bound"])
    print(f"loader throughput, 1 worker ({os.cpu_count()} cores on the machine), crop {CROP}, batch 2, "
          f"torch {torch.__version__}")
    met = True
    for name, values in rates.items():
        rate = statistics.median(values)
        line = f"  {name}: {rate:.1f} samples/s (passes {[round(v, 1) for v in values]})"
        if name != "decode-bound":
            ratio = rate / limit
            met &= name != "segscale" or ratio >= 0.85
            line += f" -> {ratio:.2f}x the decode-bound limit"
        print(line)
    print(f"target: segscale >= 0.85x the decode-bound limit: {'MET' if met else 'NOT MET'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
