"""score_answers against plain unpadded forwards, and per-row plans against rows scored alone."""

from __future__ import annotations

import pytest
import torch
from attnserve.attention.plan import EMPTY_PLAN
from attnserve.calibration.method import Method, PlanCompiler
from attnserve.engines.hf.scoring import AnswerQuery, score_answers

ACT = Method("sink_calibration", {"tau": 0.1, "beta": 0.4})


@torch.inference_mode()
def reference_logprob(model, prompt, answer) -> float:
    """The answer's summed log-probability from one unpadded forward of prompt + answer."""
    ids = torch.tensor([list(prompt) + list(answer)])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(prompt) - 1 + i, token]) for i, token in enumerate(answer))


def queries(examples, plan):
    return [AnswerQuery(e.prompt_ids, c, plan) for e in examples for c in e.candidate_ids]


def test_unmodified_scores_match_unpadded_forwards(tiny_model, tiny_examples):
    scored = score_answers(tiny_model, queries(tiny_examples, EMPTY_PLAN), pad_id=0, batch_size=7)
    expected = [
        reference_logprob(tiny_model, q.prompt_ids, q.answer_ids) for q in queries(tiny_examples, EMPTY_PLAN)
    ]
    assert scored == pytest.approx(expected, abs=1e-5)
    assert all(s < 0 for s in scored)


def test_single_token_answers_share_a_row(tiny_model, tiny_examples):
    example = tiny_examples[0]
    answers = [(11,), (12,), (13,)]
    forwards = []
    scores = score_answers(
        tiny_model,
        [AnswerQuery(example.prompt_ids, a, EMPTY_PLAN) for a in answers],
        pad_id=0,
        batch_size=8,
        on_batch=forwards.append,
    )
    assert forwards == [3]  # one forward scored all three
    with torch.inference_mode():
        logits = tiny_model(input_ids=torch.tensor([list(example.prompt_ids)])).logits[0, -1]
    expected = torch.log_softmax(logits, dim=-1)[[11, 12, 13]].tolist()
    assert scores == pytest.approx(expected, abs=1e-5)


def test_per_row_plans_in_one_batch_equal_rows_alone(tiny_model, tiny_geometry, tiny_examples):
    compiler = PlanCompiler(ACT, tiny_geometry, shortest_prompt=6)
    plans = compiler.plans([frozenset({(1, None)}), frozenset({(0, 2), (3, 1)}), frozenset()])
    mixed = [q for plan in plans for q in queries(tiny_examples, plan)]
    together = score_answers(tiny_model, mixed, pad_id=0, batch_size=64)
    alone = [score_answers(tiny_model, [q], pad_id=0, batch_size=1)[0] for q in mixed]
    assert together == pytest.approx(alone, abs=1e-5)
    # The intervention changes the scores of its rows (and the empty plan's rows are unmodified).
    n = len(mixed) // 3
    assert max(abs(a - b) for a, b in zip(together[:n], together[2 * n :])) > 1e-3
    assert together[2 * n :] == pytest.approx(
        [reference_logprob(tiny_model, q.prompt_ids, q.answer_ids) for q in mixed[2 * n :]], abs=1e-5
    )


def test_empty_answer_is_refused(tiny_model):
    with pytest.raises(ValueError, match="at least one token"):
        score_answers(tiny_model, [AnswerQuery((1, 2), (), EMPTY_PLAN)], pad_id=0, batch_size=1)
