"""Teacher-forced answer scoring: log-probabilities of candidate answers after a prompt, with each
row's attention plan applied, many rows per forward.

A row is prompt + answer[:-1] in one forward (step 0); the last len(answer) positions predict the
answer's tokens. Answer positions count as generated tokens (RowLayout.num_prompt_tokens is the
prompt length), as they would in generation. Rows are left-padded like the engine's prefill.
Candidates whose inputs coincide (single-token answers to one prompt) share a row, so a
yes/no question costs one row. Serving (the Score RPC) and calibration both score through here,
so a preset's measured effect is what the API returns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ...attention.layout import RowLayout
from ...attention.plan import RequestPlan
from . import attention
from .vision import VisionTower, encode_batch


@dataclass(frozen=True)
class AnswerQuery:
    """One candidate answer to score after one prompt, under one plan."""

    prompt_ids: tuple[int, ...]
    #: At least one token.
    answer_ids: tuple[int, ...]
    plan: RequestPlan
    #: The prompt's images (PIL, in order) and their tokens' positions (vision-language models).
    images: tuple = ()
    image_spans: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class _Row:
    input_ids: tuple[int, ...]
    num_prompt_tokens: int
    plan: RequestPlan
    images: tuple = ()
    image_spans: tuple[tuple[int, int], ...] = ()


def _ignore_readouts(layer, rows, readouts) -> None:
    pass


@torch.inference_mode()
def score_answers(
    model,
    queries: Sequence[AnswerQuery],
    *,
    pad_id: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
    vision_tower: VisionTower | None = None,
) -> list[float]:
    """The summed log-probability of each query's answer tokens (float64 sums of float32
    log-softmax values). on_batch(n) is called after each forward with the number of queries it
    scored."""
    rows: dict[tuple[int, int, tuple[int, ...]], int] = {}  # (id(plan), id(images), input ids) -> row
    row_list: list[_Row] = []
    query_rows: list[int] = []
    for query in queries:
        if not query.answer_ids:
            raise ValueError("an answer needs at least one token")
        input_ids = query.prompt_ids + query.answer_ids[:-1]
        key = (id(query.plan), id(query.images), input_ids)
        if key not in rows:
            rows[key] = len(row_list)
            row_list.append(
                _Row(input_ids, len(query.prompt_ids), query.plan, query.images, query.image_spans)
            )
        query_rows.append(rows[key])

    # Each row's log-probabilities of the answers scored from it, by answer.
    answers_of_row: list[list[int]] = [[] for _ in row_list]
    for q, row in enumerate(query_rows):
        answers_of_row[row].append(q)
    scores = [0.0] * len(queries)
    # Similar lengths together: less padding.
    order = sorted(range(len(row_list)), key=lambda r: len(row_list[r].input_ids))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        longest_answer = max(len(queries[q].answer_ids) for r in chunk for q in answers_of_row[r])
        logprobs = _forward(model, [row_list[r] for r in chunk], pad_id, longest_answer, vision_tower)
        for i, r in enumerate(chunk):
            for q in answers_of_row[r]:
                answer = queries[q].answer_ids
                # The last len(answer) positions of the row predict the answer's tokens.
                predicted = logprobs[i, longest_answer - len(answer) :]
                token_logprobs = predicted.gather(-1, torch.tensor(answer, device=predicted.device)[:, None])
                scores[q] = float(token_logprobs.double().sum())
        if on_batch is not None:
            on_batch(sum(len(answers_of_row[r]) for r in chunk))
    return scores


def _forward(
    model, rows: Sequence[_Row], pad_id: int, positions_kept: int, vision_tower: VisionTower | None
) -> torch.Tensor:
    """(rows, positions_kept, vocab) log-probabilities at each row's last positions_kept positions."""
    device = model.device
    images, plans = encode_batch(vision_tower, [(r.images, r.image_spans, r.plan) for r in rows])
    rows = [dataclasses.replace(r, plan=plan) for r, plan in zip(rows, plans)]
    # A text-only model's forward takes no mm_encoder_outputs (its kwargs reach attention).
    extra = {} if images is None else {"mm_encoder_outputs": images}
    lengths = [len(r.input_ids) for r in rows]
    width = max(lengths)
    input_ids = torch.tensor([[pad_id] * (width - n) + list(r.input_ids) for r, n in zip(rows, lengths)])
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    layouts = [
        RowLayout(key_start=width - n, num_prompt_tokens=r.num_prompt_tokens) for r, n in zip(rows, lengths)
    ]
    batch = None
    if any(r.plan.touches_attention for r in rows):
        batch = attention.BatchAttention(
            layouts, lambda row, layer: rows[row].plan.for_call(layer, 0), _ignore_readouts
        )
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=False,
        logits_to_keep=positions_kept,
        attnserve_batch=batch,
        **extra,
    )
    return torch.log_softmax(out.logits.float(), dim=-1)
