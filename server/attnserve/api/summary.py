"""A faithful, templated description of which prompt spans the generated tokens attended to."""

from __future__ import annotations

import torch
from attnserve_client.v1 import intervention_pb2, readout_pb2

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
