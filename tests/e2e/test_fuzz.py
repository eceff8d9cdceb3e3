"""A short fuzz run against the live server (bench/fuzz.py is the long one): hypothesis draws
requests with extreme and non-finite numbers, long strings and lists, and corrupted bytes; every
answer follows the rule in fuzzing.py, a valid stream kept running beside them is unharmed, and the
server still answers a known prompt afterwards."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings

from .conftest import SERVICE
from .fuzzing import Call, StreamsBeside, Tally, calls, greedy_tokens, send

EXAMPLES = 100


@pytest.fixture(scope="module")
def channel(server_target):
    with grpc.insecure_channel(server_target) as channel:
        yield channel


def test_fuzzed_requests_get_clear_answers_and_harm_no_one(channel):
    alone = greedy_tokens(channel)
    tally = Tally()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(calls())
    def fuzz(call: Call) -> None:
        tally.add(send(channel, call))

    with StreamsBeside(channel, alone) as beside:
        fuzz()
    assert beside.runs >= 1 and beside.mismatches == 0, (beside.runs, beside.mismatches)
    assert tally.total >= EXAMPLES
    assert tally.codes["INVALID_ARGUMENT"] > 0 and tally.codes["OK"] > 0, tally.codes

    status = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE), timeout=10
    )
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert greedy_tokens(channel) == alone
