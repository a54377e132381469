"""What a user of `launcher submit` met on a real head, checked without starting Ray:
a second job for a run that is still running is refused (both would write the same
checkpoints), and a dashboard address typed without ``http://`` is used as the
dashboard's URL instead of as a GCS address Ray would wait ~45 s for."""

import http.server
import os
import socket
import threading

import pytest
from e2e_helpers import REPO
from ray.job_submission import JobDetails, JobStatus, JobType

from launcher.config import ConfigError, load_config
from launcher.submit import dashboard_url, refuse_if_running

ADDRESS = "http://head:8265"


class FakeClient:
    """The one call refuse_if_running makes, answering with Ray's own job records."""

    def __init__(self, jobs):
        self.jobs = jobs

    def list_jobs(self):
        return self.jobs


def _job(status, entrypoint="python -m launcher train --config configs/demo.yaml", metadata=None,
         submission_id="old-job"):
    return JobDetails(type=JobType.SUBMISSION, submission_id=submission_id, status=status,
                      entrypoint=entrypoint, metadata=metadata or {})


def _cfg(run_name="my-run", output_dir="/mnt/shared/runs"):
    return load_config(os.path.join(REPO, "configs", "test_tiny.yaml"), [f"train.run_name={run_name}", f"train.output_dir={output_dir}"])


def test_a_run_whose_job_still_runs_is_refused_with_the_commands_for_that_job():
    running = _job(JobStatus.RUNNING, metadata={"segscale_run": "my-run", "segscale_output_dir": "/mnt/shared/runs"})
    with pytest.raises(ConfigError) as refused:
        refuse_if_running(FakeClient([running]), _cfg(), ADDRESS, "RAY_AUTH_MODE=token ")
    message = str(refused.value)
    assert "\n" not in message and "train.run_name=my-run" in message and "old-job" in message, message
    assert f"RAY_AUTH_MODE=token ray job stop --address {ADDRESS} old-job" in message, message

    # A raw `ray job submit -- python -m launcher train ... --set train.run_name=...` counts too.
    raw = _job(JobStatus.PENDING, entrypoint="python -m launcher train --config c.yaml --set "
               "train.run_name=my-run --set train.output_dir=/mnt/shared/runs", submission_id="raw-job")
    with pytest.raises(ConfigError, match="raw-job"):
        refuse_if_running(FakeClient([raw]), _cfg(), ADDRESS)


def test_finished_jobs_and_other_runs_do_not_block_a_resubmission():
    jobs = [
        _job(JobStatus.SUCCEEDED, metadata={"segscale_run": "my-run", "segscale_output_dir": "/mnt/shared/runs"}),
        _job(JobStatus.FAILED, metadata={"segscale_run": "my-run"}),
        _job(JobStatus.RUNNING, metadata={"segscale_run": "other-run"}),
        # Same name, another output folder: another run.
        _job(JobStatus.RUNNING, metadata={"segscale_run": "my-run", "segscale_output_dir": "/mnt/shared/elsewhere"}),
        _job(JobStatus.RUNNING, entrypoint="python my_script.py --set train.run_name=my-run"),  # not a train
    ]
    refuse_if_running(FakeClient(jobs), _cfg(), ADDRESS)  # returns: nothing refused


class _Unauthorized(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # what a token-auth dashboard answers a client without the token
        self.send_response(401)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_an_address_without_scheme_is_the_dashboard_when_http_answers_there():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_port}"
        assert dashboard_url(address) == f"http://{address}"
    finally:
        server.shutdown()
        server.server_close()

    # Something that is not HTTP (a GCS speaks gRPC) and a closed port stay as given.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    not_http = f"127.0.0.1:{listener.getsockname()[1]}"

    def answer_garbage():
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00")  # an HTTP/2 SETTINGS frame
        conn.close()

    threading.Thread(target=answer_garbage, daemon=True).start()
    try:
        assert dashboard_url(not_http, timeout=5) == not_http
    finally:
        listener.close()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert dashboard_url(f"127.0.0.1:{port}") == f"127.0.0.1:{port}"
    assert dashboard_url("http://head:8265") == "http://head:8265"  # a URL is left alone


def test_a_run_before_its_first_step_can_be_picked_and_timed_in_the_dashboard():
    """A run that hangs before its first step (a collective, shards that never arrive) is
    the one to look at: the dashboard's run and rank variables must list it, and the
    seconds-since-last-step panel (like the stall alert) must count from its start."""
    import json
    import re
    import time
    import urllib.request

    from cluster.metrics import WorkerMetrics

    metrics = WorkerMetrics(run="hung", rank=0)
    endpoint = metrics.start("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(endpoint.url, timeout=5) as answer:
            text = answer.read().decode()
    finally:
        metrics.stop()
    exported = {line.split("{")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert "segscale_step" not in exported  # no step yet

    with open(os.path.join(REPO, "cluster", "grafana", "dashboards", "segscale.json")) as f:
        dashboard = json.load(f)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            (metric,) = re.findall(r"label_values\((segscale_[a-z_]+)", variable["definition"])
            assert metric in exported, f"variable {variable['name']} lists only runs that export {metric}"
    started = re.search(r'segscale_start_timestamp_seconds\{rank="0",run="hung"\} (\S+)', text)
    assert started and abs(float(started.group(1)) - time.time()) < 60, text
    since = [t["expr"] for p in dashboard["panels"] if p.get("title") == "Seconds since last step"
             for t in p["targets"]]
    assert since and all("segscale_start_timestamp_seconds" in expr for expr in since), since
