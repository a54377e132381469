"""Streaming train/eval loaders over the webdataset shards named by a manifest.

Who reads what. A *consumer* is one (rank, DataLoader worker) pair; there are
``world_size * max(1, num_workers)`` of them, consumer ``rank * workers + worker``.

* Enough shards (``num_shards >= consumers``): consumer ``c`` reads shards
  ``order[c::consumers]``. For training ``order`` is a permutation drawn from
  ``(seed, epoch)`` alone, so every consumer in epoch ``e`` agrees on it and the slices are
  disjoint; for evaluation it is the manifest order.
* Fewer shards than consumers: every consumer reads every shard and keeps the samples
  whose global index (position in the manifest) is ``c`` modulo ``consumers``, so no rank
  is starved. Each consumer then reads all bytes, which only tiny datasets hit. For
  training with fewer samples than consumers, consumers wrap around (``c % num_samples``)
  rather than spin forever on an empty slice.

Training streams are infinite: each consumer loops over its own epochs ("epoch" is only
a logging notion and consumers may drift apart by a shard or so; nothing waits for an
epoch end, so uneven slices cannot hang collectives). Within an epoch a consumer shuffles
samples through a buffer of ``shuffle_buffer`` *encoded* samples (bytes, not decoded
pixels, to keep memory low), seeded from ``(seed, epoch, rank, worker)``, and draws each
sample's augmentation from a generator seeded by its position in the stream: the same
(seed, world_size, num_workers, batch_size) gives the same batches, and a stream can
restart at any batch exactly (``data_pipeline.train_stream``). Evaluation is finite,
unshuffled, unaugmented, and sees every sample exactly once across ranks (ranks may get
different counts; the caller reduces a confusion matrix at the end, so there are no
per-batch collectives).

Shards are read one at a time (``loader_io.read_shard``, webdataset's sample layout)
rather than through ``wds.WebDataset``: its node/worker splitters cannot do the
sample-modulo fallback, and reading per shard lets every error name the shard at fault.
Images and label maps are decoded with PIL (``data_pipeline.decode``); label maps stay
uint8 (the narrowest dtype that holds their ids) from decoding to the model.

A training worker only decodes and draws each sample's augmentation plan
(``data_pipeline.augment_plan``); ``data_pipeline.device_batch.prepare_batch`` applies the
plans and builds the targets on the training device. Evaluation batches are final as
they come: padded, stacked, unaugmented.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.augment_plan import plan_sample, sample_generator
from data_pipeline.config import DataConfig
from data_pipeline.decode import decode_arrays, decode_sample
from data_pipeline.loader_io import ReadPlan, ShardReadError, ShardRef, plan_reads, read_shard
from data_pipeline.manifest import Manifest, ManifestError, load_manifest, training_classes
from data_pipeline.panoptic import decode_panoptic_members
from data_pipeline.sample_members import sample_image_id, sample_source
from data_pipeline.train_stream import consumer_stream, stream_start

# reduce_zero_label: imported from here by launcher.eval_semantic and the tests.
from data_pipeline.transforms import common_label_dtype, pad_to, reduce_zero_label  # noqa: F401


class DataConfigError(ValueError):
    """The data section of the config is unusable (one-line message naming the key)."""


def _read_plan(shards: Sequence[ShardRef], plan: ReadPlan) -> Iterator[dict[str, Any]]:
    for i in plan.shards:
        for sample in read_shard(shards[i]):
            if sample["__index__"] % plan.modulo == plan.remainder:
                yield sample


# ---------------------------------------------------------------------------- dataset


def _consumer() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class SegmentationStream(IterableDataset):
    """Decoded samples for one rank: infinite and augmented (train) or finite (eval)."""

    def __init__(
        self,
        shards: Sequence[ShardRef],
        cfg: DataConfig,
        rank: int,
        world_size: int,
        train: bool,
        start_batches: int = 0,
        start_positions: Sequence[int] = (),
        num_classes: int | None = None,
    ):
        self.shards = list(shards)
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.start_batches = start_batches  # batches this rank's trainer already consumed
        # Per worker role, the stream position to restart at (LoaderPosition.next_index);
        # when given it replaces the count derived from start_batches (exact with skips).
        self.start_positions = start_positions
        self.num_classes = num_classes  # labels beyond it are bad input (None: unchecked)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _consumer()
        if not self.train:
            return self._eval_samples(self.rank * num_workers + worker, self.world_size * num_workers)
        # The DataLoader asks its workers in turn from worker 0, and batch j of the
        # uninterrupted stream came from worker j % num_workers; so a stream resumed at
        # batch n lets worker w continue the stream of worker (w + n) % num_workers.
        return self._train_samples((worker + self.start_batches) % num_workers, num_workers)

    def _report_repeats(self, worker: int, repeats: int, epoch: int | None) -> None:
        if repeats:
            print(f"data.on_error=skip: rank {self.rank} worker {worker}: in epoch {epoch}, {repeats} more samples "
                  "skipped with errors shown above", file=sys.stderr, flush=True)

    def _train_samples(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """Training samples of worker role ``worker`` (see ``__iter__``)."""
        cfg = self.cfg
        stream = consumer_stream(
            self.shards,
            seed=cfg.seed,
            rank=self.rank,
            worker=worker,
            consumer=self.rank * num_workers + worker,
            num_consumers=self.world_size * num_workers,
            shuffle_buffer=cfg.shuffle_buffer,
            skip=stream_start(worker, num_workers, cfg.batch_size, self.start_batches, self.start_positions),
            tolerate=cfg.on_error == "skip",
        )
        skipped = 0
        # Bad samples in a row. As many as the dataset holds means that nothing is left to
        # train on (a manifest with too few classes fails every sample): stop rather than
        # spin through epochs of errors without a batch. A bad shard alone never gets there.
        bad_run, total = 0, sum(s.num_samples for s in self.shards)
        # A cut-off shard fails every sample it still owed alike: each error is printed once
        # an epoch, its repeats counted and reported as the next epoch starts.
        shown: set[str] = set()
        repeats, current_epoch = 0, None
        for raw, epoch, position, index in stream:
            if epoch != current_epoch:
                self._report_repeats(worker, repeats, current_epoch)
                shown, repeats, current_epoch = set(), 0, epoch
            try:
                if isinstance(raw, ShardReadError):
                    raise raw
                image, semantic = decode_arrays(raw, cfg.reduce_zero_label, cfg.ignore_index, self.num_classes)
                panoptic = self._panoptic(raw, semantic.shape) if cfg.task == "panoptic" else None
            except ShardReadError as exn:
                if cfg.on_error != "skip":
                    raise
                skipped += 1
                bad_run += 1
                if bad_run >= total:
                    raise ShardReadError(
                        f"data.on_error=skip: rank {self.rank} worker {worker}: the last {bad_run} samples read were "
                        f"all bad, as many as the training manifest holds; nothing to train on. The last: {exn}"
                    ) from None
                # Never a silent drop: each skip is logged here (a repeated error by its count,
                # see above), counted in every batch and exported by the trainer
                # (segscale_data_skipped_samples_total).
                if str(exn) in shown:
                    repeats += 1
                    continue
                shown.add(str(exn))
                print(f"data.on_error=skip: rank {self.rank} worker {worker}: skipped ({skipped} so far): {exn}",
                      file=sys.stderr, flush=True)
                continue
            bad_run = 0
            # One generator per output sample, seeded by where it is in the stream, so a
            # resumed stream augments every sample exactly as the uninterrupted one did.
            generator = sample_generator(cfg.seed, epoch, self.rank, worker, 1, position)
            sample = {
                "image": torch.from_numpy(image),
                "semantic": torch.from_numpy(semantic),
                # Drawn here, applied on the training device (data_pipeline.device_batch).
                "plan": plan_sample(*semantic.shape, cfg.crop_size, cfg.augment, generator, cfg.ignore_index,
                                    cfg.reduce_zero_label),
                "key": raw["__key__"],
                # Where the consumer's stream stands after this sample (bad samples count:
                # resuming from here replays none of them) and how many it skipped so far.
                "stream": (worker, index + 1, skipped),
            }
            if panoptic is not None:  # the id map follows the plan's geometry on the device too
                sample["panoptic"], sample["segments"] = torch.from_numpy(panoptic[0]), panoptic[1]
            yield sample

    def _panoptic(self, raw: dict[str, Any], shape: tuple[int, ...]) -> tuple[Any, list[dict]]:
        """(int32 segment ids, training segments) of a panoptic sample (``data_pipeline.panoptic``)."""
        return decode_panoptic_members(raw, shape[:2], self.cfg.reduce_zero_label, self.cfg.ignore_index,
                                       self.num_classes)

    def _eval_samples(self, consumer: int, num_consumers: int) -> Iterator[dict[str, Any]]:
        sizes = [s.num_samples for s in self.shards]
        plan = plan_reads(sizes, consumer, num_consumers, order_seed=None, allow_empty=True)
        for raw in _read_plan(self.shards, plan):
            image, semantic = decode_sample(raw, self.cfg.reduce_zero_label, self.cfg.ignore_index, self.num_classes)
            sample = {"image": image, "semantic": semantic, "key": raw["__key__"],
                      "source": sample_source(raw)}  # fmt: skip
            if self.cfg.task == "panoptic":
                ids, sample["segments"] = self._panoptic(raw, tuple(semantic.shape))
                sample["panoptic"] = torch.from_numpy(ids)
                sample["image_id"] = sample_image_id(raw)
            yield sample


def collate_batch(samples: list[dict[str, Any]], ignore_index: int = 255) -> dict[str, Any]:
    """Stack evaluation samples into a batch, padded to the largest H and W (image 0,
    labels ignore).

    Padded pixels carry the ignore label and therefore count in no metric. ``image_sizes``
    records each image's own (H, W): evaluation predicts every image at its own size from
    it (``model.tta``), so the padding colour never reaches the model and a prediction
    does not depend on its batch mates.
    """
    height = max(s["semantic"].shape[0] for s in samples)
    width = max(s["semantic"].shape[1] for s in samples)
    dtype = common_label_dtype([s["semantic"] for s in samples])
    images, semantics = [], []
    for s in samples:
        image, semantic = pad_to(s["image"], s["semantic"].to(dtype), height, width, ignore_index)
        images.append(image)
        semantics.append(semantic)
    batch = {
        "images": torch.stack(images),
        "semantic": torch.stack(semantics),
        "keys": [s["key"] for s in samples],
        # Stem of each sample's source file (``ADE_val_00000001``); None in shards written
        # before it was recorded and for synthetic data: ``launcher predict`` names files by it.
        "sources": [s.get("source") for s in samples],
        "image_sizes": [(int(s["semantic"].shape[0]), int(s["semantic"].shape[1])) for s in samples],
    }
    if "panoptic" in samples[0]:  # data.task=panoptic: ids padded with 0 (void), segments per image
        batch["panoptic"] = torch.stack([pad_to(s["panoptic"], s["panoptic"], height, width, 0)[0] for s in samples])
        batch["segments"] = [s["segments"] for s in samples]
        # The dataset's own image ids (COCO's), None where the shards recorded none.
        batch["image_ids"] = [s.get("image_id") for s in samples]
    return batch


def collate_train(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Training samples into a batch without touching a pixel: lists of the decoded
    images (uint8 H x W x 3) and label maps (H x W) at their own sizes, and their plans,
    for ``data_pipeline.device_batch.prepare_batch``. ``stream``: (worker role, next stream
    position, samples skipped) after the batch's last sample (a batch comes from one
    DataLoader worker)."""
    batch = {
        "images": [s["image"] for s in samples],
        "semantic": [s["semantic"] for s in samples],
        "plans": [s["plan"] for s in samples],
        "keys": [s["key"] for s in samples],
        "stream": samples[-1]["stream"],
    }
    if "panoptic" in samples[0]:  # data.task=panoptic: int32 id maps and their segments
        batch["panoptic"] = [s["panoptic"] for s in samples]
        batch["segments"] = [s["segments"] for s in samples]
    return batch


# -------------------------------------------------------------------------- builders


def _check_config(cfg: DataConfig, rank: int, world_size: int, train: bool) -> None:
    checks = [
        (cfg.batch_size >= 1, f"data.batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.num_workers >= 0, f"data.num_workers must be >= 0, got {cfg.num_workers}"),
        (0 <= cfg.ignore_index <= 255, f"data.ignore_index must be in [0, 255], got {cfg.ignore_index}"),
        (
            world_size >= 1 and 0 <= rank < world_size,
            f"need 0 <= rank < world_size, got {rank}, {world_size}",
        ),
    ]
    if train:
        checks += [
            (cfg.crop_size >= 1, f"data.crop_size must be >= 1, got {cfg.crop_size}"),
            (cfg.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {cfg.shuffle_buffer}"),
        ]
    for ok, message in checks:
        if not ok:
            raise DataConfigError(message)
    if train:
        try:
            cfg.augment.validate()
        except ValueError as exn:
            raise DataConfigError(str(exn)) from None


def resolve_manifest(cfg: DataConfig, key: str) -> Manifest:
    """Load the manifest named by ``cfg.<key>``; errors name ``data.<key>`` and the path."""
    path = getattr(cfg, key)
    if not path:
        raise DataConfigError(f"data.{key} is not set (write shards with: python -m data_pipeline shard ...)")
    try:
        manifest = load_manifest(path)
    except ManifestError as exn:
        raise DataConfigError(f"data.{key}: {exn}") from None
    if manifest.num_samples == 0 or not manifest.shards:
        raise DataConfigError(f"data.{key}: {path}: the manifest lists no samples")
    if manifest.ignore_index != cfg.ignore_index:
        raise DataConfigError(
            f"data.{key}: {path} labels ignore as {manifest.ignore_index} but data.ignore_index is {cfg.ignore_index}"
        )
    return manifest


def shard_refs(manifest: Manifest) -> list[ShardRef]:
    refs, first = [], 0
    for info, path in zip(manifest.shards, manifest.shard_paths()):
        offsets = tuple(getattr(info, "sample_offsets", None) or ())
        refs.append(ShardRef(path=path, num_samples=info.num_samples, first_index=first, offsets=offsets))
        first += info.num_samples
    return refs


def _data_loader(dataset: SegmentationStream, cfg: DataConfig) -> DataLoader:
    train = dataset.train
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=collate_train if train else partial(collate_batch, ignore_index=cfg.ignore_index),
        # Page-locked training batches let the trainer's copies to the GPU run asynchronously.
        pin_memory=train and torch.cuda.is_available(),
        # Our randomness is seeded explicitly; a private generator keeps the DataLoader's
        # base-seed draw from advancing the trainer's global torch RNG.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def _iterate(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """Iterate ``loader``; if the consumer stops early or an error escapes, stop its workers now.

    Without this, an exception (say a corrupt shard) leaves the DataLoader iterator alive
    in a reference cycle through the traceback; the garbage collector then finalises it
    after its queues and spends 5 s per worker waiting for them to exit.
    """
    iterator = iter(loader)
    try:
        yield from iterator
    except BaseException:  # includes GeneratorExit: the caller dropped the stream
        shutdown = getattr(iterator, "_shutdown_workers", None)  # private but long-standing API
        if shutdown is not None:
            shutdown()
        raise


class _EvalBatches:
    """Re-iterable view of the eval DataLoader (one pass per ``iter``)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return _iterate(self.loader)


def build_train_loader(
    cfg: DataConfig, rank: int, world_size: int, start_batches: int = 0, start_positions: Sequence[int] = ()
) -> Iterator[dict[str, Any]]:
    """Infinite iterator of training batches for ``rank`` (see the module docstring),
    starting after the first ``start_batches`` batches of the stream: the batches a
    resumed run's trainer already consumed (``data_pipeline.train_stream``).

    Batch (:func:`collate_train`): ``images`` (B uint8 H x W x 3 tensors, decoded, at their
    own sizes), ``semantic`` (B label maps H x W, uint8 unless ids need int64; not yet
    reduced), ``plans`` (B ``AugmentPlan``), ``keys`` (B str), ``stream``; with
    ``data.task: panoptic`` also ``panoptic`` (B int32 id maps, 0 = void) and ``segments``
    (B lists of ``{id, category_id, iscrowd, isthing}``, ``data_pipeline.panoptic``). Give it to
    ``data_pipeline.device_batch.prepare_batch`` for the augmented crops and targets.
    """
    _check_config(cfg, rank, world_size, train=True)
    manifest = resolve_manifest(cfg, "train_manifest")
    if start_batches < 0:
        raise DataConfigError(f"start_batches must be >= 0, got {start_batches}")
    if start_positions and len(start_positions) != max(1, cfg.num_workers):
        raise DataConfigError(
            f"start_positions has {len(start_positions)} entries, data.num_workers={cfg.num_workers} needs "
            f"{max(1, cfg.num_workers)}"
        )
    dataset = SegmentationStream(
        shard_refs(manifest), cfg, rank, world_size, train=True, start_batches=start_batches,
        start_positions=tuple(start_positions),
        num_classes=len(training_classes(manifest, cfg.reduce_zero_label)),
    )
    return _iterate(_data_loader(dataset, cfg))


def build_eval_loader(cfg: DataConfig, rank: int, world_size: int) -> Iterable[dict[str, Any]]:
    """Finite, re-iterable eval batches for ``rank``: full-size images, no shuffle, no augmentation.

    Across ranks every sample of ``cfg.val_manifest`` appears exactly once. Batches are
    those of :func:`collate_batch`: images of different sizes are padded bottom/right and
    ``image_sizes`` holds each one's own (H, W).
    """
    _check_config(cfg, rank, world_size, train=False)
    manifest = resolve_manifest(cfg, "val_manifest")
    classes = len(training_classes(manifest, cfg.reduce_zero_label))
    dataset = SegmentationStream(shard_refs(manifest), cfg, rank, world_size, train=False, num_classes=classes)
    return _EvalBatches(_data_loader(dataset, cfg))
