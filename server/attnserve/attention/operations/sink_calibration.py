"""SinkCalibration (ACT): hidden attention sinks keep a share of their probability."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnserve.attention.operations.base import Operation, Scope, Stage
from attnserve.attention.row_attention import RowAttention


@dataclass(frozen=True)
class SinkCalibration(Operation):
    """ACT: hidden sinks (token 0 excluded, on every layout) keep beta of their probability; the
    removed mass goes back to the other keys in proportion. A key is a sink when its mean
    probability over the queries that see it exceeds tau; keys seen by fewer than min_queries
    queries are never sinks (0 keeps the authors' rule)."""

    name = "sink_calibration"
    stage = Stage.PROBABILITIES

    tau: float = 0.1
    beta: float = 0.4
    min_queries: int = 0

    @property
    def is_identity(self) -> bool:
        return self.beta == 1.0

    def prepare_probabilities(self, scope: Scope, slot: torch.Tensor, row: RowAttention) -> SinkCandidates:
        """Sink candidates: keys of the scope at positions >= 1, seen by at least one (and at
        least min_queries) of the call's query rows."""
        heads = scope.head_indices(row.num_heads)
        seen_by = row.queries_per_key_of(heads)  # (1 or h, n)
        eligible = scope.keys_of_heads(heads) & (row.key_positions_of(heads) >= 1) & (seen_by > 0)
        if self.min_queries > 0:
            eligible &= seen_by >= self.min_queries
        every_materialised_head = len(heads) == int((slot >= 0).sum())
        return SinkCandidates(
            slots=None if every_materialised_head else slot[heads],
            # One query row: an eligible key's mean probability is its probability.
            seen_by=None if row.num_queries == 1 else seen_by.clamp(min=1),
            eligible=eligible,
            queries=None if bool(scope.queries.all()) else scope.queries,
        )

    def edit_probabilities(self, probs: torch.Tensor, prepared: SinkCandidates, row: RowAttention) -> None:
        """Sinks are the candidates whose mean probability over the query rows that see them
        exceeds tau. A row with sink mass m keeps beta * p on sinks and scales the other keys by
        (1 - beta m) / (1 - m), with 1 - m summed over the other keys directly: as m -> 1 the
        difference would lose all precision. The heads' output is these probabilities times V
        (core.attend), never o - o_S, whose subtraction loses float32 precision by a factor
        1 / (1 - m) when the sinks hold almost all the mass."""
        p = probs if prepared.slots is None else probs[prepared.slots]
        means = p.sum(dim=1) if prepared.seen_by is None else p.sum(dim=1) / prepared.seen_by
        sinks = (means > self.tau) & prepared.eligible  # (h, n)
        # Without sinks the factor below is 1 everywhere. Skipping that work is worth the check on
        # the CPU; on a GPU the check would wait for every queued kernel.
        if probs.device.type == "cpu" and not bool(sinks.any()):
            return
        on_sinks = p * sinks[:, None, :]
        mass = on_sinks.sum(dim=-1)  # (h, L)
        rest = (p - on_sinks).sum(dim=-1)  # exactly the other keys' sum: p - p or p - 0
        # m == 0: nothing to move; m == 1: no other key to hand the mass back to.
        changed = (mass > 0) & (rest > 0)
        if prepared.queries is not None:
            changed &= prepared.queries[None, :]
        hand_back = torch.where(changed, (1 - self.beta * mass) / rest, 1.0)
        factor = torch.where(sinks[:, None, :] & changed[:, :, None], self.beta, hand_back[:, :, None])
        if prepared.slots is None:
            probs.mul_(factor)
        else:
            probs[prepared.slots] = p * factor


@dataclass(frozen=True)
class SinkCandidates:
    """SinkCalibration's scope on a row's geometry: for each of its heads (h), where the head's
    probabilities sit, and its keys that may be sinks."""

    #: (h,) the heads' indices in the materialised probabilities; None when they are all of
    #: them, in order (edited in place).
    slots: torch.Tensor | None
    #: (1 or h, n) how many query rows see each key, at least 1; None with one query row.
    seen_by: torch.Tensor | None
    #: (h, n) keys that may be sinks.
    eligible: torch.Tensor
    #: (L,) query rows whose probabilities are reweighted; None for every row.
    queries: torch.Tensor | None
