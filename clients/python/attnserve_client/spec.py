"""Build InterventionSpec and ReadoutSpec protos from plain dicts, as spec files hold them.

The dicts follow the protos' field names (google.protobuf.json_format parses them) with a few
conveniences: selector fields (layers, layer_names, heads, keys, steps, ...) may sit at an
intervention's top level, token ranges and step ranges may be `[start, end]` pairs, and enum
values may be short lower-case names (`queries: last`). For example:

    presets: [act]
    interventions:
      - layers: [3]
        heads: [0, 2]
        sink_calibration: {tau: 0.1, beta: 0.4}
      - layer_names: ["model.layers.2?.self_attn"]
        keys: {ranges: [[0, 5]], invert: true}
        key_emphasis: {alpha: 0.01}
        steps: [0, 4]
      - layers: [2, 3]                           # PAINT on a vision-language model
        queries: last
        keys: {image_tokens: {tokens: paint_local}}
        logit_rescale: {alpha: 0.7}
    readouts:
      layer_statistics: true
      attention_rows: {layers: [5], heads: [0], steps: [0]}
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

from attnserve_client.v1 import intervention_pb2, readout_pb2

SPEC_KEYS = ("presets", "interventions", "readouts")
OPERATIONS = tuple(
    f.name for f in intervention_pb2.Intervention.DESCRIPTOR.oneofs_by_name["operation"].fields
)
SELECTOR_KEYS = tuple(f.name for f in intervention_pb2.Selector.DESCRIPTOR.fields)
_ENUM_PREFIXES = {"attention": "ATTENTION_KIND_", "queries": "QUERY_SCOPE_"}


class SpecError(ValueError):
    """A spec dict, file or flag that does not describe a valid spec."""


def load_spec_file(path: str | pathlib.Path) -> dict[str, Any]:
    """Read a JSON (.json) or YAML spec file."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise SpecError(f"{path}: {err}") from err
    if not isinstance(data, Mapping):
        raise SpecError(f"{path}: expected a mapping with keys {', '.join(SPEC_KEYS)}")
    return dict(data)


def specs_from_dict(
    data: Mapping[str, Any],
) -> tuple[intervention_pb2.InterventionSpec, readout_pb2.ReadoutSpec]:
    """Split a spec file's dict (presets, interventions, readouts) into the two request protos."""
    _require_mapping(data, "spec")
    _reject_unknown(data, SPEC_KEYS, "spec")
    interventions = {k: data[k] for k in ("presets", "interventions") if k in data}
    return intervention_spec_from_dict(interventions), readout_spec_from_dict(data.get("readouts") or {})


def intervention_spec_from_dict(data: Mapping[str, Any]) -> intervention_pb2.InterventionSpec:
    _require_mapping(data, "interventions spec")
    _reject_unknown(data, ("presets", "interventions"), "interventions spec")
    presets = data.get("presets") or []
    if isinstance(presets, str) or not all(isinstance(p, str) for p in presets):
        raise SpecError("presets: expected a list of preset names")
    items = data.get("interventions") or []
    if not isinstance(items, list):
        raise SpecError("interventions: expected a list")
    spec = intervention_pb2.InterventionSpec(presets=presets)
    for i, item in enumerate(items):
        spec.interventions.append(intervention_from_dict(item, f"interventions[{i}]"))
    return spec


def intervention_from_dict(
    data: Mapping[str, Any], where: str = "intervention"
) -> intervention_pb2.Intervention:
    """One intervention: one operation plus a selector, nested or flat."""
    _require_mapping(data, where)
    _reject_unknown(data, ("selector", *SELECTOR_KEYS, *OPERATIONS), where)
    operations = [k for k in OPERATIONS if k in data]
    if len(operations) != 1:
        raise SpecError(f"{where}: set exactly one operation, one of: {', '.join(OPERATIONS)}")
    operation = operations[0]

    selector = dict(_require_mapping(data.get("selector") or {}, f"{where}.selector"))
    for key in SELECTOR_KEYS:
        if key in data:
            if key in selector:
                raise SpecError(f"{where}: {key} is set both at the top level and in selector")
            selector[key] = data[key]
    parameters = data[operation]
    fields = {operation: {} if parameters is None else parameters}
    if selector:
        fields["selector"] = _normalize_selector(selector, f"{where}.selector")
    return _parse(fields, intervention_pb2.Intervention(), where)


def readout_spec_from_dict(data: Mapping[str, Any]) -> readout_pb2.ReadoutSpec:
    _require_mapping(data, "readouts")
    fields = dict(data)
    if "mass_ranges" in fields:
        fields["mass_ranges"] = [
            _token_range(r, f"readouts.mass_ranges[{i}]") for i, r in enumerate(fields["mass_ranges"])
        ]
    return _parse(fields, readout_pb2.ReadoutSpec(), "readouts")


def _normalize_selector(selector: dict[str, Any], where: str) -> dict[str, Any]:
    keys = selector.get("keys")
    if isinstance(keys, list):  # a bare list of ranges
        keys = {"ranges": keys}
    if isinstance(keys, Mapping) and "ranges" in keys:
        ranges = [_token_range(r, f"{where}.keys.ranges[{i}]") for i, r in enumerate(keys["ranges"])]
        keys = selector["keys"] = {**keys, "ranges": ranges}
    image_tokens = keys.get("image_tokens") if isinstance(keys, Mapping) else None
    if isinstance(image_tokens, Mapping) and isinstance(image_tokens.get("tokens"), str):
        tokens = image_tokens["tokens"].upper()  # paint_local -> VISUAL_TOKENS_PAINT_LOCAL
        if not tokens.startswith("VISUAL_TOKENS_"):
            tokens = "VISUAL_TOKENS_" + tokens
        selector["keys"] = {**keys, "image_tokens": {**image_tokens, "tokens": tokens}}
    steps = selector.get("steps")
    if isinstance(steps, (list, tuple)):
        selector["steps"] = _pair_to_range(steps, f"{where}.steps", allow_open_end=True)
    for key, prefix in _ENUM_PREFIXES.items():
        value = selector.get(key)
        if isinstance(value, str) and not value.upper().startswith(prefix):
            selector[key] = prefix + value.upper()
    return selector


def _token_range(value: Any, where: str) -> Any:
    return _pair_to_range(value, where) if isinstance(value, (list, tuple)) else value


def _pair_to_range(pair: Any, where: str, *, allow_open_end: bool = False) -> dict[str, int]:
    """[start, end] -> {"start": start, "end": end}; with allow_open_end, end may be null."""
    ends_ok = all(isinstance(v, int) or (v is None and allow_open_end and i == 1) for i, v in enumerate(pair))
    if len(pair) != 2 or not ends_ok:
        raise SpecError(f"{where}: expected [start, end] with integer positions, got {pair!r}")
    start, end = pair
    return {"start": start} if end is None else {"start": start, "end": end}


def _parse(fields: Mapping[str, Any], message: Message, where: str) -> Any:
    try:
        return json_format.ParseDict(fields, message)
    except json_format.ParseError as err:
        raise SpecError(f"{where}: {err}") from err


def _require_mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _reject_unknown(data: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = [k for k in data if k not in known]
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; expected one of: {', '.join(known)}")
