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
        second.observe_checkpoint(1.5)
        path = tmp_path / "rank_0.prom"
        second.write_textfile(str(path))
        assert 'segscale_checkpoints_total{rank="0",run="unit"} 1.0' in path.read_text()
    finally:
        first.stop()
        second.stop()


def test_skipped_samples_counter(tmp_path):
    metrics = WorkerMetrics(run="unit", rank=1)
    metrics.observe_skipped(0)  # nothing new: nothing exported
    path = tmp_path / "rank_1.prom"
    metrics.write_textfile(str(path))
    assert 'segscale_data_skipped_samples_total{rank="1",run="unit"}' not in path.read_text()
    metrics.observe_skipped(2)
    metrics.observe_skipped(1)
    metrics.write_textfile(str(path))
    assert 'segscale_data_skipped_samples_total{rank="1",run="unit"} 3.0' in path.read_text()
