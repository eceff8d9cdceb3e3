"""Build InterventionSpec and ReadoutSpec protos from the CLI's flag values.

Index lists are comma-separated numbers and inclusive ranges: "3", "0,2", "2-5,9".
Token ranges (START:END) are half-open like the protos' TokenRange.
"""

from __future__ import annotations

from collections.abc import Sequence

from attnserve_client.spec import SpecError
from attnserve_client.v1 import intervention_pb2, readout_pb2


def parse_index_list(text: str, what: str = "index") -> list[int]:
    """ "2-4,7" -> [2, 3, 4, 7] (sorted, without duplicates)."""
    indices: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            start = int(first)
            end = int(last) if dash else start
        except ValueError:
            raise SpecError(
                f"{what} list {text!r}: expected numbers and ranges like 2-5, comma-separated"
            ) from None
        if start < 0 or end < start:
            raise SpecError(f"{what} list {text!r}: {part.strip()!r} is not a valid {what} or range")
        indices.update(range(start, end + 1))
    return sorted(indices)


def sink_calibration_from_flag(
    text: str, *, tau: float | None = None, beta: float | None = None
) -> intervention_pb2.Intervention:
    """ "LAYERS[:HEADS]" -> ACT sink calibration of those heads (every head when HEADS is left out)."""
    layers, _, heads = text.partition(":")
    selector = intervention_pb2.Selector(
        layers=parse_index_list(layers, "layer"), heads=parse_index_list(heads, "head") if heads else []
    )
    operation = intervention_pb2.SinkCalibration(tau=tau, beta=beta)
    return intervention_pb2.Intervention(selector=selector, sink_calibration=operation)


def emphasis_from_flags(
    ranges: Sequence[str], *, alpha: float | None = None
) -> intervention_pb2.Intervention:
    """PASTA: keep the START:END prompt ranges and multiply every other prompt token's attention by alpha."""
    keys = intervention_pb2.KeySelector(ranges=[parse_token_range(r) for r in ranges], invert=True)
    return intervention_pb2.Intervention(
        selector=intervention_pb2.Selector(keys=keys), key_emphasis=intervention_pb2.KeyEmphasis(alpha=alpha)
    )


def parse_token_range(text: str) -> intervention_pb2.TokenRange:
    """ "START:END" (half-open) -> TokenRange."""
    start, colon, end = text.partition(":")
    try:
        token_range = intervention_pb2.TokenRange(start=int(start), end=int(end))
    except ValueError:
        raise SpecError(f"token range {text!r}: expected START:END, e.g. 0:12") from None
    if not colon or token_range.start < 0 or token_range.end <= token_range.start:
        raise SpecError(f"token range {text!r}: expected START:END with 0 <= START < END")
    return token_range


def attention_rows_from_flags(texts: Sequence[str]) -> readout_pb2.AttentionRowsSpec:
    """ "LAYER:HEAD[:STEP]" values -> one AttentionRowsSpec.

    The proto asks for every combination of its layers, heads and steps, so several flags
    return the union's cross product (steps default to 0, the prefill).
    """
    layers: set[int] = set()
    heads: set[int] = set()
    steps: set[int] = set()
    for text in texts:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise SpecError(f"attention rows {text!r}: expected LAYER:HEAD[:STEP], e.g. 5:0 or 5:0-3:0,1")
        layers.update(parse_index_list(parts[0], "layer"))
        heads.update(parse_index_list(parts[1], "head"))
        steps.update(parse_index_list(parts[2], "step") if len(parts) == 3 else [0])
    return readout_pb2.AttentionRowsSpec(layers=sorted(layers), heads=sorted(heads), steps=sorted(steps))


def specs_from_flags(
    *,
    presets: Sequence[str] = (),
    sink_calibration: Sequence[str] = (),
    tau: float | None = None,
    beta: float | None = None,
    emphasize: Sequence[str] = (),
    alpha: float | None = None,
    layer_statistics: bool = False,
    summary: bool = False,
    attention_rows: Sequence[str] = (),
) -> tuple[intervention_pb2.InterventionSpec, readout_pb2.ReadoutSpec]:
    interventions = [sink_calibration_from_flag(text, tau=tau, beta=beta) for text in sink_calibration]
    if emphasize:
        interventions.append(emphasis_from_flags(emphasize, alpha=alpha))
    readouts = readout_pb2.ReadoutSpec(layer_statistics=layer_statistics, summary=summary)
    if attention_rows:
        readouts.attention_rows.CopyFrom(attention_rows_from_flags(attention_rows))
    return intervention_pb2.InterventionSpec(presets=presets, interventions=interventions), readouts
