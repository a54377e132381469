"""``python -m launcher demo`` (``make demo``): the whole product on one machine.

Generate a synthetic dataset and shard it, train on a local Ray instance with 2 CPU
workers (DeepSpeed engines), evaluate the final checkpoint, draw overlays, and print
where everything is. Exits non-zero when the final mIoU misses the bar, so a demo that
"runs" but does not learn is a failure.
"""

from __future__ import annotations

import os
import time

from data_pipeline.manifest import ManifestError, load_manifest
from data_pipeline.shard_writer import write_shards
from data_pipeline.synthetic import synthetic_source
from launcher.commands import load_for_inference
from launcher.config import ConfigError, RunConfig, default_run_name, load_config
from launcher.driver import TrainingFailed, run_training
from launcher.evaluate import evaluate_on_validation
from launcher.interrupt import run_unless_interrupted
from launcher.predict import write_predictions
from launcher.progress import plural

# The bar for "the model really learns" on the synthetic data.
DEMO_MIN_MIOU = 0.6


def _existing_matches(manifest_path: str, expected_options: dict, count: int, per_shard: int) -> bool:
    """True when ``manifest_path`` was written from the same generator settings and sizes."""
    try:
        manifest = load_manifest(manifest_path)
    except ManifestError:
        return False
    # The writer fills shards in order, so the first shard's size is the shard size used.
    return (manifest.source == expected_options and manifest.num_samples == count
            and manifest.shards[0].num_samples == min(count, per_shard)
            and all(os.path.exists(p) for p in manifest.shard_paths()))


def _foreign_format(manifest_path: str) -> str | None:
    """The format of a readable manifest at ``manifest_path`` that the synthetic generator
    did not write, else None."""
    try:
        manifest = load_manifest(manifest_path)
    except ManifestError:
        return None
    return None if manifest.format == "synthetic" else manifest.format


def ensure_synthetic_data(cfg: RunConfig) -> None:
    """Generate and shard the demo dataset unless identical shards are already there."""
    synthetic = cfg.data.synthetic
    # The run's pre-flight check would say so too, but only after the shards are written.
    if cfg.model.num_classes != synthetic.num_classes:
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes}, but data.synthetic.num_classes is "
                          f"{synthetic.num_classes}; set both")
    for split, manifest_path, count in (("train", cfg.data.train_manifest, synthetic.num_train),
                                        ("val", cfg.data.val_manifest, synthetic.num_val)):
        source = synthetic_source(synthetic, split, count)
        if _existing_matches(manifest_path, source.options, count, synthetic.samples_per_shard):
            print(f"data: reusing {count} {split} samples in {manifest_path}")
            continue
        # Regenerating replaces the manifest and the shards it lists: `demo --config` of a
        # preset whose manifest is named {split}-manifest.json (Cityscapes) would otherwise
        # delete the user's real shards and write generated ones in their place.
        foreign = _foreign_format(manifest_path)
        if foreign:
            raise ConfigError(f"data.{split}_manifest: {manifest_path} lists {foreign} shards; the demo only "
                              "trains on data it generates and will not replace them (use `python -m launcher "
                              "train` for this config)")
        expected = os.path.join(os.path.dirname(manifest_path), f"{split}-manifest.json")
        if os.path.abspath(expected) != os.path.abspath(manifest_path):
            raise ValueError(f"data.{split}_manifest: the demo writes {split}-manifest.json, got {manifest_path}")
        started = time.perf_counter()
        manifest = write_shards(source, os.path.dirname(manifest_path), split,
                                max_count=synthetic.samples_per_shard)
        print(f"data: generated {count} {split} samples into {plural(len(manifest.shards), 'shard')} "
              f"({time.perf_counter() - started:.1f} s) -> {manifest_path}")


def _resume_hint(cfg: RunConfig) -> str:
    """How to go on with a stopped demo run: ``demo`` again (not ``train``, which would skip
    the evaluation and overlays) on the config the driver saved in the run folder, which
    holds the run name and every --set; before it is saved, the run name."""
    saved = os.path.join(cfg.train.output_dir, cfg.train.run_name, "config.yaml")
    if os.path.isfile(saved):
        return f"resume it with: python -m launcher demo --config {saved}"
    return f"resume it with the same command and --set train.run_name={cfg.train.run_name}"


def run_demo(config_path: str, overrides: list[str]) -> int:
    started = time.time()
    cfg = load_config(config_path, overrides)
    cfg.train.run_name = cfg.train.run_name or default_run_name(config_path)
    ensure_synthetic_data(cfg)
    try:
        outcome = run_unless_interrupted(lambda: run_training(cfg), lambda: _resume_hint(cfg))
    except TrainingFailed as err:
        print(f"error: {err}", flush=True)
        print(_resume_hint(cfg), flush=True)
        return 1
    if outcome is None:
        return 130
    if outcome.checkpoint is None:
        print("error: the run reported no checkpoint")
        return 1

    eval_cfg, model, checkpoint = load_for_inference("", [], outcome.checkpoint)
    results = evaluate_on_validation(eval_cfg, model)
    overlays = write_predictions(eval_cfg, model, os.path.join(outcome.run_dir, "predictions"), num=8)

    passed = results["miou"] >= DEMO_MIN_MIOU
    print()
    print(f"segscale demo {'finished' if passed else 'FAILED'} in {time.time() - started:.0f} s "
          f"(training {outcome.seconds:.0f} s)")
    print(f"  validation mIoU   {results['miou']:.4f} (bar {DEMO_MIN_MIOU}) | pixel accuracy "
          f"{results['pixel_accuracy']:.4f}")
    print(f"  checkpoint        {checkpoint}")
    print(f"  metrics           {os.path.join(outcome.run_dir, 'metrics')}/rank_*.prom "
          f"(Prometheus targets: {os.path.join(outcome.run_dir, 'prometheus_targets.json')})")
    print(f"  overlays          {os.path.dirname(overlays[0]) if overlays else '-'} ({len(overlays)} PNGs: "
          f"image | prediction | ground truth)")
    print(f"  config            {os.path.join(outcome.run_dir, 'config.yaml')}")
    return 0 if passed else 1
