"""The vLLM engine against the transformers engine and against itself, on the real SmolLM2.

Greedy tokens must match the transformers engine for plain requests and for every operation;
plans that only read attention must leave vLLM's output bit-identical; plain rows beside
intervened ones must match their solo run.
"""

from __future__ import annotations

import asyncio

import pytest
from attnserve.attention.plan import EMPTY_PLAN, OPERATIONS
from attnserve.engines.base import EngineRequest, SamplingConfig

from .cases import OPERATION_SPECS, compile_for, generate, generate_all, prompt_ids

pytestmark = pytest.mark.asyncio(loop_scope="session")


def rows_of(output) -> list:
    """The attention rows a token carries."""
    return output.step_readouts.get("attention_rows", [])


def tokens(outputs) -> list[int]:
    return [out.token_id for out in outputs]


@pytest.fixture(scope="module")
def prompts(vllm_engine):
    return prompt_ids(vllm_engine)


async def test_every_operation_has_a_parity_case(vllm_engine):
    assert set(OPERATION_SPECS) == set(OPERATIONS) == set(vllm_engine.info.supported_operations)


async def test_a_prompt_is_never_split_across_steps(vllm_engine):
    """Plans see whole prompts, as on the transformers engine (sink calibration's column means are
    over the call's query rows): chunked prefill is off, and a step's budget holds any prompt."""
    scheduler = vllm_engine._llm.vllm_config.scheduler_config
    assert not scheduler.enable_chunked_prefill
    assert scheduler.max_num_batched_tokens >= vllm_engine.info.max_context_length


async def test_plain_tokens_equal_transformers(vllm_outputs, transformers_outputs, prompts):
    ours, theirs = vllm_outputs["plain"], transformers_outputs["plain"]
    assert len(ours) == len(prompts) >= 20
    assert [tokens(o) for o in ours] == [tokens(o) for o in theirs]
    for o, t in zip(ours, theirs):
        assert [out.logprob for out in o] == pytest.approx([out.logprob for out in t], abs=2e-3)


@pytest.mark.parametrize("operation", list(OPERATION_SPECS))
async def test_operation_tokens_equal_transformers(vllm_outputs, transformers_outputs, operation):
    ours, theirs, plain = vllm_outputs[operation], transformers_outputs[operation], vllm_outputs["plain"]
    assert [tokens(o) for o in ours] == [tokens(o) for o in theirs]
    # The operation really acted: the first token's logprob moved for most prompts.
    moved = [
        abs(o[0].logprob - p[0].logprob) > 1e-4 or o[0].token_id != p[0].token_id for o, p in zip(ours, plain)
    ]
    assert sum(moved) >= len(plain) // 2


async def test_readouts_equal_transformers(vllm_outputs, transformers_outputs):
    ours, theirs = vllm_outputs["readouts"], transformers_outputs["readouts"]
    assert tokens(ours) == tokens(theirs)
    for o, t in zip(ours, theirs):
        assert [(r.layer, r.head, r.step, r.query_position) for r in rows_of(o)] == [
            (r.layer, r.head, r.step, r.query_position) for r in rows_of(t)
        ]
        for ro, rt in zip(rows_of(o), rows_of(t)):
            assert ro.weights == pytest.approx(rt.weights, abs=1e-4)
    assert sum(len(rows_of(o)) for o in ours) == 3 * 3 * 2
    ours_final, theirs_final = ours[-1].readouts, theirs[-1].readouts
    assert sorted(ours_final["layer_statistics"]) == list(range(30))
    for layer, stats in ours_final["layer_statistics"].items():
        expected = theirs_final["layer_statistics"][layer]
        assert stats.query_count == expected.query_count
        for name in ("entropy", "normalized_entropy", "sink_mass", "sink_mass_first4", "hidden_sinks"):
            assert getattr(stats, name) == pytest.approx(getattr(expected, name), abs=1e-3), name
        assert stats.range_mass == pytest.approx(expected.range_mass, abs=1e-3)
    assert ours_final["summary"].tolist() == pytest.approx(theirs_final["summary"].tolist(), abs=1e-4)


async def test_identity_settings_and_readouts_leave_output_bit_identical(vllm_engine, prompts):
    ids = prompts[1]
    identity = [{"layers": list(range(30)), "sink_calibration": {"tau": 0.1, "beta": 1.0}}]
    readouts = {"layer_statistics": True, "attention_rows": {"layers": [3], "steps": [0, 1]}, "summary": True}
    plain = await generate(vllm_engine, ids)
    for plan in (compile_for(vllm_engine, ids, identity), compile_for(vllm_engine, ids, readouts=readouts)):
        same = await generate(vllm_engine, ids, plan)
        assert tokens(same) == tokens(plain)
        assert [o.logprob for o in same] == [o.logprob for o in plain]
        assert [o.top_logprobs for o in same] == [o.top_logprobs for o in plain]


async def test_plain_rows_beside_intervened_rows_equal_solo(vllm_engine, prompts):
    plain_prompts = prompts[:4]
    solo = [await generate(vllm_engine, ids) for ids in plain_prompts]
    both = [OPERATION_SPECS["sink_calibration"], OPERATION_SPECS["key_emphasis"]]
    intervened = [compile_for(vllm_engine, ids, both) for ids in prompts[4:8]]
    mixed = await generate_all(vllm_engine, [*plain_prompts, *prompts[4:8]], [EMPTY_PLAN] * 4 + intervened)
    assert [tokens(o) for o in mixed[:4]] == [tokens(o) for o in solo]
    for batched, alone in zip(mixed[:4], solo):
        assert [o.logprob for o in batched] == pytest.approx([o.logprob for o in alone], abs=1e-4)


async def test_statistics_samples_reach_the_server(vllm_engine, sampled_layers, prompts):
    before = len(sampled_layers)
    await generate(vllm_engine, prompts[2])
    # A 0.5 sample rate over 8 steps: 4 sampled steps of 30 layers each.
    assert len(sampled_layers) - before >= 3 * 30
    assert set(sampled_layers[before:]) == set(range(30))


async def test_abort_frees_the_slot_and_the_readout_inbox(vllm_engine, prompts):
    plan = compile_for(vllm_engine, prompts[3], readouts={"layer_statistics": True}, max_tokens=200)
    request = EngineRequest("abort", prompts[3], SamplingConfig(max_tokens=200, ignore_eos=True), plan)
    stream = vllm_engine.generate(request)
    await anext(stream)
    await anext(stream)
    assert vllm_engine.num_running == 1 and vllm_engine.num_readout_inboxes == 1
    await stream.aclose()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    while loop.time() < deadline and vllm_engine.num_unfinished_in_vllm:
        await asyncio.sleep(0.02)
    assert vllm_engine.num_unfinished_in_vllm == 0
    assert (vllm_engine.num_running, vllm_engine.num_waiting) == (0, 0)
    assert vllm_engine.num_readout_inboxes == 0
