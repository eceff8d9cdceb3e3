"""attention_rows: the last query's attention over its keys, for chosen layers, heads and steps.

Stage: the last query rows attention.core computes on the final map, in the calls of the chosen
layers and steps. State: the rows of one step; per token, so each step's rows go out with the
token that step produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import readout_pb2

from ..attention.plan import NO_NEEDS, ReadoutNeeds
from ..attention.readout import RowReadout
from ..spec.errors import Violations
from ..spec.selectors import checked_heads, selected_layers
from .base import CallSite, Readout, ResponseContext

FIELD = "readouts.attention_rows"
ROWS = ReadoutNeeds(last_query_rows=True)


@dataclass(frozen=True)
class AttentionRowsSettings:
    name: ClassVar[str] = "attention_rows"
    layers: frozenset[int] = frozenset()
    #: Query heads, ascending; () is every head.
    heads: tuple[int, ...] = ()
    steps: frozenset[int] = frozenset({0})

    def needs(self, layer: int, step: int) -> ReadoutNeeds:
        return ROWS if layer in self.layers and step in self.steps else NO_NEEDS


@dataclass
class AttentionRowOut:
    layer: int
    head: int
    step: int
    query_position: int
    weights: list[float]


class AttentionRows(Readout):
    name = AttentionRowsSettings.name
    per_token = True

    def asked(self, spec: readout_pb2.ReadoutSpec) -> bool:
        return spec.HasField("attention_rows")

    def compile(self, spec, ctx, violations: Violations) -> AttentionRowsSettings:
        rows, geo = spec.attention_rows, ctx.geometry
        if not rows.layers and not rows.layer_names:
            violations.add(f"{FIELD}.layers", "name at least one layer (layers or layer_names)")
        layers = selected_layers(rows.layers, rows.layer_names, FIELD, geo, violations)
        checked_heads(rows.heads, f"{FIELD}.heads", layers or geo.layers, violations)
        steps = list(rows.steps) or [0]
        for i, step in enumerate(steps):
            if not 0 <= step < ctx.max_tokens:
                violations.add(
                    f"{FIELD}.steps[{i}]", f"step {step} must be in [0, {ctx.max_tokens}) (max_tokens)"
                )
        heads = tuple(sorted(set(rows.heads)))
        values = (
            sum(len(heads) or layer.num_heads for layer in layers)
            * len(set(steps))
            * (ctx.prompt_tokens + ctx.max_tokens)
        )
        if values > ctx.limits.max_readout_values:
            violations.add(
                FIELD,
                f"up to {values} attention weights exceed the limit of {ctx.limits.max_readout_values}; "
                "ask for fewer layers, heads or steps",
            )
        return AttentionRowsSettings(
            layers=frozenset(layer.index for layer in layers), heads=heads, steps=frozenset(steps)
        )

    def new_state(self) -> list[AttentionRowOut]:
        return []

    def record(
        self,
        state: list[AttentionRowOut],
        settings: AttentionRowsSettings,
        call: CallSite,
        readout: RowReadout,
    ) -> None:
        if readout.last_query_rows is None or settings.needs(call.layer, call.step) is NO_NEEDS:
            return
        heads = settings.heads or range(readout.last_query_rows.shape[0])
        for head in heads:
            weights = readout.last_query_rows[head].tolist()
            state.append(AttentionRowOut(call.layer, head, call.step, call.query_position, weights))

    def merge(self, state: list[AttentionRowOut], other: list[AttentionRowOut]) -> None:
        state.extend(other)

    def write_complete(self, complete, settings, result, response: ResponseContext) -> None:
        complete.prompt_token_texts.extend(
            response.tokenizer.decode([token_id]) for token_id in response.prompt_token_ids
        )

    def write_token(self, token: pb.GeneratedToken, state: list[AttentionRowOut]) -> None:
        token.attention_rows.extend(
            readout_pb2.AttentionRow(
                layer=r.layer, head=r.head, step=r.step, query_position=r.query_position, weights=r.weights
            )
            for r in state
        )
