"""summary: a faithful, templated description of which prompt spans the generated tokens attended to.

Stage: the last query rows attention.core computes on the final map, in every call of every
decode step (the prefill's last query is the prompt's own). State: the sum over calls of the
head-mean attention of the last query on each prompt token, and the number of calls; finished
into their mean and written as text with the spans it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import intervention_pb2, readout_pb2

from ..attention.plan import NO_NEEDS, ReadoutNeeds
from ..attention.readout import RowReadout
from .base import CallSite, Readout, ResponseContext

ROWS = ReadoutNeeds(last_query_rows=True)


@dataclass(frozen=True)
class SummarySettings:
    name: ClassVar[str] = "summary"

    def needs(self, layer: int, step: int) -> ReadoutNeeds:
        return ROWS if step > 0 else NO_NEEDS


@dataclass
class PromptAttention:
    #: (num_prompt_tokens,) sum over calls of the last query's head-mean attention.
    total: torch.Tensor | None = None
    calls: int = 0

    def add(self, attention: torch.Tensor, calls: int) -> None:
        self.total = attention if self.total is None else self.total + attention
        self.calls += calls


class Summary(Readout):
    name = SummarySettings.name

    def asked(self, spec: readout_pb2.ReadoutSpec) -> bool:
        return spec.summary

    def compile(self, spec, ctx, violations) -> SummarySettings:
        return SummarySettings()

    def new_state(self) -> PromptAttention:
        return PromptAttention()

    def record(self, state: PromptAttention, settings, call: CallSite, readout: RowReadout) -> None:
        rows = readout.last_query_rows
        if rows is None or call.step == 0:
            return
        # Prompt positions the row has not reached yet (a chunked prefill) read 0.
        prompt = torch.zeros(readout.num_prompt_tokens, device=rows.device)
        shown = min(readout.num_prompt_tokens, rows.shape[1])
        prompt[:shown] = rows[:, :shown].mean(dim=0)
        state.add(prompt, 1)

    def merge(self, state: PromptAttention, other: PromptAttention) -> None:
        if other.total is not None:
            state.add(other.total, other.calls)

    def finish(self, state: PromptAttention) -> torch.Tensor | None:
        """(num_prompt_tokens,) mean attention of the generated tokens' queries on the prompt."""
        return None if state.total is None else state.total / state.calls

    def write_complete(
        self, complete: pb.GenerateComplete, settings, result: torch.Tensor | None, response: ResponseContext
    ) -> None:
        if result is None:
            complete.summary.text = (
                "No token was generated after the prompt, so there is no attention to summarise."
            )
        else:
            complete.summary.CopyFrom(
                attention_summary(result, response.prompt_token_ids, response.tokenizer)
            )


MAX_SPANS = 5


def attention_summary(
    prompt_attention: torch.Tensor, prompt_token_ids, tokenizer
) -> readout_pb2.AttentionSummary:
    """prompt_attention: (num_prompt_tokens,) mean attention share of the generated tokens'
    queries on each prompt token (over layers, heads and decode steps)."""
    shares = prompt_attention.float()
    if shares.numel() < 2:
        return readout_pb2.AttentionSummary(text="The prompt is too short to summarise attention.")
    # Token 0 is the attention sink: reported apart, never as a "most attended" span.
    ranked = torch.argsort(shares[1:], descending=True) + 1
    chosen: set[int] = set()
    spans: list[tuple[int, int]] = []
    for position in ranked.tolist():
        chosen.add(position)
        spans = _merge_adjacent(sorted(chosen))
        if len(spans) >= MAX_SPANS:
            break
    spans.sort(key=lambda s: -float(shares[s[0] : s[1]].sum()))
    out = readout_pb2.AttentionSummary()
    parts = []
    for start, end in spans[:MAX_SPANS]:
        text = tokenizer.decode(list(prompt_token_ids[start:end]))
        mass = float(shares[start:end].sum())
        out.spans.append(
            readout_pb2.AttendedSpan(
                range=intervention_pb2.TokenRange(start=start, end=end), text=text, mass=mass
            )
        )
        parts.append(f"{text!r} ({mass:.1%})")
    out.text = (
        f"The generated tokens attended most to {', '.join(parts)} of the prompt; the first token "
        f"(an attention sink) took {float(shares[0]):.1%}. Shares are means over layers, heads and "
        "generation steps."
    )
    return out


def _merge_adjacent(positions: list[int]) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for p in positions:
        if spans and spans[-1][1] == p:
            spans[-1] = (spans[-1][0], p + 1)
        else:
            spans.append((p, p + 1))
    return spans
