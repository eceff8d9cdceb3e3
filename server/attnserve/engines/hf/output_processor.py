"""Turn a step's logits into each row's next TokenOutput, and emit it."""

from __future__ import annotations

import logging

import torch

from ..base import EngineError, NonFiniteOutput, TokenOutput
from ..readouts import StepReadouts
from .requests import RequestRow
from .sampling import choose_token

log = logging.getLogger("attnserve.engines.hf")


def eos_token_ids(tokenizer, model) -> frozenset[int]:
    """The tokens that end a generation: the tokenizer's EOS and the model's configured ones."""
    ids = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    return frozenset(i for i in ids if i is not None)


class OutputProcessor:
    """Sample each row's next token, finish rows on EOS, stop string or length, and emit."""

    def __init__(self, eos_ids: frozenset[int]):
        self._eos_ids = eos_ids

    def process_step(self, rows: list[RequestRow], logits: torch.Tensor) -> list[RequestRow]:
        """Emit one output (or the row's own failure) to every row not cancelled, from its row of
        the (rows, vocab) logits: the rows that finished or failed, to leave the batch.

        A row whose logits are not finite, or whose sampling raises, fails alone with
        NonFiniteOutput or EngineError; the batch goes on.
        """
        logprobs = torch.log_softmax(logits, dim=-1)
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        finished = []
        for i, row in enumerate(rows):
            if row.cancelled:
                continue
            try:
                if not finite[i]:
                    raise NonFiniteOutput(f"the logits of step {row.step}")
                out = self._next_token(row, logits[i], logprobs[i])
            except Exception as exc:  # this row's failure is its own: the batch goes on
                if not isinstance(exc, NonFiniteOutput):
                    log.exception("choosing a token failed request_id=%s", row.request.request_id)
                row.emit(exc if isinstance(exc, EngineError) else EngineError(f"sampling failed: {exc}"))
                finished.append(row)
                continue
            if out.finish_reason is not None:
                finished.append(row)
            row.emit(out)
        return finished

    def _next_token(self, row: RequestRow, logits: torch.Tensor, logprobs: torch.Tensor) -> TokenOutput:
        """Choose the row's next token from its (V,) logits and advance the row."""
        sampling = row.request.sampling
        token = choose_token(logits, sampling, row.generator)
        top = []
        if sampling.top_logprobs:
            values, ids = torch.topk(logprobs, sampling.top_logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        row.num_generated += 1
        row.last_token = token
        reason = None
        if token in self._eos_ids and not sampling.ignore_eos:
            reason = "eos"
        text = row.detokenizer.push(token)
        if row.detokenizer.stopped:
            reason = "stop_string"
        elif reason is None and row.num_generated >= sampling.max_tokens:
            reason = "length"
        out = TokenOutput(
            index=row.num_generated - 1,
            token_id=token,
            logprob=float(logprobs[token]),
            top_logprobs=top,
            text=text,
            step_readouts=row.readout_totals.add_step(row.step_readouts),
            queue_seconds=row.queue_seconds if row.num_generated == 1 else None,
        )
        row.step_readouts = StepReadouts()
        if reason is not None:
            out.text += row.detokenizer.flush()
            out.finish_reason = reason
            out.readouts = row.readout_totals.finish()
        return out
