# ruff: noqa: I001  (ops.torchvision_fix must come first, before anything imports torchvision)
"""The training data path on shards written by hand, as a user's own data would be: image
modes other than 8-bit RGB, a tar damaged in the middle of a shard, a dataset in which
every sample is bad, augmentation settings at their edges."""

import ops.torchvision_fix  # noqa: F401

import hashlib
import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.augment_config import AugmentConfig
from data_pipeline.config import DataConfig
from data_pipeline.decode import decode_arrays
from data_pipeline.loader import ShardReadError, build_train_loader, shard_refs
from data_pipeline.manifest import load_manifest
from data_pipeline.train_stream import consumer_stream
from data_pipeline.transforms import augment_sample

NUM_CLASSES = 3


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def _sample(key: str, rng: np.random.Generator, num_labels: int = NUM_CLASSES) -> tuple[str, dict[str, bytes]]:
    image = rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)
    labels = rng.integers(0, num_labels, (12, 14), dtype=np.uint8)
    return key, {"png": _png(image), "seg.png": _png(labels), "json": json.dumps({"source": f"{key}_src"}).encode()}


def _write_dataset(out: Path, shards: list[list[tuple[str, dict[str, bytes]]]]) -> str:
    """Tars of the given samples and their manifest (with sample offsets); its path."""
    entries = []
    for i, samples in enumerate(shards):
        path = out / f"t-{i:06d}.tar"
        offsets = []
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                offsets.append(tar.offset)
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        data = path.read_bytes()
        entries.append({"name": path.name, "num_samples": len(samples), "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(), "sample_offsets": offsets})  # fmt: skip
    manifest = {"manifest_version": 1, "format": "folder", "split": "t", "classes": ["a", "b", "c"],
                "ignore_index": 255, "num_samples": sum(len(s) for s in shards), "shards": entries,
                "created_by": "hand", "source": {}}  # fmt: skip
    path = out / "t-manifest.json"
    path.write_text(json.dumps(manifest))
    return str(path)


def _raw(members: dict[str, bytes]) -> dict:
    return {"__key__": "k", "__url__": "s.tar", **members}


def test_16_bit_gray_image_keeps_its_contrast_and_32_bit_is_refused():
    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 65536, (12, 14), dtype=np.uint16)
    members = dict(_sample("k", rng)[1])
    members["png"] = _png(gray16)
    image, _ = decode_arrays(_raw(members))
    # The high byte, as PIL reads a 16-bit RGB PNG; PIL's own conversion clips to ~255 everywhere.
    assert image.shape == (12, 14, 3) and np.array_equal(image[..., 1], (gray16 >> 8).astype(np.uint8))
    tiff = io.BytesIO()  # PNG has no 32-bit gray; PIL opens a member by its content, not its name
    Image.fromarray(rng.integers(0, 2**20, (12, 14), dtype=np.int32)).save(tiff, "TIFF")
    members["png"] = tiff.getvalue()
    with pytest.raises(ShardReadError, match=r"^shard s.tar: sample k \(k_src\): .png has 32-bit pixels \(PIL mode I\)"):
        decode_arrays(_raw(members))


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> str:
    """3 shards of 8; in shard 1 the first tar header of sample 4 is damaged."""
    out = tmp_path_factory.mktemp("damaged")
    rng = np.random.default_rng(1)
    manifest = _write_dataset(out, [[_sample(f"s{s}_{i}", rng) for i in range(8)] for s in range(3)])
    offset = load_manifest(manifest).shards[1].sample_offsets[4]
    path = out / "t-000001.tar"
    data = bytearray(path.read_bytes())
    data[offset : offset + 8] = b"\0garbage"
    path.write_bytes(bytes(data))
    return manifest


def _stream(manifest: str, skip: int, count: int) -> list[tuple[int, str]]:
    stream = consumer_stream(shard_refs(load_manifest(manifest)), seed=0, rank=0, worker=0, consumer=0,
                             num_consumers=1, shuffle_buffer=5, skip=skip, tolerate=True)  # fmt: skip
    return [(index, raw["__key__"] if isinstance(raw, dict) else "bad")
            for raw, _, _, index in itertools.islice(stream, count)]  # fmt: skip


def test_a_damaged_header_mid_shard_costs_only_the_samples_around_it(damaged, capsys):
    cfg = DataConfig(train_manifest=damaged, crop_size=8, batch_size=4, shuffle_buffer=5, on_error="skip")
    stream = build_train_loader(cfg, 0, 1)
    keys = [k for b in itertools.islice(stream, 11) for k in b["keys"]]
    stream.close()
    first_epoch = keys[:22]  # 24 positions, 2 of them bad
    # Sample 3 is read until sample 4's first header, which is the damage: both are lost,
    # the 4 samples after them are not (reading starts again at sample 5's offset).
    assert sorted(first_epoch) == sorted(f"s{s}_{i}" for s in range(3) for i in range(8) if (s, i) not in
                                         ((1, 3), (1, 4)))  # fmt: skip
    err = capsys.readouterr().err
    assert "t-000001.tar: TarFormatError: invalid header (bad checksum) at byte" in err
    assert "after member 's1_3.json'" in err


def test_resume_is_exact_at_every_position_around_a_damaged_header(damaged):
    # A resumed stream fetches its buffer's samples one seek each and reads on from there:
    # it must lose exactly the samples the uninterrupted sequential read lost, no more, no less.
    full = _stream(damaged, 0, 60)
    assert sum(key == "bad" for _, key in full[:24]) == 2
    for skip in range(50):
        assert _stream(damaged, skip, 10) == full[skip : skip + 10], skip


@pytest.mark.timeout(60)  # before the fix it spun through epochs of errors forever
def test_skip_stops_when_every_sample_is_bad(tmp_path):
    # Labels 0..4 in a manifest of 3 classes: every sample fails; skipping must not spin forever.
    rng = np.random.default_rng(2)
    manifest = _write_dataset(tmp_path, [[_sample(f"k{i}", rng, num_labels=5) for i in range(6)]])
    cfg = DataConfig(train_manifest=manifest, crop_size=8, batch_size=2, shuffle_buffer=3, on_error="skip")
    stream = build_train_loader(cfg, 0, 1)
    with pytest.raises(ShardReadError, match=r"the last 6 samples read were all bad.*t-000000.tar: sample k\d"):
        next(stream)


def test_scales_at_their_edges():
    with pytest.raises(ValueError, match=r"data.augment.min_scale must be > 0 and <= max_scale \(finite\)"):
        AugmentConfig(max_scale=float("inf")).validate()
    # A short side of crop * 1e-6 resizes the sample to 1 x 1 pixel, then pads it to the crop.
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.ones(40, 50, dtype=torch.uint8)
    aug = AugmentConfig(min_scale=1e-6, max_scale=1e-6, photometric=False, hflip=False)
    out_image, out_labels = augment_sample(image, labels, 16, aug, torch.Generator().manual_seed(0))
    assert out_image.shape == (3, 16, 16) and int((out_labels == 1).sum()) == 1
    assert int((out_labels == 255).sum()) == 16 * 16 - 1
