"""Attention operations as a registry: each module here is one operation (its parameters, the
stage it acts at and its math on one row; base.py has the contract). Adding an operation is a
module, its entry below, its proto message and Intervention field, its parameter ranges
(spec/ranges.py) and its test against the eager reference (tests/attention/reference.py)."""

from __future__ import annotations

from collections.abc import Mapping

from attnserve.attention.operations.base import Operation, Stage
from attnserve.attention.operations.head_output_scale import HeadOutputScale
from attnserve.attention.operations.identity_blend import IdentityBlend
from attnserve.attention.operations.key_emphasis import KeyEmphasis
from attnserve.attention.operations.key_mask import KeyMask
from attnserve.attention.operations.logit_rescale import LogitRescale
from attnserve.attention.operations.sink_calibration import SinkCalibration
from attnserve.attention.operations.temperature import Temperature

#: Name -> operation, in the order a row applies them (stage by stage; within a stage, in this
#: order; operations of one kind keep the plan's order).
OPERATIONS: Mapping[str, type[Operation]] = {
    op.name: op
    for op in (
        Temperature,
        LogitRescale,
        KeyEmphasis,
        KeyMask,
        SinkCalibration,
        IdentityBlend,
        HeadOutputScale,
    )
}

__all__ = [
    "OPERATIONS",
    "HeadOutputScale",
    "IdentityBlend",
    "KeyEmphasis",
    "KeyMask",
    "LogitRescale",
    "Operation",
    "SinkCalibration",
    "Stage",
    "Temperature",
]
