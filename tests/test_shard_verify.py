"""``python -m data_pipeline verify`` (deep checks) and ``stats``."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_formats import ade_tree  # tests/ is on sys.path

from data_pipeline.cli import main
from data_pipeline.config import SyntheticConfig
from data_pipeline.shard_writer import write_shards
from data_pipeline.synthetic import generate_sample, synthetic_source

CFG = SyntheticConfig(image_size=16, num_classes=5)


@dataclass
class _Relabelled:
    base: object
    semantic: np.ndarray

    def __getattr__(self, name):
        return getattr(self.base, name)


def _write(tmp_path: Path, n: int = 6, relabel=None) -> Path:
    source = synthetic_source(CFG, "train", n)
    if relabel is not None:
        load = source.load

        def patched(i):
            sample = load(i)
            return _Relabelled(sample, relabel(i, sample.semantic.copy()))

        source = replace(source, load=patched)
    return write_shards(source, tmp_path, "train", max_count=4).path


def _rewrite_member(manifest_path: Path, shard: int, name: str, data: bytes | None, fix_manifest: bool = True) -> None:
    """Replace (or drop, ``data=None``) one member and (``fix_manifest``) the manifest's size and sha256."""
    manifest = json.loads(manifest_path.read_text())
    info = manifest["shards"][shard]
    path = manifest_path.parent / info["name"]
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, content in members:
            if member.name == name:
                if data is None:
                    continue
                content = data
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))
    if fix_manifest:
        info["bytes"] = path.stat().st_size
        info["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        manifest_path.write_text(json.dumps(manifest))


def _verify(capsys, path: Path, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["verify", *extra, str(path)])
    return code, capsys.readouterr().err


def test_verify_accepts_good_shards(tmp_path, capsys):
    path = _write(tmp_path)
    assert main(["verify", str(path)]) == 0
    assert "2 shards ok (6 samples; sizes, sha256 and samples checked)" in capsys.readouterr().out


def test_verify_reports_out_of_range_labels_per_shard(tmp_path, capsys):
    def relabel(i, semantic):
        if i in (4, 5):
            semantic[0, 0] = 9
        return semantic

    path = _write(tmp_path, relabel=relabel)
    code, err = _verify(capsys, path)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 2
    assert lines[0] == (
        f"{tmp_path / 'train-000001.tar'}: sample train_00000004: label value 9 out of range "
        "(5 classes, ignore 255) (2 bad samples, 2 problems)"
    )
    assert lines[1] == "1 of 2 shards failed verification (sizes, sha256 and samples)"
    code, err = _verify(capsys, path, "--all-problems")  # the second problem below the first
    assert code == 1 and err.strip().splitlines()[:2] == [
        lines[0], "  also: sample train_00000005: label value 9 out of range (5 classes, ignore 255)"]
    assert _verify(capsys, path, "--quick")[0] == 0  # --quick reads no samples


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("train_00000001.seg.png", None, "sample train_00000001: no .seg.png label"),
        ("train_00000001.png", None, "sample train_00000001: no image (.png/.jpg/.jpeg)"),
        ("train_00000001.json", b"{oops", "sample train_00000001: .json does not parse"),
        ("train_00000001.png", b"not a png", "sample train_00000001: .png is not a decodable PNG"),
        ("train_00000001.seg.png", "rgb", ".seg.png must be single-channel, got PIL mode RGB"),
        # gray images train (the loader converts them); 32-bit ones cannot
        ("train_00000001.png", "int32", ".png has 32-bit pixels (PIL mode I); expected an 8-bit (or 16-bit "
                                        "grayscale) image"),
        ("train_00000001.seg.png", "small", "image is 16x16 but label is 8x8 (WxH)"),
    ],
)
def test_verify_names_the_shard_and_first_problem(tmp_path, capsys, name, data, message):
    path = _write(tmp_path)
    images = {
        "rgb": np.zeros((16, 16, 3), np.uint8),
        "int32": np.zeros((16, 16), np.int32),
        "small": np.zeros((8, 8), np.uint8),
    }
    if isinstance(data, str):
        buf = io.BytesIO()
        # PNG has no 32-bit gray: a TIFF under the .png name (PIL reads the content)
        Image.fromarray(images[data]).save(buf, format="TIFF" if data == "int32" else "PNG")
        data = buf.getvalue()
    _rewrite_member(path, 0, name, data)
    code, err = _verify(capsys, path)
    first = err.splitlines()[0]
    assert code == 1 and first.startswith(f"{tmp_path / 'train-000000.tar'}: ") and message in first
    assert "(1 bad sample" in first


def test_verify_names_the_first_bad_sample_and_its_source_file_without_a_bytesio_repr(tmp_path, capsys):
    ade_tree(tmp_path / "ade")
    assert main(["shard", "--format", "ade20k", "--root", str(tmp_path / "ade"), "--split", "train",
                 "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    path = tmp_path / "out/train-manifest.json"
    jpeg = b"\xff\xd8 not really a JPEG"  # _rewrite_member rebuilds the tar around it
    _rewrite_member(path, 0, "train_00000001.jpg", jpeg, fix_manifest=False)  # a corrupted copy
    code, err = _verify(capsys, path)
    first = err.splitlines()[0]
    assert code == 1 and "sha256 mismatch" in first and "(1 bad sample, " in first
    assert first.endswith("; first bad sample train_00000001 (ADE_train_00000002): .jpg is not a decodable JPEG")
    code, err = _verify(capsys, path, "--all-problems")
    assert code == 1 and "  also: sample train_00000001 (ADE_train_00000002): .jpg is not a decodable JPEG" in err
    assert "BytesIO" not in err


def test_verify_checks_offsets_counts_and_checksums(tmp_path, capsys):
    path = _write(tmp_path)
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["sample_offsets"][2] += 512
    path.write_text(json.dumps(manifest))
    code, err = _verify(capsys, path)
    assert code == 1 and "train-000000.tar: sample 2 starts at byte" in err
    shard = tmp_path / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-512] + b"x" * 512)
    code, err = _verify(capsys, path, "--quick")
    assert code == 1 and "train-000001.tar: sha256 mismatch" in err and "starts at byte" not in err


def test_stats_counts_classes_ignore_and_sizes(tmp_path, capsys):
    def relabel(i, semantic):
        semantic[:2] = 255
        return semantic

    path = _write(tmp_path, n=5, relabel=relabel)
    capsys.readouterr()
    assert main(["stats", "--json", str(path)]) == 0
    stats = json.loads(capsys.readouterr().out)
    labels = [generate_sample(i, CFG).semantic.copy() for i in range(5)]
    for label in labels:
        label[:2] = 255
    stacked = np.stack(labels)
    assert stats["num_samples"] == 5 and stats["pixels"] == stacked.size
    assert stats["ignore_pixels"] == int((stacked == 255).sum()) == 5 * 2 * 16
    for c in stats["classes"]:
        assert c["pixels"] == int((stacked == c["id"]).sum())
        assert c["images"] == sum(int((label == c["id"]).any()) for label in labels)
    assert abs(sum(c["share"] for c in stats["classes"]) - 1) < 1e-9
    assert stats["image_size"]["height"] == {"min": 16, "median": 16.0, "max": 16}
    assert stats["image_size"]["most_common"] == [{"height": 16, "width": 16, "count": 5}]
    assert main(["stats", str(path)]) == 0
    table = capsys.readouterr().out
    assert "samples:  5 in 2 shards" in table and "background" in table
