"""A real Prometheus server scrapes ServerMetrics over HTTP and answers a query with its value."""

import time

import pytest
from attnserve.metrics import ServerMetrics

from deploy import live

QUERY = 'attnserve_request_generation_tokens_total{model="smollm2-135m",engine="hf"}'


@pytest.mark.skipif(
    not live.PROMETHEUS.exists(),
    reason="no Prometheus server at /usr/bin/prometheus (Debian package prometheus)",
)
def test_prometheus_scrapes_the_metrics_endpoint(tmp_path, free_port):
    metrics = ServerMetrics(version="scrape-test")
    metrics.request_queued("smollm2-135m", "hf")
    metrics.request_started("smollm2-135m", "hf", 0.01)
    metrics.request_finished(
        "smollm2-135m", "hf", "length", prompt_tokens=5, generation_tokens=4242, e2e_seconds=2.0
    )
    metrics_port = free_port()
    server, thread = metrics.start_http_server(metrics_port, host="127.0.0.1")
    try:
        with live.prometheus(f"http://127.0.0.1:{metrics_port}/metrics", tmp_path) as api:
            result = []
            deadline = time.monotonic() + 60
            while not result and time.monotonic() < deadline:
                result = live.query(api, QUERY)
                time.sleep(0.5)
        assert result, (
            f"Prometheus never returned {QUERY}:\n{(tmp_path / 'prometheus.log').read_text()[-4000:]}"
        )
        assert float(result[0]["value"][1]) == 4242
        assert result[0]["metric"]["job"] == "attnserve"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
