"""``python -m launcher submit``: run a training config as a Ray job and follow its logs.

A thin layer over Ray's ``JobSubmissionClient`` that does what a raw ``ray job submit``
leaves to the user: the config is checked here first (a bad key is a one-line error
before anything is uploaded), the run gets a name the user can resume it by, the
working dir is uploaded without the virtualenv, runs, data and caches, and the client
authenticates the way Ray's own ``ray start`` decides to (a token when one exists).
The job runs ``python -m launcher train --config <config> --set ...`` on the cluster,
exactly what a user could have typed after ``ray job submit --``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import http.client
import logging
import os
import shlex
import time
import urllib.error
import urllib.request

import yaml

from launcher.config import ConfigError, RunConfig, default_run_name, load_config
from launcher.environment import USER_ENV_VARS, environment
from launcher.preflight import check_paths_for_job

# The checkout this package runs from: its code is what the job runs.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never worth uploading (Ray also honours the working dir's .gitignore). Plain names
# match at any depth, a leading "/" anchors at the working dir (gitignore rules).
BASE_EXCLUDES = [
    ".venv",
    "venv",
    ".git",
    "runs",
    "/data",
    "__pycache__",
    "*.egg-info",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "/build",
    "/dist",
]
# The entrypoint's stdout is a file on the head: unbuffered, every line reaches the
# followed log when it is printed rather than when a buffer fills.
JOB_ENV = {"PYTHONUNBUFFERED": "1"}
# Where Ray's clients look for the token, in Ray's order (its error message lists them).
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"


def submit_command(
    address: str,
    config_path: str,
    overrides: list[str],
    working_dir: str = "",
    env: list[str] | None = None,
    wait: bool = True,
) -> int:
    """Submit; with ``wait``, follow the logs and return 0 if the job succeeded, else 1."""
    cfg = load_config(config_path, overrides)
    check_paths_for_job(cfg, in_job=True)
    overrides = list(overrides)
    if cfg.train.run_name:
        # A job id names one submission; a run can take several (re-submitting resumes it).
        submission_id = f"{cfg.train.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    else:
        cfg.train.run_name = submission_id = default_run_name(config_path)  # <config>-<time>: unique
        # Passed on explicitly so the name is printed here and a re-submission can reuse it.
        overrides.append(f"train.run_name={cfg.train.run_name}")
    working_dir = os.path.abspath(working_dir or REPO)
    excludes = job_excludes(cfg, working_dir)
    config_rel = config_in_working_dir(config_path, working_dir, excludes)
    sets = [arg for text in overrides for arg in ("--set", text)]
    entrypoint = shlex.join(["python", "-m", "launcher", "train", "--config", config_rel, *sets])
    env_vars = {
        **{name: os.environ[name] for name in (*USER_ENV_VARS, "SEGSCALE_DEBUG") if name in os.environ},
        **JOB_ENV,
        **parse_env(env or []),
    }

    address = (
        address
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or DEFAULT_ADDRESS
    )
    client, auth_prefix, auth_note = connect(address)
    address = client.get_address()
    refuse_if_running(client, cfg, address, auth_prefix)
    if auth_note:  # after the checks, so that a refusal stays one line
        print(auth_note, flush=True)
    print(
        f"submitting run {cfg.train.run_name} to {address}: uploading {working_dir} "
        f"(without {', '.join(excludes)})",
        flush=True,
    )
    runtime_env = {"working_dir": working_dir, "excludes": excludes, "env_vars": env_vars}
    job_id = _submit(
        client,
        entrypoint=entrypoint,
        submission_id=submission_id,
        runtime_env=runtime_env,
        metadata={"segscale_run": cfg.train.run_name, "segscale_output_dir": cfg.train.output_dir},
    )
    logs_hint = f"  logs: {auth_prefix}ray job logs --address {address} --follow {job_id}"
    hints = f"{logs_hint}\n  stop: {auth_prefix}ray job stop --address {address} {job_id}"
    print(f"job {job_id}: {entrypoint}", flush=True)
    if not wait:
        print(hints)
        return 0
    try:
        asyncio.run(_print_logs(client, job_id))
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running on the cluster\n{hints}", flush=True)
        return 130
    except RuntimeError as err:  # the log stream broke; the job itself may be fine
        print(f"\nlost the job's log stream ({err}); job {job_id} keeps running\n{hints}", flush=True)
        return 1
    info = _final_info(client, job_id)
    succeeded = info.status.value == "SUCCEEDED"
    message = f": {info.message}" if info.message and not succeeded else ""
    print(f"job {job_id} {info.status.value}{message}\n{logs_hint}", flush=True)
    if not succeeded:
        print(f"resume it with the same command and --set train.run_name={cfg.train.run_name}", flush=True)
    return 0 if succeeded else 1


def job_excludes(cfg: RunConfig, working_dir: str) -> list[str]:
    """The base excludes, plus the run's own output and data folders if they sit inside
    the working dir (data from a local head's disk would otherwise be uploaded)."""
    excludes = list(BASE_EXCLUDES)
    folders = [cfg.train.output_dir] + [
        os.path.dirname(p) for p in (cfg.data.train_manifest, cfg.data.val_manifest)
    ]
    for folder in folders:
        rel = os.path.relpath(folder, working_dir) if os.path.isabs(folder) else ""
        if rel and rel != "." and not rel.startswith(".."):
            anchored = "/" + rel.replace(os.sep, "/")
            if anchored not in excludes:
                excludes.append(anchored)
    return excludes


def _excluded(rel: str, excludes: list[str]) -> bool:
    parts = rel.split("/")
    for pattern in excludes:
        if pattern.startswith("/"):
            if rel == pattern[1:] or rel.startswith(pattern[1:] + "/"):
                return True
        elif any(fnmatch.fnmatch(part, pattern) for part in parts):
            return True
    return False


def config_in_working_dir(config_path: str, working_dir: str, excludes: list[str]) -> str:
    """The config's path in the uploaded copy. A config (or a ``base:`` it extends) that
    is not uploaded is refused: the job would not find it."""
    path, first = os.path.abspath(config_path), None
    while True:
        rel = os.path.relpath(path, working_dir).replace(os.sep, "/")
        if rel.startswith("../") or _excluded(rel, excludes):
            where = "is outside" if rel.startswith("../") else "is excluded from the upload of"
            raise ConfigError(
                f"{config_path}: {path} {where} the working dir {working_dir}; put the config "
                "under it (e.g. configs/) or pass --working-dir"
            )
        first = first or rel
        with open(path) as f:  # load_config has read the chain already: it exists and parses
            base = (yaml.safe_load(f) or {}).get("base")
        if not base:
            return first
        path = os.path.join(os.path.dirname(path), base)


def _runs_of(job) -> tuple[str, str]:
    """(run name, output folder) of a job: from submit's metadata, else from a raw
    ``ray job submit -- python -m launcher train ... --set train.run_name=...``."""
    metadata = job.metadata or {}
    if metadata.get("segscale_run"):
        return metadata["segscale_run"], metadata.get("segscale_output_dir", "")
    try:
        words = shlex.split(job.entrypoint or "")
    except ValueError:
        return "", ""
    if "train" not in words:
        return "", ""
    sets = dict(w.partition("=")[::2] for w in words if w.startswith("train.") and "=" in w)
    return sets.get("train.run_name", ""), sets.get("train.output_dir", "")


def refuse_if_running(client, cfg: RunConfig, address: str, auth_prefix: str = "") -> None:
    """A second job of a run that is still running would train beside the first and both
    would write the same checkpoints: refused, with the command that stops the first.
    (Ctrl-C on ``submit`` leaves the job running, so re-submitting is an easy mistake.)"""
    for job in client.list_jobs():
        if job.status.is_terminal():
            continue
        run, output_dir = _runs_of(job)
        same_folder = not output_dir or os.path.normpath(output_dir) == os.path.normpath(cfg.train.output_dir)
        if run == cfg.train.run_name and same_folder:
            job_id = job.submission_id or job.job_id
            raise ConfigError(
                f"train.run_name={run}: job {job_id} on {address} is still {job.status.value} for this run; "
                f"follow it ({auth_prefix}ray job logs --address {address} --follow {job_id}) or stop it "
                f"({auth_prefix}ray job stop --address {address} {job_id}) before submitting it again"
            )


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def local_token() -> tuple[str, str] | None:
    """The token Ray's clients would send, and where it came from."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip(), TOKEN_ENV
    path = os.environ.get(TOKEN_PATH_ENV) or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    with contextlib.suppress(OSError), open(path) as f:
        token = f.read().strip()
        if token:
            return token, path
    return None


def dashboard_url(address: str, timeout: float = 3.0) -> str:
    """``HOST:PORT`` as ``http://HOST:PORT`` when an HTTP server (the dashboard) answers
    there. Ray's client takes an address without a scheme for the cluster's GCS address
    (``HEAD:6379``) and, given the dashboard's port, waits ~45 s for a GCS that never
    answers; a GCS does not answer HTTP, so such an address is left as it is."""
    if "://" in address or ":" not in address:
        return address
    url = f"http://{address}"
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=timeout):
            return url
    except urllib.error.HTTPError:  # an HTTP answer (401 without a token): a web server
        return url
    except (OSError, ValueError, http.client.HTTPException):  # refused, timed out, not HTTP
        return address


def connect(address: str):
    """A connected JobSubmissionClient, the ``RAY_AUTH_MODE=token `` prefix that Ray's own
    CLI needs for this cluster ("" when none) and a note on the token sent ("" when none)."""
    from ray.exceptions import AuthenticationError, RpcError
    from ray.job_submission import JobSubmissionClient

    # Ray's packaging logs every .gitignore it honours and each folder it now excludes by
    # default, several times per upload; our own line says what is left out.
    for name in (
        "ray._private.runtime_env.packaging",
        "ray._private.runtime_env.working_dir",
        "ray.dashboard.modules.dashboard_sdk",
        "ray.dashboard.modules.job.sdk",
    ):
        logging.getLogger(name).setLevel(logging.WARNING if name.endswith("packaging") else logging.ERROR)
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    token = local_token()
    address = dashboard_url(address)
    # Ray's client lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is
    # given; here --address wins (the env vars are already its default).
    with environment(RAY_ADDRESS=None, RAY_API_SERVER_ADDRESS=None):
        try:
            try:
                return JobSubmissionClient(address), "", ""
            except AuthenticationError:
                # With RAY_AUTH_MODE unset, Ray's `ray start` turns token auth on when a
                # token exists; a client on such a machine does the same.
                if mode or token is None:
                    raise
                client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token[0]}"})
                note = (f"{address} uses token authentication: sending the token from {token[1]} "
                        "(set RAY_AUTH_MODE=token to say so)")
                return client, "RAY_AUTH_MODE=token ", note
        except AuthenticationError as err:
            if "://" not in address and mode != "token":
                # A GCS address: Ray's GCS client sends a token only under RAY_AUTH_MODE=token
                # (read once per process), so the token at hand was never sent.
                raise ConnectionError(
                    f"--address {address}: the cluster requires an authentication token, which Ray "
                    "sends to a GCS address only with RAY_AUTH_MODE=token; set it, or give the "
                    "dashboard's URL, e.g. http://HEAD:8265"
                ) from None
            if "invalid" in str(err).lower():
                raise ConnectionError(
                    f"--address {address}: the cluster rejected the authentication token from "
                    f"{token[1] if token else '?'}; use the token of that cluster"
                ) from None
            raise ConnectionError(
                f"--address {address}: the cluster requires an authentication token; set "
                f"RAY_AUTH_MODE=token and the cluster's token ({TOKEN_ENV}, {TOKEN_PATH_ENV} "
                "or ~/.ray/auth_token)"
            ) from None
        except (ConnectionError, RuntimeError, RpcError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConnectionError(
                f"--address {address}: cannot reach the Ray dashboard ({first}); give the "
                "dashboard's URL, e.g. http://HEAD:8265"
            ) from None


def _submit(client, **job) -> str:
    # The head answers "No available agent" until its job agent has registered, for a
    # few seconds after `ray start`; the upload is content-addressed, so a retry is cheap.
    for attempt in range(4):
        try:
            return client.submit_job(**job)
        except RuntimeError as err:  # Ray's client reports refused requests as RuntimeError
            text = str(err).strip()
            if "No available agent" in text and attempt == 3:
                raise ConnectionError(
                    f"{client.get_address()}: the head's job agent is not available; if the head "
                    "has been up for a while, see dashboard_agent.log on it (a taken "
                    "--dashboard-agent-listen-port, 52365 by default, disables it)"
                ) from None
            if "No available agent" not in text:
                raise ConnectionError(
                    f"{client.get_address()} refused the job: {text.splitlines()[0]}"
                ) from None
            print("the head's job agent is not ready yet; retrying", flush=True)
            time.sleep(2)


async def _print_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def _final_info(client, job_id: str, timeout: float = 30.0):
    """The job's info once terminal: the log stream can close a moment before the
    status is written."""
    deadline = time.time() + timeout
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal() or time.time() > deadline:
            return info
        time.sleep(0.5)
