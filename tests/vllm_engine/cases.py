"""The parity cases: prompts, one intervention per operation, a readout spec, and helpers to
compile and run them on either engine."""

from __future__ import annotations

import asyncio

from attnserve.attention.plan import EMPTY_PLAN, RequestPlan
from attnserve.engines.base import EngineRequest, SamplingConfig, ScoreRequest
from attnserve.engines.prompts import answer_token_ids
from attnserve.spec.compile import SpecContext, SpecLimits, compile_plan
from attnserve_client.spec import intervention_spec_from_dict, readout_spec_from_dict

from .prompts import QUESTIONS

MAX_TOKENS = 8

#: One intervention per operation, on a few layers so the test stays fast.
OPERATION_SPECS = {
    "sink_calibration": {"layers": [3, 4], "sink_calibration": {"tau": 0.1, "beta": 0.4}},
    "key_emphasis": {
        "layers": [2, 8, 14],
        "keys": {"ranges": [[0, 5]], "invert": True},
        "key_emphasis": {"alpha": 0.01},
    },
    "logit_rescale": {"layers": [5, 6], "logit_rescale": {"alpha": 1.5}},
    "head_output_scale": {"layers": [5], "heads": [0, 3], "head_output_scale": {"scale": 0.0}},
    "identity_blend": {"layers": [10, 11], "identity_blend": {"weight": 0.5}},
    "temperature": {"layers": [2, 3, 4], "temperature": {"temperature": 2.0}},
    "key_mask": {"layers": [1, 2], "keys": {"ranges": [[3, 6]]}, "key_mask": {}},
}


def chat_ids(engine, text: str) -> tuple[int, ...]:
    messages = [{"role": "user", "content": text}]
    return tuple(
        engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    )


def compile_for(engine, prompt_ids, interventions=(), readouts=None, max_tokens=MAX_TOKENS) -> RequestPlan:
    info = engine.info
    return compile_plan(
        intervention_spec_from_dict({"interventions": list(interventions)}),
        readout_spec_from_dict(readouts or {}),
        SpecContext(
            geometry=info.geometry,
            limits=SpecLimits(max_interventions=16, max_readout_values=1 << 20),
            presets={},
            prompt_tokens=len(prompt_ids),
            max_tokens=max_tokens,
            supported_operations=info.supported_operations,
        ),
    )


async def generate(engine, prompt_ids, plan=EMPTY_PLAN, max_tokens=MAX_TOKENS):
    request = EngineRequest("parity", prompt_ids, SamplingConfig(max_tokens=max_tokens, top_logprobs=2), plan)
    return [out async for out in engine.generate(request)]


async def generate_all(engine, prompts, plans, max_tokens=MAX_TOKENS):
    return await asyncio.gather(
        *(generate(engine, ids, plan, max_tokens) for ids, plan in zip(prompts, plans))
    )


def tokens(outputs) -> list[int]:
    return [out.token_id for out in outputs]


READOUT_PROMPT = 7
READOUT_SPEC = {
    "layer_statistics": True,
    "mass_ranges": [[0, 1]],
    "attention_rows": {"layers": [0, 5, 29], "heads": [0, 4, 8], "steps": [0, 3]},
    "summary": True,
}


def prompt_ids(engine) -> list[tuple[int, ...]]:
    return [chat_ids(engine, q) for q in QUESTIONS]


def operation_plans(engine, prompts, operation: str) -> list[RequestPlan]:
    return [compile_for(engine, ids, [OPERATION_SPECS[operation]]) for ids in prompts]


def readout_plan(engine, prompts) -> RequestPlan:
    ids = prompts[READOUT_PROMPT]
    return compile_for(engine, ids, [OPERATION_SPECS["sink_calibration"]], READOUT_SPEC)


async def run_cases(engine) -> dict:
    """Outputs of every parity case: "plain", each operation, "readouts" and "scores" (score_cases)."""
    prompts = prompt_ids(engine)
    outputs = {"plain": await generate_all(engine, prompts, [EMPTY_PLAN] * len(prompts))}
    for operation in OPERATION_SPECS:
        outputs[operation] = await generate_all(engine, prompts, operation_plans(engine, prompts, operation))
    outputs["readouts"] = await generate(engine, prompts[READOUT_PROMPT], readout_plan(engine, prompts))
    outputs["scores"] = await score_cases(engine, prompts)
    return outputs


#: Score cases: a few prompts, each with single- and multi-token candidates (the single-token
#: ones share a row; "Paris" and "Paris is" share their last position's row).
SCORE_PROMPTS = [1, 4, 16]
SCORE_CANDIDATES = ["Paris", " The", "No", "Paris is", "The capital of France is Paris.", " 84"]


def score_requests(engine, prompts) -> dict[str, list[ScoreRequest]]:
    """Case name ("plain" or an operation) -> one ScoreRequest per score prompt."""
    candidates = tuple(answer_token_ids(engine.tokenizer, text) for text in SCORE_CANDIDATES)
    cases = {"plain": [EMPTY_PLAN] * len(SCORE_PROMPTS)}
    for operation, spec in OPERATION_SPECS.items():
        cases[operation] = [compile_for(engine, prompts[p], [spec]) for p in SCORE_PROMPTS]
    return {
        name: [
            ScoreRequest(f"score-{name}-{p}", prompts[p], candidates, plan)
            for p, plan in zip(SCORE_PROMPTS, plans)
        ]
        for name, plans in cases.items()
    }


async def score_cases(engine, prompts) -> dict[str, list[list[float]]]:
    """Each score case's scores, per prompt, per candidate; a case's requests run together."""
    return {
        name: list(await asyncio.gather(*(engine.score(r) for r in requests)))
        for name, requests in score_requests(engine, prompts).items()
    }
