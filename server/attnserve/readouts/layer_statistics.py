"""layer_statistics: per-layer entropy, sink masses, hidden sinks and mass on chosen prompt ranges,
averaged over every query of the generation (definitions: docs/attention-math.md#statistics).

Stage: the statistics attention.core computes on each call's final map. State: layer -> sums
over query rows (LayerStatistics), added up call by call and step by step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import readout_pb2

from ..attention.plan import ReadoutNeeds
from ..attention.readout import LayerStatistics, RowReadout
from ..spec.errors import Violations
from ..spec.selectors import prompt_ranges
from .base import CallSite, Readout, ResponseContext

#: layer -> its statistics summed over calls (divide by query_count for means).
Totals = dict[int, LayerStatistics]


@dataclass(frozen=True)
class LayerStatisticsSettings:
    name: ClassVar[str] = "layer_statistics"
    #: Half-open prompt ranges whose attention mass is reported.
    mass_ranges: tuple[tuple[int, int], ...] = ()
    #: Each image's tokens: the statistics add their share and the entropy over them.
    image_spans: tuple[tuple[int, int], ...] = ()

    def needs(self, layer: int, step: int) -> ReadoutNeeds:
        return ReadoutNeeds(statistics=True, mass_ranges=self.mass_ranges, image_keys=self.image_spans)


class LayerStatisticsReadout(Readout):
    name = LayerStatisticsSettings.name

    def asked(self, spec: readout_pb2.ReadoutSpec) -> bool:
        return spec.layer_statistics or len(spec.mass_ranges) > 0

    def compile(self, spec, ctx, violations: Violations) -> LayerStatisticsSettings:
        mass_ranges = prompt_ranges(spec.mass_ranges, "readouts.mass_ranges", ctx.prompt_tokens, violations)
        if mass_ranges and not spec.layer_statistics:
            violations.add("readouts.mass_ranges", "needs layer_statistics")
        return LayerStatisticsSettings(mass_ranges=mass_ranges, image_spans=tuple(ctx.image_spans))

    def new_state(self) -> Totals:
        return {}

    def record(self, state: Totals, settings, call: CallSite, readout: RowReadout) -> None:
        if readout.statistics is not None:
            _add(state, call.layer, readout.statistics)

    def merge(self, state: Totals, other: Totals) -> None:
        for layer, statistics in other.items():
            _add(state, layer, statistics)

    def write_complete(
        self, complete: pb.GenerateComplete, settings, result: Totals | None, response: ResponseContext
    ) -> None:
        for layer, s in sorted((result or {}).items()):
            n = max(s.query_count, 1)
            image = {}
            if s.image_mass is not None:
                seeing = max(s.image_query_count, 1)
                image = {
                    "image_mass": s.image_mass / seeing,
                    "image_entropy": s.image_entropy / seeing,
                    "image_query_count": s.image_query_count,
                }
            sinks = {
                name: value / n
                for name, value in (
                    ("sink_mass", s.sink_mass),
                    ("sink_mass_first4", s.sink_mass_first4),
                    ("hidden_sinks", s.hidden_sinks),
                )
                if value is not None  # bidirectional and cross-attention layers have no sinks
            }
            complete.layer_statistics.append(
                readout_pb2.LayerStatistics(
                    layer=layer,
                    entropy=s.entropy / n,
                    normalized_entropy=s.normalized_entropy / n,
                    range_mass=[m / n for m in s.range_mass],
                    query_count=s.query_count,
                    **sinks,
                    **image,
                )
            )


def _add(into: Totals, layer: int, statistics: LayerStatistics) -> None:
    total = into.get(layer)
    if total is None:  # a copy: the call's own object may be added to other totals too
        into[layer] = dataclasses.replace(statistics, range_mass=list(statistics.range_mass))
    else:
        total.add(statistics)
