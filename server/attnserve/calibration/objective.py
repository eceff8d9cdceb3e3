"""The objectives: how well a plan ranks the correct answer first.

Per example, the margin is the correct answer's summed token log-probability minus the best wrong
answer's; an example is right when its margin is positive. A split's objective (OBJECTIVES) is the
mean margin (default), the accuracy or the mean log-likelihood of the correct answer, with the
accuracy or margin breaking ties. Every plan x example x candidate is one query (the Score RPC's
computation, engines/hf/scoring.py), and all of a search round's queries are scored together, so
its candidate plans share forwards: with a loaded transformers model (TransformersScorer) or on
the vLLM engine (calibration/vllm_scorer.py).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..attention.plan import RequestPlan
from ..engines.hf.scoring import AnswerQuery, score_answers
from ..engines.prompts import answer_token_ids, chat_token_ids, prompt_token_ids
from .data import DataError, LabelledExample


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: tuple[int, ...]
    candidate_ids: tuple[tuple[int, ...], ...]
    #: Index of the correct candidate.
    answer: int
    #: The example's task (data/LabelledExample.task).
    task: str = ""


def tokenize(examples: Sequence[LabelledExample], tokenizer) -> list[TokenizedExample]:
    """Token ids exactly as the Score RPC makes them (engines/prompts.py)."""
    out = []
    for example in examples:
        if example.prompt is not None:
            prompt = prompt_token_ids(tokenizer, example.prompt)
        else:
            if tokenizer.chat_template is None:
                raise DataError(f"line {example.line}: messages: the model has no chat template; use prompt")
            prompt = chat_token_ids(tokenizer, example.messages)
        candidates = []
        for i, text in enumerate(example.candidates):
            ids = answer_token_ids(tokenizer, text)
            if not ids:
                raise DataError(f"line {example.line}: candidates[{i}]: tokenizes to no tokens")
            candidates.append(ids)
        out.append(TokenizedExample(tuple(prompt), tuple(candidates), example.answer, example.task))
    return out


def margin(logprobs: Sequence[float], answer: int) -> float:
    """Correct answer's log-probability minus the best wrong answer's."""
    return logprobs[answer] - max(lp for i, lp in enumerate(logprobs) if i != answer)


#: Objective name -> what it says it maximises.
OBJECTIVES = {
    "margin": "mean margin of the correct answer's summed log-probability over the best wrong one",
    "accuracy": "accuracy (the mean margin breaking ties)",
    "log-likelihood": "mean summed log-probability of the correct answer",
}


@dataclass(frozen=True)
class SplitMetrics:
    """A plan's result on one split."""

    #: Per example, in split order.
    margins: tuple[float, ...]
    #: Per example, the correct answer's summed log-probability (empty when not recorded).
    correct_logprobs: tuple[float, ...] = ()
    #: What `objective` maximises: a key of OBJECTIVES.
    objective_name: str = "margin"
    #: False when the plan breaks the search's constraint: it is then never chosen.
    admissible: bool = True

    @property
    def mean_margin(self) -> float:
        return sum(self.margins) / len(self.margins)

    @property
    def accuracy(self) -> float:
        return sum(m > 0 for m in self.margins) / len(self.margins)

    @property
    def mean_log_likelihood(self) -> float:
        return sum(self.correct_logprobs) / len(self.correct_logprobs)

    @property
    def objective(self) -> tuple[float, float]:
        """What the search maximises (objective_name), then its tie-breaker; -inf when not
        admissible."""
        if not self.admissible:
            return (float("-inf"), float("-inf"))
        if self.objective_name == "accuracy":
            return (self.accuracy, self.mean_margin)
        if self.objective_name == "log-likelihood":
            return (self.mean_log_likelihood, self.accuracy)
        return (self.mean_margin, self.accuracy)

    def subset(self, rows: Sequence[int]) -> SplitMetrics:
        """These metrics on the given examples only (by position in the split)."""
        return dataclasses.replace(
            self,
            margins=tuple(self.margins[i] for i in rows),
            correct_logprobs=tuple(self.correct_logprobs[i] for i in rows) if self.correct_logprobs else (),
        )

    def turned_wrong(self, baseline: SplitMetrics) -> int:
        """Examples right under baseline and wrong here."""
        return sum(before > 0 >= after for after, before in zip(self.margins, baseline.margins, strict=True))


class Scorer(abc.ABC):
    """Scores plans on examples."""

    #: Rows per forward.
    batch_size: int

    @abc.abstractmethod
    def score(self, queries: Sequence[AnswerQuery], on_scored: Callable[[int], None]) -> list[float]:
        """Each query's summed answer log-probability; on_scored(n) as n more are scored."""

    def evaluate(
        self,
        plans: Sequence[RequestPlan],
        examples: Sequence[TokenizedExample],
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[SplitMetrics]:
        """Each plan's metrics on the examples. on_progress(done, total) counts answers scored."""
        queries = [
            AnswerQuery(example.prompt_ids, candidate, plan)
            for plan in plans
            for example in examples
            for candidate in example.candidate_ids
        ]
        done = 0

        def on_scored(scored: int) -> None:
            nonlocal done
            done += scored
            if on_progress is not None:
                on_progress(done, len(queries))

        logprobs = iter(self.score(queries, on_scored))
        results = []
        for _ in plans:
            margins, correct = [], []
            for example in examples:
                scores = [next(logprobs) for _ in example.candidate_ids]
                margins.append(margin(scores, example.answer))
                correct.append(scores[example.answer])
            results.append(SplitMetrics(tuple(margins), tuple(correct)))
        return results


class TransformersScorer(Scorer):
    """Scores with a loaded transformers model, batch_size rows per forward."""

    def __init__(self, model, *, pad_id: int, batch_size: int):
        self._model = model
        self._pad_id = pad_id
        self.batch_size = batch_size

    def score(self, queries: Sequence[AnswerQuery], on_scored: Callable[[int], None]) -> list[float]:
        return score_answers(
            self._model, queries, pad_id=self._pad_id, batch_size=self.batch_size, on_batch=on_scored
        )
