"""Re-running an interrupted ``shard`` job, and ``pipe:`` outputs."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from data_pipeline.cli import main
from data_pipeline.config import SyntheticConfig
from data_pipeline.manifest import load_manifest
from data_pipeline.shard_writer import ShardStateError, Source, write_shards
from data_pipeline.synthetic import synthetic_source

N, PER_SHARD = 10, 3


def _source(n: int = N) -> Source:
    return synthetic_source(SyntheticConfig(image_size=16), "train", n)


class _Crashy:
    """A load that raises at sample ``crash_at`` (once, or always) and records what it loads."""

    def __init__(self, source: Source, crash_at: int | None) -> None:
        self.source, self.crash_at, self.loaded = source, crash_at, []

    def __call__(self, index: int):
        if index == self.crash_at:
            raise RuntimeError(f"reader crashed at {index}")
        self.loaded.append(index)
        return self.source.load(index)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _reference(tmp_path: Path, **kwargs) -> dict[str, bytes]:
    write_shards(_source(), tmp_path / "ref", "train", max_count=PER_SHARD, **kwargs)
    return _files(tmp_path / "ref")


@pytest.mark.parametrize("kwargs", [{}, {"max_size": 8 * 1024}])
def test_rerun_after_crash_keeps_finished_shards_and_matches_an_uninterrupted_run(tmp_path, capsys, kwargs):
    out = tmp_path / "out"
    crashy = _Crashy(_source(), crash_at=7)
    with pytest.raises(RuntimeError, match="crashed at 7"):
        write_shards(replace(_source(), load=crashy), out, "train", max_count=PER_SHARD, **kwargs)
    state = json.loads((out / "train-shard-state.json").read_text())
    finished = sum(s["num_samples"] for s in state["shards"])
    assert 0 < finished <= 7 and not (out / "train-manifest.json").exists()
    kept = {s["name"]: (out / s["name"]).stat().st_mtime_ns for s in state["shards"]}

    rerun = _Crashy(_source(), crash_at=None)
    capsys.readouterr()
    manifest = write_shards(replace(_source(), load=rerun), out, "train", max_count=PER_SHARD, **kwargs)
    assert rerun.loaded == list(range(finished, N))  # finished shards were not re-encoded
    shards = len(state["shards"])
    assert (f"resuming the interrupted train sharding in {out}: kept {shards} finished shard"
            f"{'s' if shards > 1 else ''} ({finished} of {N} samples)\n") in capsys.readouterr().err
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    assert manifest.num_samples == N
    assert _files(out) == _reference(tmp_path, **kwargs)  # byte for byte; no state or temp files


def test_rerun_cleans_temp_files_and_rewrites_a_damaged_shard(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        write_shards(replace(_source(), load=_Crashy(_source(), 9)), out, "train", max_count=PER_SHARD)
    (out / ".train-000003.tar.abc123.tmp").write_bytes(b"half a shard")  # a killed run's leftovers
    (out / ".train-shard-state.json.xyz.tmp").write_text("{")
    (out / ".val-000000.tar.abc.tmp").write_bytes(b"another split's: not ours to remove")
    damaged = out / "train-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[:-1024])
    rerun = _Crashy(_source(), crash_at=None)
    capsys.readouterr()
    write_shards(replace(_source(), load=rerun), out, "train", max_count=PER_SHARD)
    assert rerun.loaded == list(range(PER_SHARD, N))  # shard 0 kept, the rest rewritten
    assert ("kept 1 finished shard (3 of 10 samples); rewriting the other 1 recorded shard "
            "(train-000001.tar is missing or failed its size/sha256 check)\n") in capsys.readouterr().err
    files = _files(out)
    assert files.pop(".val-000000.tar.abc.tmp")
    assert files == _reference(tmp_path)


def test_rerun_with_other_arguments_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        write_shards(replace(_source(), load=_Crashy(_source(), 5)), out, "train", max_count=PER_SHARD)
    with pytest.raises(ShardStateError, match=r"differing: max_count, num_samples\).*--overwrite"):
        write_shards(_source(8), out, "train", max_count=2)
    # Same arguments, but the state was written by a segscale that laid shards out otherwise.
    state_path = out / "train-shard-state.json"
    state = json.loads(state_path.read_text())
    state["fingerprint"]["layout"] -= 1
    state_path.write_text(json.dumps(state))
    with pytest.raises(ShardStateError, match=r"started by an older segscale .*pass --overwrite to start over"):
        write_shards(_source(), out, "train", max_count=PER_SHARD)
    argv = ["shard", "--format", "synthetic", "--split", "train", "--out", str(out), "--num-samples", "8"]
    argv += ["--image-size", "16", "--max-count", str(PER_SHARD)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("python -m data_pipeline: error: ") and "--overwrite" in err and err.count("\n") == 1
    )
    assert main([*argv, "--overwrite"]) == 0
    assert load_manifest(out / "train-manifest.json").num_samples == 8
    assert not (out / "train-shard-state.json").exists()


def test_ctrl_c_with_workers_says_what_is_finished_and_exits_130(tmp_path):
    """SIGINT to the whole process group, as Ctrl-C sends it: one line, no worker tracebacks."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "data_pipeline", "shard", "--format", "synthetic", "--split", "train",
            "--out", str(out), "--num-samples", "100000", "--image-size", "16", "--max-count", "2",
            "--workers", "2"]  # fmt: skip
    job = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # fmt: skip
    try:
        state = out / "train-shard-state.json"
        deadline = time.monotonic() + 60
        while not (state.exists() and json.loads(state.read_text())["shards"]):
            assert job.poll() is None and time.monotonic() < deadline, "no shard finished"
            time.sleep(0.05)
        os.killpg(job.pid, signal.SIGINT)
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 130, err
    shards = json.loads(state.read_text())["shards"]
    samples = sum(s["num_samples"] for s in shards)
    assert err == (f"python -m data_pipeline: interrupted: {len(shards)} shard{'s' if len(shards) > 1 else ''} "
                   f"({samples} of 100000 samples) of split train are finished in {out}; run the same "
                   "command again to resume\n")  # fmt: skip


def test_pipe_output_matches_local_output(tmp_path, capsys):
    dest, staging = tmp_path / "dest", tmp_path / "staging"
    dest.mkdir()
    base = ["shard", "--format", "synthetic", "--split", "train", "--num-samples", str(N)]
    base += ["--image-size", "16", "--max-count", str(PER_SHARD)]
    out = f"pipe:cat > {shlex.quote(str(dest))}/{{name}}"
    assert main([*base, "--out", out, "--staging", str(staging)]) == 0
    assert "(piped)" in capsys.readouterr().out
    assert list(staging.iterdir()) == []  # staged shards are removed once piped
    assert main([*base, "--out", str(tmp_path / "local")]) == 0
    assert _files(dest) == _files(tmp_path / "local")
    assert main(["verify", str(dest / "train-manifest.json")]) == 0
    assert main([*base, "--out", out.replace("dest", "dest2")]) == 1  # cat into a missing folder


def test_pipe_failure_and_missing_name_are_one_line_errors(tmp_path, capsys):
    base = ["shard", "--format", "synthetic", "--split", "train", "--num-samples", "4", "--image-size", "16"]
    assert main([*base, "--out", "pipe:cat > /dev/null; exit 3 # {name}"]) == 1
    err = capsys.readouterr().err
    assert "pipe command for train-000000.tar exited with code 3" in err and err.count("\n") == 1
    assert main([*base, "--out", "pipe:cat > x"]) == 2
    assert "must contain {name}" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path), "--staging", str(tmp_path)]) == 2
    assert "--staging only applies" in capsys.readouterr().err
