"""The servicer routes by the capabilities an engine derives from: an engine without
CandidateScoring is refused Score with FAILED_PRECONDITION and a message saying what it serves."""

from __future__ import annotations

import pytest
from attnserve.api.errors import to_status
from attnserve.api.servicer import capable_engine
from attnserve.engines.base import (
    CandidateScoring,
    Engine,
    EngineInfo,
    TextGeneration,
    served_rpcs,
)
from attnserve.models.config import Limits
from attnserve.models.registry import ServedModel
from attnserve.spec.errors import Unsupported
from attnserve.spec.geometry import ModelGeometry
from google.rpc import code_pb2


class GenerateOnlyEngine(Engine, TextGeneration):
    """An engine that generates but cannot score."""

    info = EngineInfo(ModelGeometry.causal_lm(2, 4, 2, 8), 128, frozenset(), frozenset())
    tokenizer = None

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


def _served(engine: Engine) -> ServedModel:
    return ServedModel("m", "llm", "vllm", engine, Limits(), {})


def test_rpcs_follow_the_capabilities():
    assert served_rpcs(GenerateOnlyEngine()) == ("Generate",)


def test_an_rpc_without_its_capability_is_failed_precondition():
    model = _served(GenerateOnlyEngine())
    assert capable_engine(model, TextGeneration, "Generate") is model.engine
    with pytest.raises(Unsupported) as raised:
        capable_engine(model, CandidateScoring, "Score")
    assert "cannot serve Score; it serves: Generate" in str(raised.value)
    assert to_status(raised.value).code.value[0] == code_pb2.FAILED_PRECONDITION
