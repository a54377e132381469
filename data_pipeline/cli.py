"""``python -m data_pipeline``: shard datasets into webdataset tars and inspect manifests.

    python -m data_pipeline shard --format synthetic --split train --out DIR --num-samples N
    python -m data_pipeline shard --format ade20k --root ROOT --split train --out DIR [--num-samples N]
    python -m data_pipeline info DIR/train-manifest.json
    python -m data_pipeline verify DIR/train-manifest.json

Exit codes: 0 ok, 1 the shards failed verification or an I/O error, 2 usage or input
error (one line on stderr, no traceback).

A dataset format is a plain function ``(args) -> shard_writer.Source`` listed in
``READERS``. The real datasets (``data_pipeline.formats``) all take ``--root`` and
``--split`` and optionally ``--num-samples`` (the first N samples in file-name order);
their input errors (``FormatError``) are reported as usage errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import NoReturn

from data_pipeline import formats
from data_pipeline.config import SyntheticConfig
from data_pipeline.manifest import ManifestError, load_manifest, verify_shards
from data_pipeline.shard_writer import Source, check_split, manifest_name, write_shards
from data_pipeline.synthetic import synthetic_source

PROG = "python -m data_pipeline"


class UsageError(Exception):
    """Bad command line or input: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block before the message; we want one line.
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _synthetic_reader(args: argparse.Namespace) -> Source:
    if args.num_samples is None:
        raise UsageError("--num-samples is required for --format synthetic")
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    cfg = SyntheticConfig(
        num_classes=args.num_classes,
        image_size=args.image_size,
        samples_per_shard=args.max_count,
        seed=args.seed,
    )
    try:
        return synthetic_source(cfg, args.split, args.num_samples)
    except ValueError as exn:  # the generator's own range checks (classes, image size)
        raise UsageError(str(exn)) from None


def _dataset_reader(name: str, args: argparse.Namespace) -> Source:
    if args.root is None:
        raise UsageError(f"--root is required for --format {name}")
    if args.num_samples is not None and args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    return formats.READERS[name](args.root, args.split, args.num_samples)


# Format name -> reader. A plain dict: the supported formats are readable right here
# (synthetic first: it is the one that needs no download).
READERS: dict[str, Callable[[argparse.Namespace], Source]] = {
    "synthetic": _synthetic_reader,
    **{name: partial(_dataset_reader, name) for name in formats.READERS},
}


def _shard(args: argparse.Namespace) -> int:
    reader = READERS.get(args.format)
    if reader is None:
        raise UsageError(f"unknown --format {args.format!r}; supported formats: {', '.join(READERS)}")
    if args.max_count < 1:
        raise UsageError(f"--max-count must be >= 1, got {args.max_count}")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    try:
        check_split(args.split)
    except ValueError as exn:
        raise UsageError(str(exn)) from None
    source = reader(args)
    manifest = write_shards(source, args.out, args.split, max_count=args.max_count, workers=args.workers)
    total = sum(s.bytes for s in manifest.shards)
    print(
        f"wrote {manifest.num_samples} {args.split} samples in {len(manifest.shards)} shards "
        f"({total} bytes) to {manifest.root}"
    )
    print(f"manifest: {manifest.path}")
    return 0


def _info(args: argparse.Namespace) -> int:
    print(load_manifest(args.manifest).summary())
    return 0


def _verify(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    problems = verify_shards(manifest)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} of {len(manifest.shards)} shards failed verification", file=sys.stderr)
        return 1
    print(f"{len(manifest.shards)} shards ok ({manifest.num_samples} samples): {manifest.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Shard segmentation datasets into webdataset tars.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    shard = commands.add_parser("shard", help="write a split as webdataset shards + manifest")
    shard.add_argument("--format", required=True, help=f"dataset format: {', '.join(READERS)}")
    shard.add_argument("--root", help="dataset root folder (every format but synthetic)")
    shard.add_argument("--split", required=True, help="split name, e.g. train or val")
    shard.add_argument("--out", required=True, help=f"output folder (shards + {manifest_name('SPLIT')})")
    shard.add_argument(
        "--num-samples", type=int, help="number of samples (required for synthetic; else the first N)"
    )
    defaults = SyntheticConfig()
    shard.add_argument("--image-size", type=int, default=defaults.image_size, help="image side in pixels (synthetic)")
    shard.add_argument("--num-classes", type=int, default=defaults.num_classes,
                       help="classes incl. background (synthetic)")
    shard.add_argument("--max-count", type=int, default=defaults.samples_per_shard, help="samples per shard")
    shard.add_argument("--seed", type=int, default=defaults.seed, help="generator seed (synthetic)")
    shard.add_argument("--workers", type=int, default=1, help="encoding processes")
    shard.set_defaults(run=_shard)

    info = commands.add_parser("info", help="print a manifest's summary")
    info.add_argument("manifest")
    info.set_defaults(run=_info)

    verify = commands.add_parser("verify", help="check shard sizes and sha256 against a manifest")
    verify.add_argument("manifest")
    verify.set_defaults(run=_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    # Only errors about the user's input become one-line messages; anything else is a bug
    # and keeps its traceback.
    except (UsageError, ManifestError, formats.FormatError) as exn:
        print(f"{PROG}: error: {exn}", file=sys.stderr)
        return 2
    except OSError as exn:
        print(f"{PROG}: error: {exn}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
