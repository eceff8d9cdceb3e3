"""A request whose numbers go bad fails alone: the requests beside it in the batch, and those that
reuse its KV cache after it, give exactly the tokens they give alone. Planned requests and plain
ones never share vLLM's prefix cache. (The prefix-cache test, run after the bad rows, also has a
request get a fresh cache block mid-decode that held a bad row's NaN keys: vLLM's CPU kernel
reads a block's unused slots, so the engine never writes non-finite keys or values.)

The plans and sampling settings here are beyond what the API accepts (spec/ranges.py refuses
them); they are built directly to make a row's arithmetic overflow inside the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import pytest_asyncio
from attnserve.attention.plan import (
    EMPTY_PLAN,
    HeadOutputScale,
    LogitRescale,
    RequestPlan,
    ScopedOp,
    StepRange,
    Temperature,
)
from attnserve.engines.base import EngineRequest, NonFiniteOutput, SamplingConfig, ScoreRequest
from attnserve.engines.hf.engine import TransformersEngine
from attnserve.readouts.layer_statistics import LayerStatisticsSettings

from .cases import chat_ids, tokens
from .prompts import QUESTIONS

MAX_TOKENS = 12
GREEDY = SamplingConfig(max_tokens=MAX_TOKENS)


def _on_every_layer(op, num_layers: int) -> RequestPlan:
    return RequestPlan(
        layer_ops={layer: ((StepRange(), ScopedOp(op)),) for layer in range(num_layers)},
        applied_operations=("overflow",),
    )


def bad_requests(engine, prompt: tuple[int, ...]) -> dict[str, EngineRequest]:
    layers = engine.info.geometry.num_layers
    plans = {
        "head_output_scale 3e38": _on_every_layer(HeadOutputScale(3e38), layers),
        "attention temperature 1e-45": _on_every_layer(Temperature(1e-45), layers),
        "logit_rescale alpha 3e38": _on_every_layer(LogitRescale(3e38), layers),
    }
    return {name: EngineRequest(name, prompt, GREEDY, plan) for name, plan in plans.items()}


async def _tokens(engine, request: EngineRequest) -> list[int]:
    return tokens([out async for out in engine.generate(request)])


async def check_bad_rows_fail_alone(engine, bad: dict[str, EngineRequest]) -> None:
    prompts = [chat_ids(engine, q) for q in QUESTIONS[:4]]
    plain = [EngineRequest(f"plain-{i}", ids, GREEDY, EMPTY_PLAN) for i, ids in enumerate(prompts)]
    alone = [await _tokens(engine, request) for request in plain]

    together = await asyncio.gather(
        *(_tokens(engine, request) for request in [*plain, *bad.values()]), return_exceptions=True
    )
    for name, result in zip(bad, together[len(plain) :]):
        assert isinstance(result, NonFiniteOutput), f"{name}: {result!r}"
    assert together[: len(plain)] == alone
    # Their successors reuse the freed KV cache and batch slots.
    assert await asyncio.gather(*(_tokens(engine, request) for request in plain)) == alone


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def transformers_engine(smollm2_path):
    engine = TransformersEngine(smollm2_path, max_batch_size=16)
    await engine.start()
    yield engine
    await engine.shutdown()


@pytest.mark.asyncio(loop_scope="session")
async def test_transformers_engine_fails_only_the_bad_rows(transformers_engine):
    engine = transformers_engine
    bad = bad_requests(engine, chat_ids(engine, QUESTIONS[5]))
    # Logits / 1e-45 are infinite: the sampler's probabilities would be NaN.
    tiny = SamplingConfig(max_tokens=MAX_TOKENS, temperature=1e-45, seed=3)
    bad["sampling temperature 1e-45"] = EngineRequest("tiny", chat_ids(engine, QUESTIONS[6]), tiny)
    await check_bad_rows_fail_alone(engine, bad)


@pytest.mark.asyncio(loop_scope="session")
async def test_transformers_engine_score_with_bad_numbers_fails(transformers_engine):
    engine = transformers_engine
    prompt = chat_ids(engine, QUESTIONS[1])
    paris = tuple(engine.tokenizer.encode(" Paris", add_special_tokens=False))
    plan = _on_every_layer(HeadOutputScale(3e38), engine.info.geometry.num_layers)
    with pytest.raises(NonFiniteOutput):
        await engine.score(ScoreRequest("bad", prompt, (paris,), plan))
    (good,) = await engine.score(ScoreRequest("good", prompt, (paris,)))
    assert -20 < good < 0


@pytest.mark.asyncio(loop_scope="session")
async def test_vllm_engine_fails_only_the_bad_rows(vllm_engine):
    # vLLM raises sampling temperatures below 0.01 to 0.01 itself: only plans can overflow.
    await check_bad_rows_fail_alone(
        vllm_engine, bad_requests(vllm_engine, chat_ids(vllm_engine, QUESTIONS[5]))
    )


@pytest.mark.asyncio(loop_scope="session")
async def test_vllm_prefix_cache_is_never_shared_with_planned_requests(vllm_engine, transformers_engine):
    """vLLM caches prompt blocks by their tokens: a planned request must not read a plain one's
    blocks (its KV differs from the first intervened layer on, and its readouts need every
    prompt position), nor leave its own blocks for a plain one to read."""
    river = "A river slows where it meets the sea and drops the sand and silt it carries. "
    prompt = chat_ids(vllm_engine, river * 20 + "Explain in two sentences why a delta splits into channels.")
    assert len(prompt) > 2 * 128  # two full cache blocks (vLLM's CPU default block size is 128)
    plan = dataclasses.replace(
        _on_every_layer(Temperature(0.5), vllm_engine.info.geometry.num_layers),
        readouts=(LayerStatisticsSettings(),),
    )

    async def planned() -> tuple[list[int], int]:
        outputs = [out async for out in vllm_engine.generate(EngineRequest("planned", prompt, GREEDY, plan))]
        return tokens(outputs), outputs[-1].readouts["layer_statistics"][0].query_count

    plain = EngineRequest("plain", prompt, GREEDY, EMPTY_PLAN)
    first, query_count = await planned()  # the prompt is new: nothing cached to read
    assert query_count == len(prompt) + MAX_TOKENS - 1  # every prompt row, then one per step
    # Plain after planned: the transformers engine's plain tokens, not the planned request's KV.
    assert await _tokens(vllm_engine, plain) == await _tokens(transformers_engine, plain)
    # Planned after plain: every prompt position computed again under the plan.
    assert await planned() == (first, query_count)


@pytest.mark.asyncio(loop_scope="session")
async def test_vllm_engine_score_with_bad_numbers_fails_alone(vllm_engine):
    engine = vllm_engine
    prompt = chat_ids(engine, QUESTIONS[1])
    paris = tuple(engine.tokenizer.encode(" Paris", add_special_tokens=False))
    plan = _on_every_layer(HeadOutputScale(3e38), engine.info.geometry.num_layers)
    good_request = ScoreRequest("good", prompt, (paris,))
    bad, (good,) = await asyncio.gather(
        engine.score(ScoreRequest("bad", prompt, (paris,), plan)),
        engine.score(good_request),
        return_exceptions=True,
    )
    assert isinstance(bad, NonFiniteOutput), repr(bad)
    assert -20 < good < 0
    assert await engine.score(good_request) == pytest.approx([good], abs=1e-5)
