"""An engine that cannot score refuses Score with FAILED_PRECONDITION and a message saying why."""

from __future__ import annotations

import asyncio

import pytest
from attnserve.api.errors import to_status
from attnserve.engines.base import Engine, ScoreRequest
from attnserve.spec.errors import Unsupported
from google.rpc import code_pb2


class GenerateOnlyEngine(Engine):
    """An engine without a score() of its own (as the vLLM engine)."""

    async def start(self) -> None: ...

    def generate(self, request):
        raise NotImplementedError

    async def shutdown(self) -> None: ...

    @property
    def num_running(self) -> int:
        return 0

    @property
    def num_waiting(self) -> int:
        return 0


def test_default_score_is_unsupported():
    request = ScoreRequest(request_id="r", prompt_token_ids=(1, 2), candidate_token_ids=((3,),))
    with pytest.raises(Unsupported) as raised:
        asyncio.run(GenerateOnlyEngine().score(request))
    assert "GenerateOnlyEngine" in str(raised.value) and "transformers engine" in str(raised.value)
    assert to_status(raised.value).code.value[0] == code_pb2.FAILED_PRECONDITION
