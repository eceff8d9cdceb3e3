"""The method being calibrated and the head sets it is placed on.

A head set is a frozenset of units: (layer, head) for one query head, (layer, None) for every head
of a layer. A placed method is an intervention dict in the spec-file format (what a preset file
holds); its plan comes from spec.compile_plan, the path a request naming the preset takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from attnserve_client.spec import intervention_from_dict
from attnserve_client.v1 import intervention_pb2, readout_pb2

from ..attention.plan import EMPTY_PLAN, OPERATIONS, RequestPlan
from ..spec.compile import SpecContext, SpecLimits, compile_plan
from ..spec.geometry import ModelGeometry

Unit = tuple[int, int | None]
HeadSet = frozenset[Unit]

#: Operations calibration can place (the ones the authors choose heads for).
METHODS = ("sink_calibration", "key_emphasis")


def describe_head_set(head_set: HeadSet) -> str:
    """ "5:all 7:0,3": layers with every head, or their chosen heads."""
    if not head_set:
        return "none"
    parts = []
    for layer, heads in sorted(heads_by_layer(head_set).items()):
        parts.append(f"{layer}:all" if heads is None else f"{layer}:{','.join(map(str, heads))}")
    return " ".join(parts)


def heads_by_layer(head_set: HeadSet) -> dict[int, tuple[int, ...] | None]:
    """layer -> its heads, None when the whole layer is in the set."""
    out: dict[int, tuple[int, ...] | None] = {}
    for layer in sorted({layer for layer, _ in head_set}):
        if (layer, None) in head_set:
            out[layer] = None
        else:
            out[layer] = tuple(sorted(h for lay, h in head_set if lay == layer and h is not None))
    return out


@dataclass(frozen=True)
class Method:
    """An operation with fixed parameters, to be placed on heads."""

    #: One of METHODS.
    operation: str
    #: The operation's fields as in the spec format, e.g. {"tau": 0.1, "beta": 0.4}.
    parameters: Mapping[str, Any] = field(default_factory=dict)
    #: Selector keys for key_emphasis in the spec format, e.g. {"ranges": [[0, 1]]}; None: unset.
    keys: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.operation not in METHODS:
            raise ValueError(f"method {self.operation!r} is not one of {', '.join(METHODS)}")

    def intervention(self, head_set: HeadSet) -> dict[str, Any]:
        """The intervention dict of this method on head_set (non-empty)."""
        layer_heads = []
        for layer, heads in heads_by_layer(head_set).items():
            layer_heads.append({"layer": layer} if heads is None else {"layer": layer, "heads": list(heads)})
        intervention: dict[str, Any] = {"layer_heads": layer_heads}
        if self.keys is not None:
            intervention["keys"] = dict(self.keys)
        intervention[self.operation] = dict(self.parameters)
        return intervention


class PlanCompiler:
    """Head sets -> RequestPlans, checked against the model like a request would be."""

    def __init__(self, method: Method, geometry: ModelGeometry, shortest_prompt: int):
        self._method = method
        self._context = SpecContext(
            geometry=geometry,
            limits=SpecLimits(max_interventions=1, max_readout_values=0),
            presets={},
            # Key ranges valid for the shortest prompt are valid for every example.
            prompt_tokens=shortest_prompt,
            max_tokens=1,
            supported_operations=frozenset(OPERATIONS),
        )

    def plan(self, head_set: HeadSet) -> RequestPlan:
        """The plan of the method on head_set; the empty set is the unmodified model. Raises
        spec.errors.InvalidRequest when the method's parameters or keys are invalid."""
        if not head_set:
            return EMPTY_PLAN
        spec = intervention_pb2.InterventionSpec(
            interventions=[intervention_from_dict(self._method.intervention(head_set), "method")]
        )
        return compile_plan(spec, readout_pb2.ReadoutSpec(), self._context)

    def plans(self, head_sets: Iterable[HeadSet]) -> list[RequestPlan]:
        return [self.plan(head_set) for head_set in head_sets]
