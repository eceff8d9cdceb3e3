"""What the attention calls of one engine step share across its layers.

A request's row keeps its geometry (where its queries and keys sit) from layer to layer, and
often its operations; what depends on nothing else (folded_rows.FoldedGeometry's masks,
core.PreparedOps' scopes and bias) is built at the step's first such call and reused by the
rest. The caller owns the memo and drops it with the step.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from attnserve.attention.core import PreparedOps
    from attnserve.attention.folded_rows import FoldedGeometry


@dataclass
class StepMemo:
    #: Each folded geometry is its own key: equal ones share one instance and its tensors.
    geometries: dict[FoldedGeometry, FoldedGeometry] = field(default_factory=dict)
    #: PreparedOps by the row's geometry and operations (and readouts).
    prepared: dict[Hashable, PreparedOps] = field(default_factory=dict)

    def prepared_for(self, key: Hashable, build: Callable[[], PreparedOps]) -> PreparedOps:
        """The PreparedOps under key, built at the first call."""
        prepared = self.prepared.get(key)
        if prepared is None:
            prepared = self.prepared[key] = build()
        return prepared
