"""Per-request attention plans: what to do to one request's rows in one attention call.

Plain data; each operation's math lives in its module of attention/operations/. spec/ compiles
a request's InterventionSpec and ReadoutSpec into a RequestPlan (each readout's settings come from
its module in attnserve/readouts/); an engine asks it, for each attention call, for the RowPlan of
that layer and step and hands the rows and their RowPlans to attention.core.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

# The operations, importable from here with the rest of a plan's vocabulary.
from attnserve.attention.operations import (  # noqa: F401
    OPERATIONS,
    HeadOutputScale,
    IdentityBlend,
    KeyEmphasis,
    KeyMask,
    LogitRescale,
    Operation,
    SinkCalibration,
    Temperature,
)

# --- Selection --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisualKeys:
    """Image tokens chosen from the vision tower's attention, known only once it has run:
    the engine resolves them into KeySet.ranges before the prefill (attention/paint.py)."""

    #: Image indices, in prompt order.
    images: tuple[int, ...]
    #: "paint_local" or "paint_summary".
    part: str


@dataclass(frozen=True)
class KeySet:
    """Keys an operation acts on, as token positions of the request's own sequence.

    ranges are half-open [start, end) prompt positions; no ranges selects every prompt token.
    invert selects the prompt tokens outside the ranges. Generated tokens (positions at or after
    the prompt length) are selected only when include_generated is set.
    """

    ranges: tuple[tuple[int, int], ...] = ()
    invert: bool = False
    include_generated: bool = False
    #: Image tokens still to be chosen by the engine; their positions will join ranges.
    visual: VisualKeys | None = None


ALL_PROMPT_KEYS = KeySet()


@dataclass(frozen=True)
class QueryRows:
    """Query rows an operation acts on, as indices 0..L-1 of the call's L valid query rows of
    the request (attention/layout.py: row i of RowAttention.q; in a DiT's joint attention the
    image tokens first, then the text tokens).

    ranges are half-open [start, end), cut off at L; no ranges selects every row. invert selects
    the rows outside the ranges.
    """

    ranges: tuple[tuple[int, int], ...] = ()
    invert: bool = False

    def __post_init__(self) -> None:
        for start, end in self.ranges:
            if not 0 <= start < end:
                raise ValueError(f"query row range [{start}, {end}) must have 0 <= start < end")


ALL_QUERY_ROWS = QueryRows()


@dataclass(frozen=True)
class ScopedOp:
    """An operation with the heads, keys and query rows it acts on (for one layer).

    The op acts on a query row when query_rows selects it and, with last_query_only, it is the
    last one."""

    op: Operation
    #: Query-head indices; None means every head.
    heads: tuple[int, ...] | None = None
    keys: KeySet = ALL_PROMPT_KEYS
    #: Only the query row that predicts the next token (the row's last query).
    last_query_only: bool = False
    query_rows: QueryRows = ALL_QUERY_ROWS


@dataclass(frozen=True)
class StepRange:
    """Steps [start, end): step 0 is the prefill, step n the n-th decode step."""

    start: int = 0
    end: int | None = None

    def __contains__(self, step: int) -> bool:
        return self.start <= step and (self.end is None or step < self.end)


ALL_STEPS = StepRange()


# --- Readouts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadoutNeeds:
    """What attention.core computes on one row's final (post-intervention) map in one call, for
    the readouts that read it (attnserve/readouts/)."""

    #: Per-layer statistics (attention/statistics.py), with the mass on each of mass_ranges.
    statistics: bool = False
    #: Half-open prompt ranges whose attention mass the statistics report.
    mass_ranges: tuple[tuple[int, int], ...] = ()
    #: The last query's attention over its keys, every head.
    last_query_rows: bool = False
    #: The request's image tokens (half-open prompt spans): the statistics add their share and
    #: the entropy over them.
    image_keys: tuple[tuple[int, int], ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.statistics and not self.last_query_rows

    def __or__(self, other: ReadoutNeeds) -> ReadoutNeeds:
        # Only the layer_statistics readout names mass ranges; a request's readouts and its
        # sampled statistics name the same image keys.
        return ReadoutNeeds(
            statistics=self.statistics or other.statistics,
            mass_ranges=self.mass_ranges or other.mass_ranges,
            last_query_rows=self.last_query_rows or other.last_query_rows,
            image_keys=self.image_keys or other.image_keys,
        )


NO_NEEDS = ReadoutNeeds()


class ReadoutSettings(Protocol):
    """One readout of a request, compiled (each module of attnserve/readouts/ defines its own)."""

    #: The readout's name in attnserve.readouts.READOUTS.
    name: ClassVar[str]

    def needs(self, layer: int, step: int) -> ReadoutNeeds:
        """What the readout reads from this attention call (NO_NEEDS for nothing)."""
        ...


@dataclass(frozen=True)
class RowPlan:
    """What attention.core does to one row in one attention call."""

    ops: tuple[ScopedOp, ...] = ()
    needs: ReadoutNeeds = NO_NEEDS


@dataclass(frozen=True)
class RequestPlan:
    """A request's compiled interventions and readouts."""

    #: layer -> (steps, op) in application order; identity operations are already dropped.
    layer_ops: Mapping[int, tuple[tuple[StepRange, ScopedOp], ...]] = field(default_factory=dict)
    #: The request's readouts, in the order of attnserve.readouts.READOUTS.
    readouts: tuple[ReadoutSettings, ...] = ()
    #: Operation name of each intervention that will run (presets expanded, identities dropped).
    applied_operations: tuple[str, ...] = ()
    #: The request's image tokens (half-open prompt spans), for the sampled statistics.
    image_keys: tuple[tuple[int, int], ...] = ()

    @property
    def edits_attention(self) -> bool:
        return bool(self.layer_ops)

    @property
    def touches_attention(self) -> bool:
        """Whether any attention call of this request has work (edits or readouts)."""
        return bool(self.layer_ops) or bool(self.readouts)

    def ops_for(self, layer: int, step: int) -> tuple[ScopedOp, ...]:
        return tuple(op for steps, op in self.layer_ops.get(layer, ()) if step in steps)

    def for_call(self, layer: int, step: int, sample_statistics: bool = False) -> RowPlan | None:
        """The RowPlan of one attention call, or None when the row is left untouched."""
        ops = self.ops_for(layer, step)
        if not self.readouts and not sample_statistics:
            return RowPlan(ops=ops) if ops else None
        needs = ReadoutNeeds(statistics=True, image_keys=self.image_keys) if sample_statistics else NO_NEEDS
        for readout in self.readouts:
            needs = needs | readout.needs(layer, step)
        if not ops and needs.is_empty:
            return None
        return RowPlan(ops=ops, needs=needs)

    def for_head_shard(self, first: int, count: int) -> RequestPlan:
        """The plan as a tensor-parallel worker holding query heads [first, first + count) applies
        it to its own heads: each op's heads become local indices (global head = first + local),
        an op with none of its heads there is dropped, and every head (None) stays every head.
        Readouts are kept: the worker reads them out on its heads (the engine gathers them)."""
        layer_ops = {}
        for layer, scoped_ops in self.layer_ops.items():
            local_ops = []
            for steps, scoped in scoped_ops:
                if scoped.heads is not None:
                    heads = tuple(h - first for h in scoped.heads if first <= h < first + count)
                    if not heads:
                        continue
                    scoped = dataclasses.replace(scoped, heads=heads)
                local_ops.append((steps, scoped))
            if local_ops:
                layer_ops[layer] = tuple(local_ops)
        return dataclasses.replace(self, layer_ops=layer_ops)


EMPTY_PLAN = RequestPlan()
