"""What attention.core returns per row: its statistics and last query rows for one call."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerStatistics:
    """Statistics of one row in one attention call: sums over its query rows of head means.

    Divide by query_count for means; sums let an engine add calls (steps) together. The sink
    statistics are None where they do not apply (RowLayout.has_sink_statistics: full-mask rows).
    """

    query_count: int
    entropy: float
    #: Entropy over ln(number of keys the query sees).
    normalized_entropy: float
    sink_mass: float | None
    sink_mass_first4: float | None
    #: Keys after token 0 with mean attention > 0.1 over this call's queries, mean over heads,
    #: times query_count (so it averages like the others).
    hidden_sinks: float | None
    #: Mass on each ReadoutNeeds.mass_ranges entry.
    range_mass: list[float]
    #: Query rows that see an image key (ReadoutNeeds.image_keys); the image statistics are sums
    #: over them (divide by image_query_count), None when the row has no image keys.
    image_query_count: int = 0
    #: Mass on the image keys.
    image_mass: float | None = None
    #: Entropy of the attention over the image keys, renormalised to sum to 1 over them, divided
    #: by ln(image keys the query sees).
    image_entropy: float | None = None

    def add(self, other: LayerStatistics) -> None:
        self.query_count += other.query_count
        self.entropy += other.entropy
        self.normalized_entropy += other.normalized_entropy
        self.sink_mass = _add(self.sink_mass, other.sink_mass)
        self.sink_mass_first4 = _add(self.sink_mass_first4, other.sink_mass_first4)
        self.hidden_sinks = _add(self.hidden_sinks, other.hidden_sinks)
        self.range_mass = [a + b for a, b in zip(self.range_mass, other.range_mass)]
        self.image_query_count += other.image_query_count
        self.image_mass = _add(self.image_mass, other.image_mass)
        self.image_entropy = _add(self.image_entropy, other.image_entropy)


def _add(a: float | None, b: float | None) -> float | None:
    """Sums of a statistic; None (does not apply) stays None."""
    return None if a is None or b is None else a + b


@dataclass
class RowReadout:
    """What attention.core computed on one row's final map in one call, as its RowPlan's needs
    asked (fields are None when not asked for); the readouts (attnserve/readouts/) read from it."""

    statistics: LayerStatistics | None = None
    #: (H, num_visible_keys) float32 probabilities of the row's last query, every head.
    last_query_rows: torch.Tensor | None = None
    #: The row's prompt length (keys at positions beyond it are generated tokens).
    num_prompt_tokens: int = 0


def merge_head_shards(shards: list[RowReadout]) -> RowReadout:
    """One row's readout of one call from the readouts of disjoint head shards that hold as many
    heads each, in head order (tensor parallelism): the last query rows stacked, the statistics'
    head means averaged over the shards (every statistic is a head mean, or a count that all
    shards share)."""
    first = shards[0]
    rows = None
    if first.last_query_rows is not None:
        rows = torch.cat([shard.last_query_rows for shard in shards])
    statistics = None
    if first.statistics is not None:
        parts = [shard.statistics for shard in shards]
        statistics = LayerStatistics(
            query_count=parts[0].query_count,
            entropy=_mean([p.entropy for p in parts]),
            normalized_entropy=_mean([p.normalized_entropy for p in parts]),
            sink_mass=_mean([p.sink_mass for p in parts]),
            sink_mass_first4=_mean([p.sink_mass_first4 for p in parts]),
            hidden_sinks=_mean([p.hidden_sinks for p in parts]),
            range_mass=[_mean(masses) for masses in zip(*(p.range_mass for p in parts))],
            image_query_count=parts[0].image_query_count,
            image_mass=_mean([p.image_mass for p in parts]),
            image_entropy=_mean([p.image_entropy for p in parts]),
        )
    return RowReadout(statistics=statistics, last_query_rows=rows, num_prompt_tokens=first.num_prompt_tokens)


def _mean(values: list[float | None]) -> float | None:
    """The mean over shards; None (does not apply) stays None."""
    return None if values[0] is None else sum(values) / len(values)
