"""A real Prometheus (Debian's package) scraping a real attnserve and evaluating the
PrometheusRule's rules, and the HTTP API calls the live dashboard test makes."""

from __future__ import annotations

import contextlib
import json
import pathlib
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

import yaml

from .conftest import RULES

PROMETHEUS = pathlib.Path("/usr/bin/prometheus")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def prometheus(metrics_url: str, workdir: pathlib.Path) -> Iterator[str]:
    """Prometheus scraping metrics_url every second and evaluating the recording rules every
    second; yields its API base URL once it is up."""
    groups = yaml.safe_load(RULES.read_text())["spec"]["groups"]
    rules = workdir / "attnserve.rules.yaml"
    rules.write_text(
        yaml.safe_dump({"groups": [group for group in groups if group["name"] == "attnserve.recording"]})
    )
    target = urllib.parse.urlparse(metrics_url).netloc
    config = workdir / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [{"job_name": "attnserve", "static_configs": [{"targets": [target]}]}],
            }
        )
    )
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    log = workdir / "prometheus.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{api}/-/ready", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Prometheus did not start:\n{log.read_text()[-4000:]}") from None
                time.sleep(0.2)
        yield api
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def query(api: str, expr: str) -> list[dict]:
    """An instant query's result vector."""
    url = f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def query_range(api: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    url = f"{api}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": step}
    )
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]
