"""The lean tar reader yields exactly webdataset's samples, and names what is corrupt."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from data_pipeline.config import SyntheticConfig
from data_pipeline.shard_writer import write_shards
from data_pipeline.synthetic import synthetic_source
from data_pipeline.tar_reader import TarFormatError, tar_samples


def _webdataset_samples(data: bytes) -> list[dict]:
    members = wds.tariterators.tar_file_expander(
        iter([{"stream": io.BytesIO(data), "url": "u"}]), eof_value=None
    )
    return list(wds.tariterators.group_by_keys(members))


def _tar(members: list[tuple[str, bytes]], fmt: int, extra=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buf.getvalue()


def test_same_samples_as_webdataset_on_written_shards(tmp_path: Path):
    synth = SyntheticConfig(num_classes=4, image_size=20, seed=0)
    write_shards(synthetic_source(synth, "train", 12), tmp_path, "train", max_count=5, progress=False)
    shards = sorted(tmp_path.glob("train-*.tar"))
    assert len(shards) == 3
    for shard in shards:
        data = shard.read_bytes()
        ours = list(tar_samples(io.BytesIO(data), "u"))
        assert ours == _webdataset_samples(data) and len(ours) in (5, 2)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_same_samples_as_webdataset_on_unusual_names(fmt):
    deep = "d" * 60 + "/" + "e" * 60  # > 100 characters: a long name (GNU, PAX) or a ustar prefix
    members = [
        ("a.jpg", b"1"),
        ("a.SEG.PNG", b"22"),  # extensions are lower-cased
        ("a.json", b""),
        ("__meta__", b"skipped"),
        ("noext", b"skipped"),
        (f"{deep}/b.jpg", b"3" * 700),  # spans two blocks
        (f"{deep}/b.seg.png", b"4"),
        ("c.tar.gz", b"5"),  # extension: everything after the first dot
    ]
    if fmt != tarfile.USTAR_FORMAT:
        members.append(("f" * 150 + ".jpg", b"6"))  # no ustar split fits: long-name header
    directory = tarfile.TarInfo("folder")
    directory.type = tarfile.DIRTYPE
    link = tarfile.TarInfo("link.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
    data = _tar(members, fmt, extra=[directory, link])
    ours = list(tar_samples(io.BytesIO(data), "u"))
    assert ours == _webdataset_samples(data)
    assert [s["__key__"] for s in ours][:3] == ["a", f"{deep}/b", "c"]
    assert ours[0] == {"__key__": "a", "__url__": "u", "jpg": b"1", "seg.png": b"22", "json": b""}


def test_corrupt_tars_raise():
    data = _tar([("a.jpg", b"x" * 1000), ("a.png", b"y")], tarfile.USTAR_FORMAT)
    for damaged, message in [
        # cut inside the first member's data: the member is named
        (data[:700], r"the file ends inside member 'a.jpg' \(188 of its 1000 bytes\): truncated"),
        (data[: 1536 + 100], "truncated header"),  # cut inside the second header
        (data[:148] + b"0000001\0" + data[156:], "bad checksum"),
        (data[:148] + b"9999999\0" + data[156:], "invalid number"),
    ]:
        with pytest.raises(TarFormatError, match=message):
            list(tar_samples(io.BytesIO(damaged), "u"))
    with pytest.raises(TarFormatError, match="duplicate"):
        list(tar_samples(io.BytesIO(_tar([("a.jpg", b"1"), ("a.JPG", b"2")], tarfile.USTAR_FORMAT)), "u"))
    # Cut exactly at a member boundary: the samples so far (read_shard then checks the count).
    assert [s["__key__"] for s in tar_samples(io.BytesIO(data[:1536]), "u")] == ["a"]
