"""The batch layout attention.core works on.

Engines hand the core a left-padded batch of the rows that carry a RowPlan: row b's tokens
0..n_b-1 sit at key indices key_start[b]..Lk-1, and the Lq query rows are the last Lq key
positions (query row i is the token at key index Lk - Lq + i). Query rows whose key index is
below key_start are padding and are ignored (their output is left as computed, unspecified).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowLayout:
    """Where one request's tokens sit in the padded batch."""

    #: Key index of the request's token 0 (number of left-padding slots before it).
    key_start: int
    #: Prompt length in tokens; positions >= this are generated tokens.
    num_prompt_tokens: int
