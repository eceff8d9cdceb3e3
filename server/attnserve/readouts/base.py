"""The contract of a readout: one module of this package per readout, registered in READOUTS.

A readout follows a request from its spec to its response:
- compile (spec/compile.py, once per request): check its fields of the ReadoutSpec and return
  its settings, a frozen dataclass whose needs(layer, step) says what attention.core computes
  for it in each attention call (its stage: statistics or the last query's rows, on the final
  post-intervention map; attention/plan.py ReadoutNeeds);
- record (in the engine's process, after each attention call): read its values from the call's
  RowReadout into its state for the step, a picklable object (the vLLM engine ships it from
  its worker to the server);
- merge: add one state into another (the parts of a chunked prefill, then step after step);
- write: per-token readouts go out with each step's token (write_token); the others are
  finished once and written into the request's last message (write_complete).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import readout_pb2

from ..attention.plan import ReadoutSettings
from ..attention.readout import RowReadout
from ..spec.errors import Violations
from ..spec.geometry import AttentionLayer
from ..spec.selectors import checked_heads, selected_layers


@dataclass(frozen=True)
class CallSite:
    """Which attention call a RowReadout came from: step 0 is the prefill."""

    layer: int
    step: int
    #: Position of the row's last query in its sequence.
    query_position: int


@dataclass(frozen=True)
class ResponseContext:
    """What writing a readout into a response may need besides its values."""

    prompt_token_ids: Sequence[int]
    #: Decodes token ids to text (the engine's tokenizer).
    tokenizer: Any


class Readout(ABC):
    """One kind of readout (see the module docstring for its lifecycle)."""

    #: Its name: the ReadoutSpec field, and what engines list in supported_readouts.
    name: ClassVar[str]
    #: Whether each step's state goes out with that step's token rather than at the end.
    per_token: ClassVar[bool] = False

    @abstractmethod
    def asked(self, spec: readout_pb2.ReadoutSpec) -> bool:
        """Whether the spec asks for this readout (or sets one of its fields)."""

    @abstractmethod
    def compile(self, spec: readout_pb2.ReadoutSpec, ctx, violations: Violations) -> ReadoutSettings:
        """Its settings for this request; problems go to violations (ctx: spec.compile.SpecContext)."""

    @abstractmethod
    def new_state(self) -> Any:
        """An empty state for one step."""

    @abstractmethod
    def record(self, state: Any, settings: ReadoutSettings, call: CallSite, readout: RowReadout) -> None:
        """Add one attention call's values to the step's state."""

    @abstractmethod
    def merge(self, state: Any, other: Any) -> None:
        """Add other (a later part of the step, or another step) into state."""

    def finish(self, state: Any) -> Any:
        """The request's result from its states merged over every step."""
        return state

    def write_token(self, token: pb.GeneratedToken, state: Any) -> None:
        """Write one step's state into its token (per-token readouts)."""
        raise NotImplementedError(f"{self.name} is not a per-token readout")

    def write_complete(
        self,
        complete: pb.GenerateComplete,
        settings: ReadoutSettings,
        result: Any,
        response: ResponseContext,
    ) -> None:
        """Write the finished result (None when no call produced a value) into the last message;
        a per-token readout may add what its tokens' values need to be read."""


def image_readout_layers(selector, field: str, ctx, violations: Violations) -> list[AttentionLayer]:
    """The layers a readout over image patches reads (selector: its message, with layers,
    layer_names and heads), its heads checked against them; the request must carry images."""
    if not ctx.image_spans:
        violations.add(field, "the request has no images (image parts of chat messages)")
    if not selector.layers and not selector.layer_names:
        violations.add(f"{field}.layers", "name at least one layer (layers or layer_names)")
    layers = selected_layers(selector.layers, selector.layer_names, field, ctx.geometry, violations)
    checked_heads(selector.heads, f"{field}.heads", layers or ctx.geometry.layers, violations)
    return layers
