"""Job submission against a real head started with ``ray start --head``: ``python -m
launcher submit`` trains and follows the job; a raw ``ray job submit`` of the same run
name resumes it; bad input and bad credentials are one-line errors."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

import pytest
from e2e_helpers import REPO, tiny_run_args

from launcher.checkpoint import find_latest_checkpoint, verify_checkpoint

BIN = os.path.dirname(sys.executable)
CALLER_RAY_VARS = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
)
pytestmark = pytest.mark.e2e


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _env(**extra: str) -> dict[str, str]:
    """The venv's bin first (the head's jobs run `python` from its PATH), no Ray address
    or auth settings from the caller's shell."""
    env = {k: v for k, v in os.environ.items() if k not in CALLER_RAY_VARS}
    return {**env, "PATH": BIN + os.pathsep + env.get("PATH", ""), "PYTHONUNBUFFERED": "1", **extra}


def _submit_args(url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "launcher", "submit", "--address", url, *args]


def _assert_one_line_error(code: int, log: str, fragment: str, explain=lambda: "") -> None:
    lines = log.strip().splitlines()
    ok = code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert ok, log + explain()


def _run(args: list[str], env: dict[str, str], timeout: float = 270) -> tuple[int, str]:
    try:
        proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:  # keep what it printed for the assertion message
        output = (err.stdout or b"") + (err.stderr or b"")  # bytes here, whatever text= said
        return -1, f"timed out after {timeout} s:\n{output.decode(errors='replace')}"
    return proc.returncode, proc.stdout + proc.stderr


def _kill_session(sid: int) -> None:
    """SIGKILL what is left of the head's session (its own processes only, not other
    Ray instances of this user, which `ray stop` would end too)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of stat: the session id
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


@dataclass
class Head:
    url: str
    token: str
    proc: subprocess.Popen
    temp_dir: str
    gcs_port: int

    def explain(self) -> str:
        """What an assertion message needs when a submit could not reach this head: is
        `ray start` still running, does the dashboard answer now, and the ends of its logs."""
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        parts = [f"\n--- head: `ray start` {state}"]
        parts.append(f"dashboard now: {_dashboard_answer(self.url, self.token)}")
        logs = [os.path.join(self.temp_dir, "head.log")]
        logs += sorted(glob.glob(os.path.join(self.temp_dir, "session_latest", "logs", "dashboard*")))
        for path in logs:
            with open(path, errors="replace") as f:
                parts.append(f"--- {os.path.basename(path)} (last 30 lines)\n" + "".join(f.readlines()[-30:]))
        return "\n".join(parts)


def _dashboard_answer(url: str, token: str) -> str:
    """The Ray version that the dashboard at ``url`` reports with ``token``, or why none."""
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return "ray " + json.load(answer)["ray_version"]
    except (OSError, ValueError, KeyError) as err:  # HTTPError is an OSError
        return f"no Ray dashboard ({err!r})"


@pytest.fixture(scope="module")
def head():
    """A head with token auth (a fresh token in RAY_AUTH_TOKEN, so ~/.ray is not used),
    free ports throughout (other Ray instances may run beside it) and its own temp dir."""
    gcs, dashboard, agent, client = _free_ports(4)
    token = uuid.uuid4().hex
    temp_dir = tempfile.mkdtemp(prefix="segray-")  # short: Ray's socket paths live under it
    log = open(os.path.join(temp_dir, "head.log"), "w")
    # --block keeps `ray start` in the foreground: SIGTERM to it stops exactly this head.
    proc = subprocess.Popen(
        [
            os.path.join(BIN, "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-agent-listen-port={agent}",
            f"--ray-client-server-port={client}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        # No drain on SIGTERM: it waits up to 30 s for leases that a test head does not need.
        env=_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0"),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    started = Head(f"http://127.0.0.1:{dashboard}", token, proc, temp_dir, gcs)
    try:
        # Up means this head's dashboard answers with the token: any answer on the port
        # (a 401, another program's 404) is not enough.
        deadline = time.time() + 120
        while not _dashboard_answer(started.url, token).startswith("ray "):
            assert proc.poll() is None and time.time() < deadline, started.explain()
            time.sleep(0.5)
        yield started
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        _kill_session(proc.pid)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_follows_the_job_and_raw_ray_job_submit_resumes_it(head, dataset, tmp_path):
    url, token = head.url, head.token
    # RAY_AUTH_MODE unset and a token at hand: submit finds out the head wants it.
    code, log = _run(
        _submit_args(url, *tiny_run_args(dataset, tmp_path, "job-test")), _env(RAY_AUTH_TOKEN=token)
    )
    assert code == 0, log + head.explain()
    assert "uses token authentication" in log and "step 4/4" in log, log
    job_line = [line for line in log.splitlines() if line.startswith("job job-test-")]
    assert job_line and job_line[-1].endswith(" SUCCEEDED"), log
    meta = verify_checkpoint(find_latest_checkpoint(str(tmp_path / "job-test")))
    assert meta.step == 4 and meta.world_size == 2

    # The README's raw command, same run name, more steps: the job resumes the run.
    code, log = _run(
        [
            os.path.join(BIN, "ray"),
            "job",
            "submit",
            "--address",
            url,
            "--working-dir",
            ".",
            "--runtime-env-json",
            '{"excludes": [".venv", "runs", ".git"]}',
            "--",
            "python",
            "-m",
            "launcher",
            "train",
            *tiny_run_args(dataset, tmp_path, "job-test", "train.max_steps=6"),
        ],
        _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token),
    )
    assert code == 0, log + head.explain()
    assert "at step 4" in log and "step 6/6" in log and "step 1/" not in log, log
    assert verify_checkpoint(find_latest_checkpoint(str(tmp_path / "job-test"))).step == 6


def test_the_driver_finds_a_head_started_on_this_machine(head, tmp_path):
    """`launcher train` without an address joins the head `ray start` runs here (what
    plain ray.init() would do; a second local instance would count the cores twice), but
    not a head whose GCS is gone, whose address Ray's ray_current_cluster file still names."""
    from launcher.driver import running_local_cluster

    # `ray start` writes the file after its dashboard answers (the fixture's readiness).
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(head.temp_dir, "ray_current_cluster")) and time.time() < deadline:
        time.sleep(0.5)
    assert running_local_cluster(head.temp_dir).endswith(f":{head.gcs_port}"), head.explain()
    (tmp_path / "ray_current_cluster").write_text("127.0.0.1:1\n")  # a crashed head's leftover
    assert running_local_cluster(str(tmp_path)) == ""


def test_auth_errors_are_one_line(head, dataset, tmp_path):
    url, token = head.url, head.token
    args = _submit_args(url, *tiny_run_args(dataset, tmp_path, "auth"))
    for env, fragment in (
        (_env(RAY_AUTH_MODE="disabled"), "RAY_AUTH_MODE=token"),
        (_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-" + token), "rejected"),
    ):
        code, log = _run(args, env, timeout=60)
        _assert_one_line_error(code, log, fragment, head.explain)
        assert url in log, log


@pytest.fixture
def cli(capsys):
    """The CLI in this process (no Ray is started: imports once instead of per case)."""
    from launcher.cli import main

    saved = dict(os.environ)  # main() sets process-wide defaults (TORCH_EXTENSIONS_DIR, ...)

    def run(*args: str) -> tuple[int, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    yield run
    os.environ.clear()
    os.environ.update(saved)


def test_bad_input_is_refused_before_connecting(cli, tmp_path, monkeypatch):
    (unused,) = _free_ports(1)  # nothing listens there
    nowhere = f"http://127.0.0.1:{unused}"
    common = ["submit", "--address", nowhere, *tiny_run_args(tmp_path, tmp_path, "bad")]  # manifests unread
    outside = tmp_path / "outside.yaml"
    outside.write_text(f"base: {REPO}/configs/test_tiny.yaml\n")
    cases = [
        (common + ["--set", "train.max_stepz=3"], "train.max_stepz"),
        (common + ["--set", "train.output_dir=runs"], "train.output_dir"),  # relative: not where the job runs
        (common + ["--config", str(outside)], "outside the working dir"),
        (common + ["--env", "NOVALUE"], "--env"),
        (common + ["--config", "configs/none.yaml"], "not found"),
        (common, nowhere),  # good input: the address is named
    ]
    monkeypatch.chdir(REPO)  # the config paths are relative to the checkout
    for args, fragment in cases:
        code, log = cli(*args)
        _assert_one_line_error(code, log, fragment)


def test_upload_leaves_out_the_runs_data_and_refuses_configs_it_leaves_out():
    from launcher.config import ConfigError, load_config
    from launcher.submit import config_in_working_dir, job_excludes

    tiny = os.path.join(REPO, "configs", "test_tiny.yaml")
    cfg = load_config(
        tiny,
        [
            f"train.output_dir={REPO}/out",
            f"data.train_manifest={REPO}/shards/train.json",
            "data.val_manifest=/elsewhere/val.json",
        ],
    )
    excludes = job_excludes(cfg, REPO)
    assert {".venv", ".git", "runs", "/out", "/shards"} <= set(excludes) and "/elsewhere" not in str(excludes)
    assert config_in_working_dir(tiny, REPO, excludes) == "configs/test_tiny.yaml"  # its base is uploaded too
    with pytest.raises(ConfigError, match="excluded from the upload"):
        config_in_working_dir(os.path.join(REPO, "runs", "r", "config.yaml"), REPO, excludes)
