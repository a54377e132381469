# ruff: noqa: I001  (ops.torchvision_fix must come first, before anything imports torchvision)
import ops.torchvision_fix  # noqa: F401

import hashlib
import io
import json
import math
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.cli import main
from data_pipeline.config import SyntheticConfig
from data_pipeline.manifest import ManifestError, load_manifest, write_manifest
from data_pipeline.shard_writer import decode_panoptic, encode_panoptic, write_shards
from data_pipeline.synthetic import generate_sample, synthetic_source

REPO = Path(__file__).resolve().parents[1]


def _shard(out: Path, n: int, max_count: int, *extra: str, split: str = "train") -> int:
    return main(
        ["shard", "--format", "synthetic", "--split", split, "--out", str(out), "--num-samples", str(n)]
        + ["--max-count", str(max_count), "--image-size", "32", *extra]
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("n, max_count", [(50, 16), (48, 16), (5, 64)])
def test_shard_cli_writes_all_samples_and_a_correct_manifest(tmp_path, capsys, n, max_count):
    assert _shard(tmp_path, n, max_count) == 0
    manifest = load_manifest(tmp_path / "train-manifest.json")
    assert manifest.num_samples == n and manifest.split == "train" and manifest.format == "synthetic"
    assert len(manifest.shards) == math.ceil(n / max_count)
    assert [s.name for s in manifest.shards] == [f"train-{i:06d}.tar" for i in range(len(manifest.shards))]
    keys = []
    for info, path in zip(manifest.shards, manifest.shard_paths()):
        assert info.bytes == Path(path).stat().st_size
        assert info.sha256 == _sha256(Path(path))
        with tarfile.open(path) as tar:
            names = tar.getnames()
        shard_keys = sorted({name.split(".", 1)[0] for name in names})
        assert info.num_samples == len(shard_keys) <= max_count
        assert sorted(names) == sorted(
            f"{k}.{ext}" for k in shard_keys for ext in ("png", "seg.png", "pan.png", "json")
        )
        keys += shard_keys
    # Sample i lands in shard i // max_count, under key train_{i:08d}.
    assert keys == [f"train_{i:08d}" for i in range(n)]
    assert str(tmp_path) in capsys.readouterr().out


def test_shard_members_round_trip_exactly(tmp_path):
    cfg = SyntheticConfig(image_size=32, num_classes=5, seed=3)
    manifest = write_shards(synthetic_source(cfg, "train", 3), tmp_path, "train", max_count=2)
    with tarfile.open(manifest.shard_paths()[1]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    expected = generate_sample(2, cfg)
    image = Image.open(io.BytesIO(members["train_00000002.png"]))
    labels = Image.open(io.BytesIO(members["train_00000002.seg.png"]))
    assert image.mode == "RGB" and labels.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), expected.image)
    np.testing.assert_array_equal(np.asarray(labels), expected.semantic)
    panoptic = decode_panoptic(np.asarray(Image.open(io.BytesIO(members["train_00000002.pan.png"]))))
    np.testing.assert_array_equal(panoptic, expected.panoptic)
    meta = json.loads(members["train_00000002.json"])
    assert meta == {"height": 32, "width": 32, "segments_info": expected.segments}


def test_panoptic_encoding_round_trips_large_ids():
    ids = np.array([[0, 1, 255], [256, 65535, 65536 * 3 + 7]], dtype=np.int32)
    rgb = encode_panoptic(ids)
    assert rgb.dtype == np.uint8 and tuple(rgb[1, 0]) == (0, 1, 0)
    np.testing.assert_array_equal(decode_panoptic(rgb), ids)


def test_sharding_is_deterministic_across_runs_and_workers(tmp_path):
    assert _shard(tmp_path / "a", 40, 16) == 0
    assert _shard(tmp_path / "b", 40, 16, "--workers", "2") == 0
    a = load_manifest(tmp_path / "a" / "train-manifest.json")
    b = load_manifest(tmp_path / "b" / "train-manifest.json")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert _shard(tmp_path / "c", 40, 16, "--seed", "1") == 0
    c = load_manifest(tmp_path / "c" / "train-manifest.json")
    assert c.shards[0].sha256 != a.shards[0].sha256


def test_write_leaves_no_temp_files_and_replaces_stale_shards_only_with_overwrite(tmp_path, capsys):
    assert _shard(tmp_path, 40, 8) == 0  # 5 shards
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert _shard(tmp_path, 20, 8) == 2  # a finished dataset is not replaced silently
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path} already holds a finished train dataset" in err
    assert str(tmp_path / "train-manifest.json") in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert _shard(tmp_path, 20, 8, "--overwrite") == 0  # 3 shards: the 2 extra ones must go
    assert _shard(tmp_path, 10, 8, split="val") == 0  # shares the folder, leaves train alone
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "train-manifest.json",
        "val-000000.tar",
        "val-000001.tar",
        "val-manifest.json",
    ]


def test_shard_files_no_manifest_lists_are_never_deleted(tmp_path, capsys):
    assert _shard(tmp_path, 20, 8) == 0  # 3 shards
    stranger = tmp_path / "train-000042.tar"
    stranger.write_bytes(b"someone else's shard")
    capsys.readouterr()
    assert _shard(tmp_path, 20, 8) == 2  # refused before touching anything
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train-manifest.json" in err
    (tmp_path / "train-manifest.json").unlink()  # now no record lists any of the 4 shard files
    assert _shard(tmp_path, 20, 8) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'train-000000.tar'} and 3 more: not listed by any train manifest" in err
    assert err.count("\n") == 1
    assert _shard(tmp_path, 4, 8, "--overwrite") == 0  # 1 shard; the unlisted old ones stay too
    assert stranger.read_bytes() == b"someone else's shard"
    err = capsys.readouterr().err
    assert "note: left 3 files" in err and (tmp_path / "train-000001.tar").exists()
    assert "listed (--overwrite): train-000000.tar\n" in err, err
    assert _shard(tmp_path, 20, 8, "--overwrite") == 0  # this job's own shards are still replaced
    assert _shard(tmp_path, 4, 8, "--overwrite") == 0
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == ["train-000000.tar", "train-000042.tar"]


def test_failed_write_leaves_complete_shards_only_and_no_manifest(tmp_path):
    cfg = SyntheticConfig(image_size=32)
    good = synthetic_source(cfg, "train", 30)

    def flaky(index):
        if index == 21:
            raise RuntimeError("reader failed")
        return good.load(index)

    assert _shard(tmp_path, 30, 8) == 0  # an older complete run: its manifest must go too
    with pytest.raises(RuntimeError, match="reader failed"):
        write_shards(replace(good, load=flaky), tmp_path, "train", max_count=8)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "train-manifest.json" not in names
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]
    for name in ("train-000000.tar", "train-000001.tar"):  # rewritten, complete
        with tarfile.open(tmp_path / name) as tar:
            assert len(tar.getnames()) == 8 * 4


def _valid_manifest(tmp_path: Path) -> Path:
    assert _shard(tmp_path, 4, 2) == 0
    return tmp_path / "train-manifest.json"


def _edit(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.pop("classes"), "missing key 'classes'"),
        (lambda d: d["shards"][1].pop("sha256"), "missing key 'shards[1].sha256'"),
        (lambda d: d.update(num_samples="4"), "key 'num_samples' must be int, got str"),
        (lambda d: d.update(ignore_index=True), "key 'ignore_index' must be int, got bool"),
        (lambda d: d["shards"][0].update(num_samples=[]), "key 'shards[0].num_samples' must be int"),
        (lambda d: d["classes"].append(3), "key 'classes[5]' must be str"),
        (lambda d: d.update(num_samples=5), "key 'num_samples' is 5 but the shards hold 4"),
        (lambda d: d["shards"][0].update(name="/abs/x.tar"), "key 'shards[0].name' must be relative"),
        (lambda d: d.update(category_ids=[1, 2]), "key 'category_ids' has 2 ids for 5 classes"),
        (lambda d: d.update(category_ids=[1, 2, 3, 4, 1]), "key 'category_ids' repeats an id"),
        (lambda d: d.update(category_ids=[1, 2, 3, 4, "5"]), "key 'category_ids[4]' must be int, got str"),
    ],
)
def test_manifest_errors_name_the_file_and_key(tmp_path, edit, expected):
    path = _valid_manifest(tmp_path)
    _edit(path, edit)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    message = str(err.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_manifest_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "synthetic",\n  oops}')
    with pytest.raises(ManifestError, match=r"bad.json: invalid JSON at line 2"):
        load_manifest(bad)


def test_write_manifest_round_trips_atomically(tmp_path):
    manifest = load_manifest(_valid_manifest(tmp_path))
    target = tmp_path / "sub" / "copy.json"
    write_manifest(target, manifest)
    assert sorted(p.name for p in target.parent.iterdir()) == ["copy.json"]
    copy = load_manifest(target)
    assert copy == manifest  # path is excluded from equality
    assert copy.shard_paths() == [str(target.parent / s.name) for s in manifest.shards]


def test_info_and_verify_cli(tmp_path, capsys):
    path = _valid_manifest(tmp_path)
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "samples:      4" in out and "background" in out
    assert main(["verify", str(path)]) == 0
    shard = tmp_path / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(path)]) == 1
    assert "train-000001.tar: sha256 mismatch" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["shard", "--format", "coco", "--split", "train", "--out", "X"], "supported formats: synthetic"),
        (["shard", "--format", "synthetic", "--split", "train", "--out", "X"], "--num-samples is required"),
        (
            ["shard", "--format", "synthetic", "--split", "a.b", "--out", "X", "--num-samples", "2"],
            "split must",
        ),
        (["info", "MISSING.json"], "MISSING.json: manifest not found"),
        (["bogus"], "invalid choice"),
    ],
)
def test_cli_usage_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / a) if a in ("X", "MISSING.json") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_module_entry_point(tmp_path):
    argv = ["shard", "--format", "nope", "--split", "train", "--out", "x"]
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("python -m data_pipeline: error: unknown --format 'nope'")
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------- offsets and --max-size


def _sample_sizes(path: str) -> tuple[list[int], list[int]]:
    """(offsets of each sample's first header, tar bytes of each sample) read back from a shard."""
    with tarfile.open(path) as tar:
        firsts: dict[str, int] = {}
        for member in tar.getmembers():
            firsts.setdefault(member.name.split(".", 1)[0], member.offset)
        end = tar.offset  # where the end-of-archive blocks start
    offsets = list(firsts.values())
    return offsets, [b - a for a, b in zip(offsets, offsets[1:] + [end])]


def test_sample_offsets_seek_to_each_sample(tmp_path):
    manifest = write_shards(
        synthetic_source(SyntheticConfig(image_size=16), "train", 7), tmp_path, "train", max_count=3
    )
    manifest = load_manifest(manifest.path)
    index = 0
    for info, path in zip(manifest.shards, manifest.shard_paths()):
        assert len(info.sample_offsets) == info.num_samples
        assert info.sample_offsets == _sample_sizes(path)[0]
        for offset in info.sample_offsets:
            assert offset % 512 == 0
            with open(path, "rb") as f:
                f.seek(offset)
                with tarfile.open(fileobj=f, mode="r|") as tar:
                    names = [m.name for _, m in zip(range(4), tar)]
            key = f"train_{index:08d}"
            assert names == [f"{key}.{ext}" for ext in ("json", "pan.png", "png", "seg.png")]
            index += 1
    assert index == 7


def test_sample_offsets_disagreeing_with_the_count_are_an_error(tmp_path):
    path = _valid_manifest(tmp_path)
    _edit(path, lambda d: d["shards"][0]["sample_offsets"].pop())
    with pytest.raises(ManifestError, match=r"shards\[0\].sample_offsets' has \d+ entries but num_samples is"):
        load_manifest(path)


def test_manifest_without_sample_offsets_still_loads(tmp_path):
    path = _valid_manifest(tmp_path)
    _edit(path, lambda d: [s.pop("sample_offsets") for s in d["shards"]])
    manifest = load_manifest(path)
    assert all(s.sample_offsets == [] for s in manifest.shards)
    assert "sample_offsets" not in manifest.to_json()["shards"][0]
    assert main(["verify", str(path)]) == 0


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda s: s["sample_offsets"].reverse(), "'shards[0].sample_offsets' must be increasing"),
        (lambda s: s["sample_offsets"].__setitem__(1, 10**9), "beyond the shard's"),
        (lambda s: s["sample_offsets"].__setitem__(1, 513), "multiples of 512"),
        (lambda s: s["sample_offsets"].__setitem__(1, "x"), "'shards[0].sample_offsets[1]' must be int"),
    ],
)
def test_bad_sample_offsets_are_one_line_errors(tmp_path, edit, expected):
    path = _valid_manifest(tmp_path)
    _edit(path, lambda d: edit(d["shards"][0]))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_max_size_closes_shards_greedily_and_ignores_workers(tmp_path):
    from data_pipeline.tar_bytes import archive_size

    max_size = 12 * 1024
    assert _shard(tmp_path / "a", 12, 3, "--max-size", "12K", "--image-size", "16") == 0
    assert _shard(tmp_path / "b", 12, 3, "--max-size", "12K", "--image-size", "16", "--workers", "2") == 0
    a = load_manifest(tmp_path / "a/train-manifest.json")
    b = load_manifest(tmp_path / "b/train-manifest.json")
    assert a.shards == b.shards and a.num_samples == 12
    sizes = [_sample_sizes(p)[1] for p in a.shard_paths()]
    assert any(len(s) < 3 for s in sizes)  # the size limit, not only the count, closed some
    for info, shard_sizes in zip(a.shards, sizes):
        assert info.bytes == archive_size(sum(shard_sizes)) and info.num_samples <= 3
        assert info.bytes <= max_size or info.num_samples == 1
    for this, following in zip(sizes, sizes[1:]):  # the next sample would not have fitted
        assert len(this) == 3 or archive_size(sum(this) + following[0]) > max_size
    # A sample larger than the limit gets a shard of its own.
    assert _shard(tmp_path / "c", 3, 3, "--max-size", "1K", "--image-size", "16") == 0
    assert [s.num_samples for s in load_manifest(tmp_path / "c/train-manifest.json").shards] == [1, 1, 1]


@pytest.mark.parametrize(
    "text, expected", [("123", 123), ("500M", 500 << 20), ("1G", 1 << 30), ("1.5k", 1536), ("2GiB", 2 << 30)]
)
def test_parse_size(text, expected):
    from data_pipeline.shard_writer import parse_size

    assert parse_size(text) == expected


@pytest.mark.parametrize("value", ["12Q", "0", "-1M", "M"])
def test_bad_max_size_is_a_usage_error(tmp_path, capsys, value):
    assert _shard(tmp_path, 4, 2, f"--max-size={value}") == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m data_pipeline: error: ") and "--max-size" in err and err.count("\n") == 1
