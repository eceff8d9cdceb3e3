"""A real Prometheus server scrapes ServerMetrics over HTTP and answers a query with its value."""

import json
import pathlib
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from attnserve.metrics import ServerMetrics

PROMETHEUS = pathlib.Path("/usr/bin/prometheus")
QUERY = 'attnserve_request_generation_tokens_total{model="smollm2-135m",engine="hf"}'


def query(api_port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{api_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)["data"]["result"]


@pytest.mark.skipif(
    not PROMETHEUS.exists(), reason="no Prometheus server at /usr/bin/prometheus (Debian package prometheus)"
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

    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: attnserve\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    api_port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("w") as log_file:
        prometheus = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{api_port}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        result = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and prometheus.poll() is None:
            try:
                result = query(api_port, QUERY)
            except OSError:  # not listening yet
                pass
            if result:
                break
            time.sleep(0.5)
        assert result, f"Prometheus never returned {QUERY}:\n{log.read_text()[-4000:]}"
        assert float(result[0]["value"][1]) == 4242
        assert result[0]["metric"]["job"] == "attnserve"
    finally:
        prometheus.terminate()
        try:
            prometheus.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
