"""The per-worker Prometheus exporter serves well-named metrics over HTTP on loopback."""

import json
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics import WorkerMetrics, write_file_sd


def scrape(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return {f.name: f for f in text_string_to_metric_families(response.read().decode())}


def test_exporter_serves_step_metrics(tmp_path):
    metrics = WorkerMetrics(run="unit", rank=1)
    endpoint = metrics.start("127.0.0.1", 0)
    try:
        metrics.observe_step(step=3, loss=1.5, loss_terms={"loss_ce": 0.5, "loss_dice": 1.0}, batch_size=4,
                             step_seconds=0.2, loader_wait_seconds=0.01, learning_rate=1e-3)
        metrics.observe_step(step=4, loss=1.25, loss_terms={"loss_ce": 0.25}, batch_size=4,
                             step_seconds=0.3, loader_wait_seconds=0.02, learning_rate=1e-3)
        families = scrape(endpoint.url)
    finally:
        metrics.stop()
    names = set(families)
    for name in ("segscale_step", "segscale_samples", "segscale_step_duration_seconds", "segscale_loss",
                 "segscale_loss_term", "segscale_learning_rate", "segscale_loader_wait_seconds",
                 "segscale_process_resident_memory_bytes", "segscale_last_step_timestamp_seconds"):
        assert name in names, name
    samples = {s.name: s for s in families["segscale_samples"].samples}
    assert samples["segscale_samples_total"].value == 8
    assert samples["segscale_samples_total"].labels == {"run": "unit", "rank": "1"}
    assert families["segscale_step"].samples[0].value == 4
    count = [s for s in families["segscale_step_duration_seconds"].samples if s.name.endswith("_count")]
    assert count[0].value == 2
    for family in families.values():
        for sample in family.samples:
            assert "job" not in sample.labels

    path = tmp_path / "targets.json"
    write_file_sd(str(path), [endpoint])
    assert json.loads(path.read_text()) == [{"targets": [f"127.0.0.1:{endpoint.port}"]}]


def test_taken_port_falls_back_and_textfile(tmp_path):
    first = WorkerMetrics(run="unit", rank=0)
    taken = first.start("127.0.0.1", 0)
    second = WorkerMetrics(run="unit", rank=0)
    try:
        other = second.start("127.0.0.1", taken.port)
        assert other.port != taken.port
        second.observe_checkpoint(1.5, 1024)
        path = tmp_path / "rank_0.prom"
        second.write_textfile(str(path))
        text = path.read_text()
        assert 'segscale_checkpoints_total{rank="0",run="unit"} 1.0' in text
        assert 'segscale_checkpoint_size_bytes_total{rank="0",run="unit"} 1024.0' in text
    finally:
        first.stop()
        second.stop()


def test_skipped_samples_counter(tmp_path):
    metrics = WorkerMetrics(run="unit", rank=1)
    metrics.observe_skipped(0)
    path = tmp_path / "rank_1.prom"
    metrics.write_textfile(str(path))
    # Exported at zero from the start, so rate() and alerts have a series before any skip.
    assert 'segscale_data_skipped_samples_total{rank="1",run="unit"} 0.0' in path.read_text()
    metrics.observe_skipped(2)
    metrics.observe_skipped(1)
    metrics.write_textfile(str(path))
    assert 'segscale_data_skipped_samples_total{rank="1",run="unit"} 3.0' in path.read_text()


def test_step_extras_restarts_and_nonfinite_loss(tmp_path):
    metrics = WorkerMetrics(run="unit", rank=0)
    path = tmp_path / "rank_0.prom"
    metrics.write_textfile(str(path))
    text = path.read_text()
    for counter in ("segscale_restarts_total", "segscale_nonfinite_loss_total", "segscale_checkpoint_size_bytes_total",
                    "segscale_samples_total", "segscale_loader_wait_seconds_total"):
        assert f'{counter}{{rank="0",run="unit"}} 0.0' in text, counter
    metrics.observe_step(step=1, loss=2.0, loss_terms={}, batch_size=2, step_seconds=0.5, loader_wait_seconds=0.0,
                         learning_rate=1e-4, grad_norm=3.5, mfu=0.25)
    metrics.observe_restart(2)
    metrics.observe_nonfinite_loss(float("nan"))
    metrics.write_textfile(str(path))
    text = path.read_text()
    assert 'segscale_grad_norm{rank="0",run="unit"} 3.5' in text
    assert 'segscale_mfu{rank="0",run="unit"} 0.25' in text
    assert 'segscale_restarts_total{rank="0",run="unit"} 2.0' in text
    assert 'segscale_nonfinite_loss_total{rank="0",run="unit"} 1.0' in text
    assert 'segscale_loss{rank="0",run="unit"} NaN' in text
    assert 'segscale_gpu_memory_allocated_bytes{rank="0",run="unit"} 0.0' in text  # CPU worker


def test_live_targets_file_sits_in_one_globbable_folder(tmp_path):
    from cluster.metrics import MetricsEndpoint, live_targets_file

    path = live_targets_file(str(tmp_path / "runs" / "my-run"))
    assert path == str(tmp_path / "runs" / "prometheus_targets" / "my-run.json")
    write_file_sd(path, [MetricsEndpoint("10.0.0.2", 9401, rank=1), MetricsEndpoint("10.0.0.1", 9400, rank=0)])
    assert json.loads(open(path).read()) == [{"targets": ["10.0.0.1:9400", "10.0.0.2:9401"]}]
