"""A transformers engine whose scheduler thread dies fails the requests it holds with EngineDead
and says so in `failure` (the server then stops), instead of leaving them waiting forever."""

from __future__ import annotations

import asyncio

import pytest
from attnserve.engines.base import EngineDead, EngineRequest, SamplingConfig
from attnserve.engines.hf.engine import TransformersEngine


def _broken_schedule():
    raise RuntimeError("a bug in the scheduler")


@pytest.mark.asyncio(loop_scope="session")
async def test_a_dead_scheduler_thread_fails_its_requests(smollm2_path):
    engine = TransformersEngine(smollm2_path, max_batch_size=2)
    request = EngineRequest("r", tuple(engine.tokenizer.encode("Hello")), SamplingConfig(max_tokens=4))
    engine._scheduler.schedule = _broken_schedule  # the fault: the thread's first step raises
    first_token = asyncio.ensure_future(anext(engine.generate(request)))
    await asyncio.sleep(0.1)  # generate() has queued its row
    await engine.start()
    with pytest.raises(EngineDead):
        await asyncio.wait_for(first_token, 30)
    assert "scheduler thread stopped" in engine.failure
    with pytest.raises(EngineDead):
        await anext(engine.generate(request))
    await engine.shutdown()
