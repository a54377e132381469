"""``python -m launcher`` / ``segscale``: the command line.

    train      train a config on a local Ray instance or a cluster
    submit     run ``train`` as a Ray job on a cluster and follow its logs
    eval       mIoU of a checkpoint on the validation shards
    eval-semantic  mIoU of a folder of predicted PNG label maps against ground truth
    eval-panoptic  PQ / SQ / RQ of COCO-panoptic predictions against ground truth
    predict    colour overlay PNGs of a checkpoint's predictions
    export     a checkpoint's consolidated fp32 weights as one safetensors file
    describe   parameter counts and training memory of a config
    demo       the whole loop on generated data (what ``make demo`` runs)
    build-ops  compile DeepSpeed's CPU ops and segscale's C kernels into their caches ahead of a run

Bad input (a config key, a path, a checkpoint) ends with one line naming it and exit
code 2; a failed training run ends with exit code 1.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import os
import sys

import ops.torchvision_fix  # noqa: F401  (first: timm imports torchvision)

# isort: split
from data_pipeline.usage import OneLineParser, UsageError
from launcher.environment import setup_process_environment

# The demo preset ships in the repository's configs/ (make demo runs from a checkout).
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def _override(text: str) -> str:
    # Checked while argparse reads the line: `--set train.lr 0.1` would otherwise be
    # reported as an unrecognized argument "0.1".
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected SECTION.KEY=VALUE in one word, got {text!r}")
    return text


def _add_config_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--config", required=required, help="YAML run config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        type=_override,
                        help="override one config key; repeatable (e.g. --set train.max_steps=100)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="segscale",
        description="Train transformer segmentation models with pyramid decoders on Ray Train + DeepSpeed.",
        epilog="Quick start: `make demo`. Every command takes --help. Docs: README.md.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a config")
    _add_config_args(train, required=True)
    train.add_argument("--address", default="", help="Ray cluster address (default: RAY_ADDRESS, else local)")

    submit = sub.add_parser(
        "submit", help="run `train` as a Ray job on a cluster and follow its logs",
        description="Check the config here, upload the code (without .venv, runs, data, .git) as the job's "
                    "working dir and run `python -m launcher train` there as a Ray job; follow its logs and exit "
                    "with its status (0 succeeded, 1 failed or stopped). Re-submitting with the same "
                    "train.run_name resumes the run.")
    _add_config_args(submit, required=True)
    submit.add_argument("--address", default="",
                        help="the Ray dashboard's URL (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, "
                             "else http://127.0.0.1:8265)")
    submit.add_argument("--working-dir", default="",
                        help="folder uploaded as the job's working dir (default: this segscale checkout); "
                             "--config must be inside it")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job; repeatable")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following")

    for name, text in (("eval", "mIoU (PQ with data.task=panoptic) of a checkpoint on the validation shards"),
                       ("predict", "write colour overlays (and COCO-panoptic predictions) of a checkpoint")):
        p = sub.add_parser(name, help=text)
        _add_config_args(p, required=False)
        p.add_argument("--checkpoint", default="",
                       help="checkpoint folder, or a run folder (its latest verified checkpoint); "
                            "default: the latest checkpoint of --config's run")
        if name == "eval":
            p.add_argument("--json", default="", help="also write the results to this JSON file")
        else:
            p.add_argument("--out", default="", help="output folder (default: <run>/predictions)")
            p.add_argument("--num", type=int, default=8, help="number of validation images")

    semantic = sub.add_parser("eval-semantic", help="mIoU of a folder of predicted PNG label maps against ground truth")
    semantic.add_argument("--pred-dir", required=True, help="folder of predicted label maps (PNG, matched by stem)")
    semantic.add_argument("--gt-dir", required=True, help="folder of ground-truth label maps (PNG)")
    semantic.add_argument("--num-classes", type=int, required=True)
    semantic.add_argument("--ignore-index", type=int, default=255)
    semantic.add_argument("--reduce-zero-label", action="store_true",
                          help="ADE20K: ground-truth 0 -> ignore, other labels - 1")
    semantic.add_argument("--json", default="", help="also write the results to this JSON file")

    panoptic = sub.add_parser("eval-panoptic", help="PQ / SQ / RQ of COCO-panoptic predictions against ground truth",
                              description="Score COCO-panoptic predictions (JSON + RGB PNGs) against ground truth "
                                          "by the COCO panoptic API's rules; images are paired by image_id.")
    panoptic.add_argument("--gt-json", required=True, help="ground-truth COCO-panoptic JSON (with categories)")
    panoptic.add_argument("--gt-dir", required=True, help="folder of the ground-truth PNGs")
    panoptic.add_argument("--pred-json", required=True, help="prediction COCO-panoptic JSON")
    panoptic.add_argument("--pred-dir", required=True, help="folder of the prediction PNGs")
    panoptic.add_argument("--workers", type=int, default=1, help="processes reading and scoring images")
    panoptic.add_argument("--json", default="", help="also write the results (with per-class PQ) to this JSON file")

    describe = sub.add_parser("describe", help="parameter counts per component and training memory per worker")
    _add_config_args(describe, required=True)
    describe.add_argument("--masks-per-image", type=int, default=None,
                          help="ground-truth masks (classes present) per training crop that the loss estimate "
                               "assumes (default: launcher.loss_memory.MASKS_PER_IMAGE, 10; ADE20K images hold 8-9)")

    demo = sub.add_parser("demo", help="generate data, train on 2 workers, evaluate, draw overlays")
    _add_config_args(demo, required=False)
    export = sub.add_parser("export", help="write a checkpoint's consolidated fp32 weights to a safetensors file")
    export.add_argument("--checkpoint", required=True,
                        help="checkpoint folder, or a run folder (its latest verified checkpoint)")
    export.add_argument("--out", required=True, help="output file, e.g. model.safetensors")
    sub.add_parser("build-ops", help="compile DeepSpeed's CPU ops (TORCH_EXTENSIONS_DIR) and segscale's C kernels (SEGSCALE_NATIVE_DIR)")
    return parser


def _config_not_found(path: str) -> str:
    """``--config PATH: no such file`` with the presets closest to what was typed."""
    presets = sorted(glob.glob(os.path.join(os.path.dirname(DEMO_CONFIG), "*.yaml")))
    names = {os.path.splitext(os.path.basename(p))[0]: p for p in presets}
    stem = os.path.splitext(os.path.basename(path))[0]
    close = difflib.get_close_matches(stem, list(names), n=3, cutoff=0.6)

    def shown(p: str) -> str:  # relative where that is shorter (run from the checkout)
        return min(os.path.relpath(p), p, key=len)

    hint = (f"did you mean {' or '.join(shown(names[c]) for c in close)}?" if close
            else f"presets are in {shown(os.path.dirname(DEMO_CONFIG))}/")
    return f"--config {path}: config file not found ({hint})"


def check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the paths and numbers given, before any model or data is loaded
    (an evaluation that runs for an hour must not fail at its last step on its --json):
    an output file that names a folder, or whose nearest existing parent is no writable
    folder."""
    config = getattr(args, "config", None)
    if config and not os.path.exists(config):  # a folder or unreadable file: load_config says so
        return _config_not_found(config)
    # predict's --out is a folder; export's and every --json are files.
    files = {"json": "results.json", **({"out": "model.safetensors"} if args.command == "export" else {})}
    for flag, example in files.items():
        path = getattr(args, flag, "")
        if not path:
            continue
        if os.path.isdir(path) or path.endswith(os.sep):
            return f"--{flag} {path} is a folder; give a file name (e.g. {os.path.join(path, example)})"
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):  # missing folders are created on writing
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            return f"--{flag} {path}: {parent} is {'not a folder' if not os.path.isdir(parent) else 'not writable'}"
    if getattr(args, "num", 0) < 0:
        return f"--num {args.num}: expected a number of images >= 1 (>= 0 for panoptic configs: no overlays)"
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    problem = check_arguments(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    setup_process_environment()
    # Imported late so `--help` and argument errors are instant.
    from data_pipeline.loader import ShardReadError
    from launcher.checkpoint import CheckpointError
    from launcher.config import ConfigError

    try:
        if args.command == "train":
            from launcher.commands import train_command

            return train_command(args.config, args.overrides, args.address)
        if args.command == "submit":
            from launcher.submit import submit_command

            return submit_command(args.address, args.config, args.overrides, args.working_dir, args.env,
                                  wait=not args.no_wait)
        if args.command == "eval":
            from launcher.commands import eval_command

            return eval_command(args.config, args.overrides, args.checkpoint, args.json)
        if args.command == "predict":
            from launcher.commands import predict_command

            return predict_command(args.config, args.overrides, args.checkpoint, args.out, args.num)
        if args.command == "eval-semantic":
            from launcher.eval_semantic import eval_semantic_command

            return eval_semantic_command(args.pred_dir, args.gt_dir, args.num_classes, args.ignore_index,
                                         args.reduce_zero_label, args.json)
        if args.command == "eval-panoptic":
            from launcher.eval_panoptic import eval_panoptic_command

            return eval_panoptic_command(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir, args.json,
                                         args.workers)
        if args.command == "describe":
            from launcher.describe import describe_command

            return describe_command(args.config, args.overrides, args.masks_per_image)
        if args.command == "demo":
            from launcher.demo import run_demo

            return run_demo(args.config or DEMO_CONFIG, args.overrides)
        if args.command == "export":
            from launcher.export import export_command

            return export_command(args.checkpoint, args.out)
        if args.command == "build-ops":
            import warnings

            from launcher.environment import build_deepspeed_ops, torch_extensions_dir
            from ops import cpu_native

            built = build_deepspeed_ops()
            print(f"DeepSpeed ops ready in {torch_extensions_dir()}: {', '.join(built) or 'none needed'}")
            with warnings.catch_warnings():  # the reason is printed on the line below instead
                warnings.simplefilter("ignore", UserWarning)
                library = cpu_native.load("winograd_cpu")
            if library is not None:
                print(f"segscale C kernels (ops/winograd_cpu.c) ready in {cpu_native.cache_dir()}")
            else:
                reason = cpu_native.why_unavailable("winograd_cpu")
                print(f"segscale C kernels (ops/winograd_cpu.c) not built: {reason}; the PyTorch path runs")
            return 0
    except (ConfigError, CheckpointError, ShardReadError, OSError, ValueError) as err:
        if os.environ.get("SEGSCALE_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
