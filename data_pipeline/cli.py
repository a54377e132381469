"""``python -m data_pipeline``: shard datasets into webdataset tars and inspect manifests.

    python -m data_pipeline shard --format synthetic --split train --out DIR --num-samples N
    python -m data_pipeline shard --format ade20k --root ROOT --split train --out DIR [--num-samples N]
    python -m data_pipeline shard ... --max-count 1000 --max-size 1G --workers 8
    python -m data_pipeline shard ... --out 'pipe:aws s3 cp - s3://bucket/ade/{name}'
    python -m data_pipeline info DIR/train-manifest.json
    python -m data_pipeline verify [--quick] DIR/train-manifest.json
    python -m data_pipeline stats [--json] DIR/train-manifest.json
    python -m data_pipeline export-panoptic DIR/val-manifest.json --out GT_DIR [--reduce-zero-label]

Re-running an interrupted ``shard`` with the same arguments keeps the finished shards
and completes the rest (see ``shard_writer``); a finished dataset of the split in
``--out`` is replaced only with ``--overwrite``.

Exit codes: 0 ok, 1 the shards failed verification or an I/O error, 2 usage or input
error (one line on stderr, no traceback), 130 interrupted (Ctrl-C; one line saying what
is finished).

A dataset format is a plain function ``(args) -> shard_writer.Source`` listed in
``READERS``. The real datasets (``data_pipeline.formats``) all take ``--root`` and
``--split`` and optionally ``--num-samples`` (the first N samples in file-name order);
their input errors (``FormatError``) are reported as usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from functools import partial

from data_pipeline import formats
from data_pipeline.config import SyntheticConfig
from data_pipeline.loader_io import ShardReadError
from data_pipeline.manifest import ManifestError, load_manifest
from data_pipeline.shard_stats import format_stats, shard_stats
from data_pipeline.shard_verify import verify_manifest
from data_pipeline.shard_writer import (
    PIPE_PREFIX,
    ShardStateError,
    Source,
    check_split,
    manifest_name,
    parse_size,
    state_name,
    write_shards,
)
from data_pipeline.synthetic import synthetic_source
from data_pipeline.usage import OneLineParser, UsageError

PROG = "python -m data_pipeline"


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


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exn:
        raise argparse.ArgumentTypeError(str(exn)) from None


def _shard(args: argparse.Namespace) -> int:
    reader = READERS.get(args.format)
    if reader is None:
        raise UsageError(f"unknown --format {args.format!r}; supported formats: {', '.join(READERS)}")
    if args.max_count < 1:
        raise UsageError(f"--max-count must be >= 1, got {args.max_count}")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    piped = args.out.startswith(PIPE_PREFIX)
    if piped and "{name}" not in args.out:
        raise UsageError(f"--out {args.out!r}: a pipe: command must contain {{name}} (replaced by each file name)")
    if args.staging is not None and not piped:
        raise UsageError("--staging only applies to a pipe: --out")
    try:
        check_split(args.split)
    except ValueError as exn:
        raise UsageError(str(exn)) from None
    source = reader(args)
    manifest = write_shards(
        source,
        args.out,
        args.split,
        max_count=args.max_count,
        workers=args.workers,
        max_size=args.max_size,
        overwrite=args.overwrite,
        staging=args.staging,
        keep_finished=not args.overwrite,
    )
    total = sum(s.bytes for s in manifest.shards)
    where = f"'{args.out}'" if piped else str(manifest.root)
    print(
        f"wrote {manifest.num_samples} {args.split} samples in {len(manifest.shards)} "
        f"shard{'s' if len(manifest.shards) != 1 else ''} "
        f"({total} bytes) to {where}"
    )
    print(f"manifest: {manifest_name(args.split) + ' (piped)' if piped else manifest.path}")
    return 0


def _info(args: argparse.Namespace) -> int:
    print(load_manifest(args.manifest).summary())
    return 0


def _verify(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    reports = verify_manifest(manifest, quick=args.quick)
    bad = [r for r in reports if not r.ok]
    for report in bad:
        print(report.line(), file=sys.stderr)
        if args.all_problems:
            for problem in report.problems[1:]:
                print(f"  also: {problem}", file=sys.stderr)
    what = "sizes and sha256" if args.quick else "sizes, sha256 and samples"
    if bad:
        print(f"{len(bad)} of {len(reports)} shards failed verification ({what})", file=sys.stderr)
        return 1
    print(f"{len(reports)} shards ok ({manifest.num_samples} samples; {what} checked): {manifest.path}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    stats = shard_stats(load_manifest(args.manifest))
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def _export_panoptic(args: argparse.Namespace) -> int:
    from data_pipeline.panoptic import export_panoptic_gt

    json_path, png_dir = export_panoptic_gt(load_manifest(args.manifest), args.out, args.reduce_zero_label)
    print(f"wrote COCO-panoptic ground truth: {json_path} (PNGs in {png_dir})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Shard segmentation datasets into webdataset tars.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    shard = commands.add_parser(
        "shard",
        help="write a split as webdataset shards + manifest",
        description=(
            "Write a split as webdataset tar shards {split}-NNNNNN.tar plus {split}-manifest.json. "
            "Samples go to shards in order; a shard is closed when the next sample would take it "
            "past --max-count samples or --max-size bytes, so the layout does not depend on --workers. "
            f"Re-running an interrupted job with the same arguments keeps the finished shards (checked "
            f"against {state_name('SPLIT')}) and completes the rest; resuming works for a local --out "
            "only, a pipe: output starts over. A finished dataset of the split in --out is replaced only "
            "with --overwrite."
        ),
    )
    shard.add_argument("--format", required=True, help=f"dataset format: {', '.join(READERS)}")
    shard.add_argument("--root", help="dataset root folder (every format but synthetic)")
    shard.add_argument("--split", required=True, help="split name, e.g. train or val")
    shard.add_argument(
        "--out",
        required=True,
        help=f"output folder (shards + {manifest_name('SPLIT')}), or pipe:CMD where CMD contains {{name}}: "
        "each finished shard, then the manifest, is piped to CMD with {name} replaced by its file name, "
        "e.g. 'pipe:aws s3 cp - s3://bucket/ade/{name}' (no resume for pipe: outputs)",
    )
    shard.add_argument(
        "--num-samples", type=int, help="number of samples (required for synthetic; else the first N)"
    )
    defaults = SyntheticConfig()
    shard.add_argument("--image-size", type=int, default=defaults.image_size, help="image side in pixels (synthetic)")
    shard.add_argument("--num-classes", type=int, default=defaults.num_classes,
                       help="classes incl. background (synthetic)")
    shard.add_argument("--max-count", type=int, default=defaults.samples_per_shard,
                       help=f"at most this many samples per shard (default {defaults.samples_per_shard})")
    shard.add_argument("--max-size", type=_size, metavar="BYTES",
                       help="at most this many bytes per shard file, e.g. 500M or 1G (K/M/G/T = powers of "
                       "1024); a single larger sample gets a shard of its own (default: no size limit)")
    shard.add_argument("--seed", type=int, default=defaults.seed, help="generator seed (synthetic)")
    shard.add_argument("--workers", type=int, default=1,
                       help="encoding processes (the shards are the same for any number)")
    shard.add_argument("--overwrite", action="store_true",
                       help="replace a finished dataset of this split in --out, discard an interrupted "
                       "sharding of it made with other arguments, and overwrite shard files no manifest "
                       "lists, instead of refusing to start (unlisted files are never deleted)")
    shard.add_argument("--staging", metavar="DIR",
                       help="with a pipe: --out, build shards in DIR before piping them (default: a temp folder)")
    shard.set_defaults(run=_shard)

    info = commands.add_parser("info", help="print a manifest's summary")
    info.add_argument("manifest", help="path of a {split}-manifest.json")
    info.set_defaults(run=_info)

    verify = commands.add_parser(
        "verify",
        help="check shards against a manifest (sizes, sha256 and every sample)",
        description=(
            "Check every shard's size and sha256, then read it as a tar and check every sample: an "
            "RGB image (.png/.jpg/.jpeg) and a same-size single-channel .seg.png that decode with PIL, "
            "label values < number of classes or == ignore_index, a .json that parses if present, and "
            "the sample count and offsets the manifest records. Prints one line per bad shard (its "
            "first problem and the number of bad samples; --all-problems lists the others below it); "
            "exit status 1 if any shard is bad."
        ),
    )
    verify.add_argument("manifest", help="path of a {split}-manifest.json")
    verify.add_argument("--quick", action="store_true", help="only check shard sizes and sha256")
    verify.add_argument("--all-problems", action="store_true",
                        help="list every problem of a bad shard, not only its first")
    verify.set_defaults(run=_verify)

    stats = commands.add_parser(
        "stats",
        help="class pixel frequencies and image sizes of a sharded split",
        description=(
            "Read every label once and print per-class pixel counts, shares (of non-ignore pixels) and "
            "the number of images containing each class, the ignore pixels, and the image size "
            "distribution (min/median/max height and width, most common sizes)."
        ),
    )
    stats.add_argument("manifest", help="path of a {split}-manifest.json")
    stats.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    stats.set_defaults(run=_stats)

    export = commands.add_parser(
        "export-panoptic",
        help="write a sharded split's panoptic ground truth as COCO panoptic (for launcher eval-panoptic)",
        description=(
            "Write every sample's panoptic ids as OUT/panoptic/<name>.png and OUT/panoptic.json, <name> being "
            "the source image's stem (the sample key where none was recorded), as launcher predict names its "
            "predictions; image_id and category_id are the dataset's own where the shards recorded them "
            "(coco_panoptic), else <name> and the training class; categories from the manifest. Labels are in "
            "the space training uses (--reduce-zero-label: stored class 0 becomes void, the rest shift down)."
        ),
    )
    export.add_argument("manifest", help="path of a {split}-manifest.json")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--reduce-zero-label", action="store_true", help="as data.reduce_zero_label")
    export.set_defaults(run=_export_panoptic)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    # Only errors about the user's input become one-line messages; anything else is a bug
    # and keeps its traceback.
    except (UsageError, ManifestError, ShardStateError, formats.FormatError, ShardReadError) as exn:
        print(f"{PROG}: error: {exn}", file=sys.stderr)
        return 2
    except OSError as exn:
        print(f"{PROG}: error: {exn}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exn:  # ShardingInterrupted says what is finished
        print(f"{PROG}: {str(exn) or 'interrupted'}", file=sys.stderr)
        return 130
