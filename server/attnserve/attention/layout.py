"""The batch layout attention.core works on: where each row's queries and keys sit, and which
keys each query sees.

Engines hand the core a left-padded batch of the rows that carry a RowPlan: q (B, H, Lq, D),
k and v (B, Hkv, Lk, D). Row b's keys are the tokens 0..n_b-1 of its key sequence, at key
indices key_start..Lk-1 (n_b = Lk - key_start). Its queries are either
- self-attention (the default): tokens of that same sequence, the last Lq of it: query row i is
  the token at position n_b - Lq + i; query rows at negative positions are padding; or
- cross-attention: a sequence of their own (image tokens over text keys): query rows
  query_start..Lq-1 are the row's, and no query has a position among the keys (no own key).
Padded query rows are ignored (their output is left as computed, unspecified).

Which keys a query sees is the layout's MaskKind; docs/attention-math.md#layouts. For example:
- a decoder's prefill or decode step: RowLayout(key_start=pad, num_prompt_tokens=prompt_length);
- a vision encoder's or DiT's self-attention over n tokens (joint attention: text and image
  tokens concatenated): RowLayout(key_start=pad, num_prompt_tokens=n, mask=MaskKind.FULL);
- a UNet's cross-attention of image tokens over t text tokens: RowLayout(key_start=text_pad,
  num_prompt_tokens=t, mask=MaskKind.FULL, cross_attention=True, query_start=image_pad);
- image tokens bidirectional among themselves inside causal text: mask=MaskKind.BLOCK with
  block_ids giving each text token a block of its own and each image one block.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class MaskKind(enum.Enum):
    """Which of the row's keys a query sees."""

    #: Query at position t sees keys 0..t (decoder self-attention).
    CAUSAL = "causal"
    #: Every query sees every key: bidirectional self-attention (vision encoders, DiT, joint
    #: attention over concatenated text and image tokens) and cross-attention.
    FULL = "full"
    #: Block-causal self-attention: each token has a block id (RowLayout.block_ids,
    #: non-decreasing along the sequence); the query at position t sees key j when
    #: block_ids[j] <= block_ids[t]: every earlier block and all of its own block.
    BLOCK = "block"


@dataclass(frozen=True)
class RowLayout:
    """Where one request's queries and keys sit in the padded batch, and its mask."""

    #: Key index of the request's token 0 (number of left-padding slots before it).
    key_start: int
    #: Prompt length in tokens; positions >= this are generated tokens.
    num_prompt_tokens: int
    mask: MaskKind = MaskKind.CAUSAL
    #: The queries are a sequence of their own, not tokens of the key sequence (needs FULL).
    cross_attention: bool = False
    #: Cross-attention only: query index of the row's first query (left padding of the
    #: queries). Self-attention's query padding follows from key_start.
    query_start: int = 0
    #: BLOCK only: the block id of each of the row's n tokens, non-decreasing.
    block_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.cross_attention and self.mask is not MaskKind.FULL:
            raise ValueError(f"cross-attention has no positions among the keys; {self.mask} needs them")
        if self.query_start and not self.cross_attention:
            raise ValueError("query_start is for cross-attention; self-attention queries follow key_start")
        if (self.mask is MaskKind.BLOCK) != bool(self.block_ids):
            raise ValueError("block_ids are given exactly when the mask is BLOCK")
        if any(a > b for a, b in zip(self.block_ids, self.block_ids[1:])):
            raise ValueError("block_ids must be non-decreasing along the sequence")

    @property
    def has_own_key(self) -> bool:
        """Whether each query is one of the keys (self-attention): IdentityBlend and KeyMask's
        own-key rule need it."""
        return not self.cross_attention

    @property
    def has_sink_statistics(self) -> bool:
        """Whether the sink statistics (mass on token 0 and tokens 0..3, hidden sinks after
        token 0) apply: causal and block-causal sequences, which start with a token (BOS) that
        every query sees. Full-mask rows (bidirectional, cross-attention) report None."""
        return self.mask is not MaskKind.FULL

    def num_queries(self, num_batch_queries: int, num_batch_keys: int) -> int:
        """Number of the row's valid query rows (the last ones of the batch's Lq)."""
        if self.cross_attention:
            return num_batch_queries - self.query_start
        return min(num_batch_queries, num_batch_keys - self.key_start)

    def visibility(self, num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
        """(num_queries, num_keys) bool over the row's valid queries and its keys, padding cut
        off: whether query i sees key j."""
        if self.mask is MaskKind.FULL:
            return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device)
        if self.mask is MaskKind.BLOCK:
            if len(self.block_ids) != num_keys:
                raise ValueError(f"{len(self.block_ids)} block_ids for a row of {num_keys} tokens")
            blocks = torch.tensor(self.block_ids, device=device)
            return blocks[None, :] <= blocks[num_keys - num_queries :, None]
        key_positions = torch.arange(num_keys, device=device)
        query_positions = torch.arange(num_keys - num_queries, num_keys, device=device)
        return key_positions[None, :] <= query_positions[:, None]
