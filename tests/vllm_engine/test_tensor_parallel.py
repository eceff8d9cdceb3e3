"""Interventions and readouts under tensor parallelism: vLLM's CPU build with
tensor_parallel_size 2 against 1, on a tiny random Llama built here (4 query heads and 2 KV heads
of size 32, so each worker holds 2 and 1; SmolLM2's 9 and 3 do not split in two).

Each engine starts once (TP 2 first, then TP 1, never both at once on two cores) and runs every
case; greedy tokens must be equal under each operation with heads on both workers and on one,
Score's log-probabilities, readouts and sampled statistics within 1e-4 (the workers' partial sums add up in another
order than one worker's).
"""

from __future__ import annotations

import asyncio
import os

import pytest
import pytest_asyncio
from attnserve.attention.plan import EMPTY_PLAN, OPERATIONS
from attnserve.engines.base import ScoreRequest
from attnserve.engines.prompts import answer_token_ids
from attnserve.engines.vllm.engine import VllmEngine, cpu_thread_binding
from attnserve.models.config import VllmSettings

from .cases import SCORE_CANDIDATES, chat_ids, compile_for, generate, generate_all, tokens
from .prompts import QUESTIONS

pytestmark = pytest.mark.asyncio(loop_scope="session")

MAX_TOKENS = 6
PROMPTS = [QUESTIONS[1], QUESTIONS[7], QUESTIONS[12]]
#: Worker 0 holds query heads 0 and 1, worker 1 heads 2 and 3.
HEADS = {"both_workers": [1, 2], "one_worker": [3]}
OPERATION_SPECS = {
    "sink_calibration": {"sink_calibration": {"tau": 0.1, "beta": 0.2}},
    "key_emphasis": {"keys": {"ranges": [[0, 5]], "invert": True}, "key_emphasis": {"alpha": 0.01}},
    "logit_rescale": {"logit_rescale": {"alpha": 1.5}},
    "head_output_scale": {"head_output_scale": {"scale": 0.0}},
    "identity_blend": {"identity_blend": {"weight": 0.5}},
    "temperature": {"temperature": {"temperature": 3.0}},
    "key_mask": {"keys": {"ranges": [[1, 8]]}, "key_mask": {}},
}
CASES = {
    f"{op}-{where}": {**spec, "heads": heads}
    for op, spec in OPERATION_SPECS.items()
    for where, heads in HEADS.items()
}
#: One sink calibration on worker 1's heads only, read out.
READOUT_INTERVENTION = {"layers": [1], "heads": [2], "sink_calibration": {"tau": 0.05, "beta": 0.0}}
READOUT_SPEC = {
    "layer_statistics": True,
    "mass_ranges": [[0, 1], [2, 6]],
    "attention_rows": {"layers": [0, 1, 2], "steps": [0, 3]},
}


def build_tiny_llama(out_dir, tokenizer_dir) -> None:
    """A seeded random Llama (3 layers, width 128) with SmolLM2's tokenizer; the wide
    initialisation (std 0.2, as tiny-llava) makes attention peaked, so operations change tokens."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    torch.manual_seed(1234)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@pytest.fixture(scope="module")
def tiny_llama_path(tmp_path_factory, smollm2_path):
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(path, smollm2_path)
    return path


async def run_engine(path, cache_dir, tensor_parallel_size: int) -> dict:
    """Every case's outputs on one engine, then the engine stopped."""
    sampled = []
    engine = VllmEngine(
        path,
        max_batch_size=len(PROMPTS) * (len(CASES) + 1),
        statistics_sample_rate=1.0,
        on_statistics=lambda layer, stats: sampled.append((layer, stats)),
        settings=VllmSettings(enforce_eager=True, kv_cache_gib=1, tensor_parallel_size=tensor_parallel_size),
        cache_dir=cache_dir,
    )
    # Per-worker core lists; an engine started earlier in this process may have set its own.
    with pytest.MonkeyPatch.context() as patch:
        cores = sorted(os.sched_getaffinity(0))
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(cores, tensor_parallel_size))
        await engine.start()
    try:
        assert engine._llm.vllm_config.parallel_config.tensor_parallel_size == tensor_parallel_size
        outputs = {"supported_operations": engine.info.supported_operations}
        prompts = [chat_ids(engine, text) for text in PROMPTS]
        plans = {"plain": [EMPTY_PLAN] * len(prompts)}
        for name, spec in CASES.items():
            plans[name] = [compile_for(engine, ids, [spec], max_tokens=MAX_TOKENS) for ids in prompts]
        # Every case in one batch: a step of this tiny model costs its fixed overhead mostly.
        results = await asyncio.gather(
            *(
                generate_all(engine, prompts, case_plans, max_tokens=MAX_TOKENS)
                for case_plans in plans.values()
            )
        )
        outputs.update(zip(plans, results))
        candidates = tuple(answer_token_ids(engine.tokenizer, text) for text in SCORE_CANDIDATES)
        score_plans = {"plain": EMPTY_PLAN} | {name: plans[name][0] for name in CASES}
        scores = await asyncio.gather(
            *(
                engine.score(ScoreRequest(f"score-{name}", prompts[0], candidates, plan))
                for name, plan in score_plans.items()
            )
        )
        outputs["scores"] = dict(zip(score_plans, scores))
        # Alone in its steps, so that every step samples this request's statistics.
        sampled.clear()
        plan = compile_for(engine, prompts[1], [READOUT_INTERVENTION], READOUT_SPEC, max_tokens=MAX_TOKENS)
        outputs["readouts"] = await generate(engine, prompts[1], plan, max_tokens=MAX_TOKENS)
        outputs["sampled"] = list(sampled)
        return outputs
    finally:
        await engine.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def outputs(tiny_llama_path, tmp_path_factory) -> dict[int, dict]:
    cache_dir = tmp_path_factory.mktemp("vllm-cache")
    tp2 = await run_engine(tiny_llama_path, cache_dir, 2)
    tp1 = await run_engine(tiny_llama_path, cache_dir, 1)
    return {1: tp1, 2: tp2}


async def test_tensor_parallel_engine_offers_every_operation(outputs):
    assert outputs[2]["supported_operations"] == frozenset(OPERATIONS) == outputs[1]["supported_operations"]


async def test_plain_tokens_equal(outputs):
    assert [tokens(o) for o in outputs[2]["plain"]] == [tokens(o) for o in outputs[1]["plain"]]


@pytest.mark.parametrize("case", list(CASES))
async def test_operation_tokens_equal(outputs, case):
    ours, theirs, plain = outputs[2][case], outputs[1][case], outputs[1]["plain"]
    assert [tokens(o) for o in ours] == [tokens(o) for o in theirs]
    for o, t in zip(ours, theirs):
        assert [out.logprob for out in o] == pytest.approx([out.logprob for out in t], abs=1e-4)
    # The operation really acted: the first token's logprob moved for some prompt.
    assert any(abs(o[0].logprob - p[0].logprob) > 1e-3 for o, p in zip(theirs, plain))


async def test_scores_equal(outputs):
    """Score under tensor parallelism: the plan on every prompt position, on each worker's heads."""
    ours, theirs = outputs[2]["scores"], outputs[1]["scores"]
    assert list(ours) == list(theirs) == ["plain", *CASES]
    for name in theirs:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-4), name
    # The operations acted on the scores too.
    assert any(abs(o - p) > 1e-3 for name in CASES for o, p in zip(theirs[name], theirs["plain"]))


def rows_of(output) -> list:
    return output.step_readouts.get("attention_rows", [])


async def test_attention_rows_equal(outputs):
    ours, theirs = outputs[2]["readouts"], outputs[1]["readouts"]
    assert tokens(ours) == tokens(theirs)
    ours_rows = [row for out in ours for row in rows_of(out)]
    theirs_rows = [row for out in theirs for row in rows_of(out)]
    assert len(theirs_rows) == 3 * 4 * 2  # layers x heads x steps
    assert [(r.layer, r.head, r.step, r.query_position) for r in ours_rows] == [
        (r.layer, r.head, r.step, r.query_position) for r in theirs_rows
    ]
    for o, t in zip(ours_rows, theirs_rows):
        assert o.weights == pytest.approx(t.weights, abs=1e-4)


def assert_statistics_equal(ours, theirs) -> None:
    for name, value in vars(theirs).items():
        assert vars(ours)[name] == pytest.approx(value, abs=1e-4), name


async def test_layer_statistics_equal(outputs):
    ours = outputs[2]["readouts"][-1].readouts["layer_statistics"]
    theirs = outputs[1]["readouts"][-1].readouts["layer_statistics"]
    assert sorted(ours) == sorted(theirs) == [0, 1, 2]
    for layer in theirs:
        assert_statistics_equal(ours[layer], theirs[layer])


async def test_sampled_statistics_equal(outputs):
    ours, theirs = outputs[2]["sampled"], outputs[1]["sampled"]
    assert [layer for layer, _ in ours] == [layer for layer, _ in theirs] == [0, 1, 2] * MAX_TOKENS
    for (_, o), (_, t) in zip(ours, theirs):
        assert_statistics_equal(o, t)
