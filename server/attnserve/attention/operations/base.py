"""The contract of an attention operation, and what its stage edits on one row.

An operation is one module of this package: a frozen dataclass of its parameters (their
defaults are the API's defaults; their ranges are in spec/ranges.py under "<name>.<parameter>"),
the stage it acts at, and the one method of that stage. attention/interventions.py runs the
stages of a row in order; docs/attention-math.md#order-of-operations-on-a-row derives them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from attnserve.attention import kernels
from attnserve.attention.row_attention import RowAttention
from attnserve.attention.selection import head_selection, key_selection, query_selection

if TYPE_CHECKING:
    from attnserve.attention.plan import KeySet, ScopedOp


class Stage(enum.IntEnum):
    """Where an operation acts on a row; the stages run in this order."""

    #: Multiplies logits: a gain on a query's logits, or factors on some of its keys' logits.
    LOGIT_SCALE = 1
    #: Rewrites each selected logit as a function of itself (its heads' logits materialised).
    LOGIT_REWRITE = 2
    #: Adds to the additive logit bias of the one fused softmax-and-PV call.
    BIAS = 3
    #: Edits the softmax map of its heads (materialised), folded back into the bias.
    PROBABILITIES = 4
    #: Edits the attention output.
    OUTPUT = 5


@dataclass(frozen=True)
class Scope:
    """Where one operation acts on a row. heads has one entry (every head) or num_heads; keys is
    (n,) for one request's row, or (num_heads, n) for the folded rows of several requests
    (attention/folded_rows.py), each head's keys those of its request."""

    heads: torch.Tensor
    queries: torch.Tensor
    keys: torch.Tensor
    #: The operation's keys as the plan names them (for decisions made without a device sync);
    #: None for folded rows, whose requests each have their own.
    key_set: KeySet | None

    @classmethod
    def of(cls, scoped: ScopedOp, row: RowAttention) -> Scope:
        heads = (
            torch.ones(1, dtype=torch.bool, device=row.device)
            if scoped.heads is None
            else head_selection(scoped.heads, row.num_heads, row.device)
        )
        return cls(
            heads=heads,
            queries=query_selection(scoped.query_rows, scoped.last_query_only, row.num_queries, row.device),
            keys=key_selection(scoped.keys, row.num_keys, row.num_prompt_tokens, row.device),
            key_set=scoped.keys,
        )

    @property
    def head_query(self) -> torch.Tensor:
        """(1 or H, L) bool."""
        return self.heads[:, None] & self.queries[None, :]

    @property
    def logits(self) -> torch.Tensor:
        """(1 or H, L, n) bool."""
        return self.head_query[:, :, None] & self.keys_of_heads()[:, None, :]

    def keys_of_heads(self, heads: torch.Tensor | None = None) -> torch.Tensor:
        """(1 or h, n) bool: the keys of every head, or of the given head indices."""
        if self.keys.dim() == 1:
            return self.keys[None]
        every_head = heads is None or len(heads) == self.keys.shape[0]  # sorted, unique indices
        return self.keys if every_head else self.keys[heads]

    def selects_every_key(self, row: RowAttention) -> bool:
        """Whether the scope holds every key of the row, decided on a CPU copy (no device sync);
        False for folded rows."""
        if self.key_set is None:
            return False
        cpu = torch.device("cpu")
        return bool(key_selection(self.key_set, row.num_keys, row.num_prompt_tokens, cpu).all())

    def head_indices(self, num_heads: int) -> torch.Tensor:
        return self.heads.expand(num_heads).nonzero().squeeze(1)


@dataclass
class LogitScales:
    """What the LOGIT_SCALE stage builds: logits = (q * query_gain) . k * key_factor."""

    #: (H, L) factors on every logit of a query.
    query_gain: torch.Tensor
    #: (H, L, n) factors that differ between a query's keys, or None while there are none.
    key_factor: torch.Tensor | None = None


@dataclass(frozen=True)
class EmphasisTerm:
    """One KeyEmphasis in the bias: log_alpha added where head_query and keys hold."""

    head_query: torch.Tensor
    keys: torch.Tensor
    log_alpha: float


@dataclass
class KeyBias:
    """What the BIAS stage builds, from the row's geometry alone: the additive logit bias (1 or H,
    L, n), -inf where a key is not seen, and the KeyEmphasis terms in it."""

    bias: torch.Tensor
    #: The KeyEmphasis terms of the bias (the statistics correct the entropy for them).
    emphasis: list[EmphasisTerm]


@dataclass
class EditedLogits:
    """The row's pre-softmax edits in fused form: logits = scale * q . k + bias.

    q carries the temperatures that hold for all of a query's keys (folded into the query);
    bias (1 or H, L, n) carries the rest, -inf where a key is not seen.
    """

    q: torch.Tensor
    bias: torch.Tensor
    #: (H,) heads whose bias was computed from their own logits (key-dependent temperature,
    #: LogitRescale): the entropy identity does not apply to them.
    logit_heads: torch.Tensor
    #: The KeyEmphasis terms of the bias (the statistics correct the entropy for them).
    emphasis: list[EmphasisTerm]

    def logits(self, row: RowAttention, heads: torch.Tensor) -> torch.Tensor:
        """Materialised (len(heads), L, n) logits of the given query heads."""
        if len(heads) == row.num_heads:
            return kernels.logits(self.q, row.k, self.bias, row.scale)
        bias = self.bias if self.bias.shape[0] == 1 else self.bias[heads]
        return kernels.logits(self.q[heads], row.keys_of(heads), bias, row.scale)


class Operation:
    """Base of the operation dataclasses. A subclass sets name and stage and implements the
    method of its stage; the others are never called for it."""

    #: The operation's name in the API (the Intervention oneof field, OperationKind lower case).
    name: ClassVar[str]
    stage: ClassVar[Stage]
    #: Needs each query's own key (self-attention): refused on cross-attention rows.
    needs_own_key: ClassVar[bool] = False
    #: Removes keys from attention: on a row without own keys, a query must keep some key.
    removes_keys: ClassVar[bool] = False

    @property
    def is_identity(self) -> bool:
        """Whether the operation leaves attention exactly as it is (then it is dropped)."""
        raise NotImplementedError

    def scale_logits(self, scales: LogitScales, scope: Scope, row: RowAttention) -> None:
        """LOGIT_SCALE: multiply the scope's logits into scales, in place."""
        raise NotImplementedError

    def rewrite_logits(self, logits: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """LOGIT_REWRITE: logits (h, L, n) with the selected (h, L, n) ones rewritten."""
        raise NotImplementedError

    def edit_bias(self, key_bias: KeyBias, scope: Scope, row: RowAttention) -> None:
        """BIAS: add to key_bias.bias (and record what the statistics need), in place."""
        raise NotImplementedError

    def prepare_probabilities(self, scope: Scope, slot: torch.Tensor, row: RowAttention) -> object:
        """PROBABILITIES: what edit_probabilities needs of the scope and the row's geometry alone
        (no probabilities), built once per geometry (core.prepare); slot[head] is a head's index
        in the materialised probabilities."""
        raise NotImplementedError

    def edit_probabilities(self, probs: torch.Tensor, prepared: object, row: RowAttention) -> None:
        """PROBABILITIES: edit probs (h, L, n) of the materialised heads in place, with what
        prepare_probabilities gave; those heads' output is then probs @ V."""
        raise NotImplementedError

    def edit_output(
        self, out: torch.Tensor, kept: torch.Tensor, scope: Scope, row: RowAttention
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """OUTPUT: the new output (H, L, D) and kept (H, L), the share of the softmax map left
        (the final map of query i is kept * P_i + (1 - kept) * onehot(own key))."""
        raise NotImplementedError
