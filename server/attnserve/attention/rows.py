"""The batch layout attention.core works on, and what it returns per row.

Engines hand the core a left-padded batch of the rows that carry a RowPlan: row b's tokens
0..n_b-1 sit at key indices key_start[b]..Lk-1, and the Lq query rows are the last Lq key
positions (query row i is the token at key index Lk - Lq + i). Query rows whose key index is
below key_start are padding and are ignored (their output is left as computed, unspecified).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    """Where one request's tokens sit in the padded batch."""

    #: Key index of the request's token 0 (number of left-padding slots before it).
    key_start: int
    #: Prompt length in tokens; positions >= this are generated tokens.
    num_prompt_tokens: int


@dataclass
class LayerStatistics:
    """Statistics of one row in one attention call: sums over its query rows of head means.

    Divide by query_count for means; sums let an engine add calls (steps) together.
    """

    query_count: int
    entropy: float
    normalized_entropy: float
    sink_mass: float
    sink_mass_first4: float
    #: Keys after token 0 with mean attention > 0.1 over this call's queries, mean over heads,
    #: times query_count (so it averages like the others).
    hidden_sinks: float
    #: Mass on each ReadoutRequest.mass_ranges entry.
    range_mass: list[float]

    def add(self, other: LayerStatistics) -> None:
        self.query_count += other.query_count
        self.entropy += other.entropy
        self.normalized_entropy += other.normalized_entropy
        self.sink_mass += other.sink_mass
        self.sink_mass_first4 += other.sink_mass_first4
        self.hidden_sinks += other.hidden_sinks
        self.range_mass = [a + b for a, b in zip(self.range_mass, other.range_mass)]


@dataclass
class RowReadout:
    """Readouts of one row in one attention call (fields are None when not asked for)."""

    statistics: LayerStatistics | None = None
    #: (len(row_heads), num_visible_keys) probabilities of the row's last query; head order as asked.
    attention_rows: torch.Tensor | None = None
    #: Query heads the attention_rows belong to.
    row_heads: tuple[int, ...] = ()
    #: (num_prompt_tokens,) head-mean probabilities of the last query over the prompt keys.
    prompt_attention: torch.Tensor | None = None
