"""The ranges a request's float parameters must lie in, so that the arithmetic stays finite.

A float32 field accepts values (1e-45, 3e38) whose use in a model overflows or underflows:
logits divided by a temperature of 1e-45 are infinite, and a head output scaled by 1e38 turns
the next layer's activations into inf and NaN. These bounds keep every accepted request's
numbers finite in fp32, bf16 and, for sane models, fp16, while covering every setting the
papers use. GetModel lists them (Model.parameter_ranges) and the README's table repeats them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import Violations


@dataclass(frozen=True)
class NumberRange:
    """An interval; NaN and the infinities are never in one."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    #: 0 is accepted besides the interval (sampling.temperature: 0 is greedy).
    zero_allowed: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.zero_allowed and value == 0:
            return True
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """E.g. "must be in (0, 1)", "must be 0 or in [0.01, 100]"."""
        interval = (
            f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        )
        return f"must be {'0 or ' if self.zero_allowed else ''}in {interval}"


#: Field path (relative to GenerateRequest for sampling, to an Intervention otherwise) -> range.
PARAMETER_RANGES: dict[str, NumberRange] = {
    # vLLM raises temperatures below 0.01 to 0.01 (they overflow): the same floor on every engine.
    "sampling.temperature": NumberRange(0.01, 100.0, zero_allowed=True),
    "sampling.top_p": NumberRange(0.0, 1.0, low_open=True),
    "sink_calibration.tau": NumberRange(0.0, 1.0, low_open=True, high_open=True),
    "sink_calibration.beta": NumberRange(0.0, 1.0),
    # A log(alpha) bias of at most 13.8 either way: beyond it emphasis is a mask or its inverse.
    "key_emphasis.alpha": NumberRange(1e-6, 1e6),
    "logit_rescale.alpha": NumberRange(-1.0, 100.0, low_open=True),
    "head_output_scale.scale": NumberRange(-100.0, 100.0),
    "identity_blend.weight": NumberRange(0.0, 1.0),
    "temperature.temperature": NumberRange(0.01, 100.0),
    # Visual recipes (relative to GenerateRequest).
    "carve.top_fraction": NumberRange(0.0, 1.0, low_open=True),
    "visual_funnel.smallest_crop": NumberRange(0.0, 1.0, low_open=True),
    "visual_funnel.largest_crop": NumberRange(0.0, 1.0, low_open=True),
    # GenerateImage (relative to GenerateImageRequest).
    "guidance_scale": NumberRange(1.0, 30.0),
    "pag.scale": NumberRange(0.0, 100.0),
    "pag.adaptive_scale": NumberRange(0.0, 1.0),
    "pag.soft.u": NumberRange(0.0, 1.0),
    # Layout binding: at most a log(alpha) bias of 13.8, as key_emphasis.
    "layout.strength": NumberRange(1.0, 1e6, low_open=True),
}


def ranged_value(msg, name: str, default: float, key: str, field: str, violations: Violations) -> float:
    """msg.name (default when unset), with a violation on field.name unless it lies in
    PARAMETER_RANGES[key]."""
    value = getattr(msg, name) if msg.HasField(name) else default
    allowed = PARAMETER_RANGES[key]
    if value not in allowed:
        violations.add(f"{field}.{name}", f"{allowed.describe()} (got {value:g})")
    return value
