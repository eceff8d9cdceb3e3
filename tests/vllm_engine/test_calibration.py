"""Calibration scored on the vLLM engine against the transformers engine, on the real SmolLM2 and
the labelled sentiment set: the same head set, and every head set's metrics equal to 1e-4."""

from __future__ import annotations

import asyncio
import pathlib

import pytest
from attnserve.calibration.calibrate import SearchSettings, calibrate
from attnserve.calibration.data import load_examples, split_examples
from attnserve.calibration.method import Method
from attnserve.calibration.objective import TransformersScorer, tokenize
from attnserve.calibration.vllm_scorer import VllmScorer
from attnserve.engines.hf.engine import load_causal_lm, model_geometry
from attnserve.engines.prompts import pad_token_id

pytestmark = pytest.mark.asyncio(loop_scope="session")

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "sentiment.jsonl"
METHODS = [Method("sink_calibration", {"tau": 0.1, "beta": 0.4, "min_queries": 0})]
#: Layers around those the full sweep chooses on this data (tests/e2e/test_calibration.py).
SETTINGS = SearchSettings(strategy="layer-sweep", layers=(12, 13, 14, 15, 16), budget=2)


def run_calibration(scorer, geometry, tokenizer):
    split = split_examples(load_examples(DATA), 0.5, 0)
    return calibrate(
        scorer,
        geometry,
        METHODS,
        tokenize(split.calibration, tokenizer),
        tokenize(split.validation, tokenizer),
        SETTINGS,
        bootstrap_resamples=500,
        seed=0,
    )


@pytest.fixture(scope="module")
def transformers_calibration(smollm2_path):
    tokenizer, model = load_causal_lm(smollm2_path)
    scorer = TransformersScorer(model, pad_id=pad_token_id(tokenizer), batch_size=16)
    return run_calibration(scorer, model_geometry(model), tokenizer)


def assert_metrics_equal(ours, theirs) -> None:
    assert ours.margins == pytest.approx(theirs.margins, abs=1e-4)
    assert ours.correct_logprobs == pytest.approx(theirs.correct_logprobs, abs=1e-4)


async def test_vllm_calibration_equals_transformers(vllm_engine, transformers_calibration):
    scorer = VllmScorer(vllm_engine, asyncio.get_running_loop(), batch_size=16)
    ours = await asyncio.to_thread(run_calibration, scorer, vllm_engine.info.geometry, vllm_engine.tokenizer)
    theirs = transformers_calibration
    assert theirs.found and ours.head_set == theirs.head_set
    (our_search,), (their_search,) = [v.search for v in ours.variants], [v.search for v in theirs.variants]
    assert [c.head_set for c in our_search.trace] == [c.head_set for c in their_search.trace]
    assert len(our_search.trace) > 5
    for our_candidate, their_candidate in zip(our_search.trace, their_search.trace):
        assert_metrics_equal(our_candidate.metrics, their_candidate.metrics)
    assert_metrics_equal(ours.validation_before, theirs.validation_before)
    assert_metrics_equal(ours.validation_after, theirs.validation_after)
    assert (ours.change.low, ours.change.high) == pytest.approx(
        (theirs.change.low, theirs.change.high), abs=1e-4
    )
