"""scanpath: where the model looked at each step, as OAT and NevaClip study it: the image patch
with the most attention from the row that predicts the step's token, averaged over the chosen
layers and heads, over every image of the request.

Stage: the last query rows attention.core computes on the final (post-intervention) map, in the
calls of the chosen layers, every step. State: per step, the summed image-token columns and the
number of (layer, head) rows summed; the fixations are chosen once the generation is done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import readout_pb2

from ..attention.plan import NO_NEEDS, ReadoutNeeds
from ..attention.readout import RowReadout
from ..spec.errors import Violations
from .base import CallSite, Readout, ResponseContext, image_readout_layers

FIELD = "readouts.scanpath"
ROWS = ReadoutNeeds(last_query_rows=True)


@dataclass(frozen=True)
class ScanpathSettings:
    name: ClassVar[str] = "scanpath"
    layers: frozenset[int] = frozenset()
    #: Query heads, ascending; () is every head.
    heads: tuple[int, ...] = ()
    #: Half-open prompt positions of each image's tokens (a square grid of patches each).
    image_spans: tuple[tuple[int, int], ...] = ()

    def needs(self, layer: int, step: int) -> ReadoutNeeds:
        return ROWS if layer in self.layers else NO_NEEDS


@dataclass
class StepSum:
    #: Per image, its patches' attention summed over the rows read.
    sums: list[list[float]]
    rows: int


#: step -> its sums.
State = dict[int, StepSum]


class Scanpath(Readout):
    name = ScanpathSettings.name

    def asked(self, spec: readout_pb2.ReadoutSpec) -> bool:
        return spec.HasField("scanpath")

    def compile(self, spec, ctx, violations: Violations) -> ScanpathSettings:
        path = spec.scanpath
        layers = image_readout_layers(path, FIELD, ctx, violations)
        return ScanpathSettings(
            layers=frozenset(layer.index for layer in layers),
            heads=tuple(sorted(set(path.heads))),
            image_spans=tuple(ctx.image_spans),
        )

    def new_state(self) -> State:
        return {}

    def record(self, state: State, settings: ScanpathSettings, call: CallSite, readout: RowReadout) -> None:
        if readout.last_query_rows is None or call.layer not in settings.layers:
            return
        rows = readout.last_query_rows  # (heads, keys)
        heads = list(settings.heads) or list(range(rows.shape[0]))
        sums = [rows[heads, start:end].sum(0).tolist() for start, end in settings.image_spans]
        _add(state, call.step, StepSum(sums, len(heads)))

    def merge(self, state: State, other: State) -> None:
        for step, step_sum in other.items():
            _add(state, step, step_sum)

    def write_complete(
        self, complete: pb.GenerateComplete, settings, result: State | None, response: ResponseContext
    ) -> None:
        complete.scanpath.extend(fixation(step, s) for step, s in sorted((result or {}).items()))


def fixation(step: int, step_sum: StepSum) -> readout_pb2.ScanpathPoint:
    """The step's most attended patch (the first of equals, in image then row-major order)."""
    image, patch, total = max(
        ((i, p, w) for i, sums in enumerate(step_sum.sums) for p, w in enumerate(sums)),
        key=lambda point: point[2],
    )
    grid = math.isqrt(len(step_sum.sums[image]))
    return readout_pb2.ScanpathPoint(
        step=step, image=image, row=patch // grid, column=patch % grid, weight=total / step_sum.rows
    )


def _add(state: State, step: int, step_sum: StepSum) -> None:
    total = state.get(step)
    if total is None:
        state[step] = StepSum([list(sums) for sums in step_sum.sums], step_sum.rows)
        return
    for mine, theirs in zip(total.sums, step_sum.sums):
        for p, value in enumerate(theirs):
            mine[p] += value
    total.rows += step_sum.rows
