"""The live /metrics endpoint of the running server."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request

import grpc
import pytest
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc

from .helpers import chat_request


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_after_requests(server_target, metrics_url, engine_name):
    with grpc.insecure_channel(server_target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        stream = stub.Generate(chat_request(max_tokens=8))
        next(stream)
        during = scrape(metrics_url)
        list(stream)
    text = scrape(metrics_url)
    if engine_name == "vllm":  # vLLM's scheduler reports its KV cache usage after every step
        assert 0 < sample(during, "attnserve_scheduler_kv_cache_usage_ratio", model="smollm2") <= 1
    assert sample(text, "attnserve_request_finished_total", model="smollm2") >= 1
    assert sample(text, "attnserve_request_generation_tokens_total", model="smollm2") >= 4
    assert sample(text, "attnserve_request_time_to_first_token_seconds_count", model="smollm2") >= 1
    # The test server samples statistics on every 4th step.
    assert sample(text, "attnserve_attention_sink_mass_ratio_count", model="smollm2", layer="5") >= 1
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make tools)")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_cancel_frees_slot(server_target, metrics_url):
    with grpc.insecure_channel(server_target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        stream = stub.Generate(chat_request("Count from one to two hundred.", max_tokens=200))
        next(stream)
        next(stream)
        assert sample(scrape(metrics_url), "attnserve_scheduler_requests_running", model="smollm2") == 1
        stream.cancel()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if sample(scrape(metrics_url), "attnserve_scheduler_requests_running", model="smollm2") == 0:
                break
            time.sleep(0.05)
        text = scrape(metrics_url)
    assert sample(text, "attnserve_scheduler_requests_running", model="smollm2") == 0
    assert sample(text, "attnserve_scheduler_requests_waiting", model="smollm2") == 0
    assert sample(text, "attnserve_request_finished_total", model="smollm2", finish_reason="cancelled") >= 1
