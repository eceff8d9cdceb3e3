"""Plain-text rendering of models, layer statistics, top log-probabilities and scores for the CLI."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from attnserve_client.completion import finish_reason_name
from attnserve_client.v1 import inference_service_pb2 as service_pb2
from attnserve_client.v1 import intervention_pb2, model_pb2, readout_pb2


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [list(headers)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def enum_label(enum: EnumTypeWrapper, value: int, prefix: str) -> str:
    """OPERATION_KIND_SINK_CALIBRATION -> "sink_calibration"."""
    return enum.Name(value).removeprefix(prefix).lower()


def models_table(models: Sequence[model_pb2.Model]) -> str:
    headers = ("name", "kind", "engine", "layers", "heads", "kv heads", "head dim", "context")
    rows = [
        (
            m.name,
            enum_label(model_pb2.ModelKind, m.kind, "MODEL_KIND_"),
            enum_label(model_pb2.EngineKind, m.engine, "ENGINE_KIND_"),
            m.num_layers,
            m.num_heads,
            m.num_kv_heads,
            m.head_dim,
            m.max_context_length,
        )
        for m in models
    ]
    return table(headers, rows)


def model_description(model: model_pb2.Model) -> str:
    operations = [
        enum_label(intervention_pb2.OperationKind, k, "OPERATION_KIND_") for k in model.supported_operations
    ]
    readouts = [enum_label(model_pb2.ReadoutKind, k, "READOUT_KIND_") for k in model.supported_readouts]
    limits = model.limits
    lines = [
        f"name:        {model.name}",
        f"kind:        {enum_label(model_pb2.ModelKind, model.kind, 'MODEL_KIND_')}",
        f"engine:      {enum_label(model_pb2.EngineKind, model.engine, 'ENGINE_KIND_')}",
        f"geometry:    {model.num_layers} layers, {model.num_heads} query heads, {model.num_kv_heads} kv heads",
        f"             head dim {model.head_dim}, context {model.max_context_length} tokens",
        "layers:" if model.layers else "layers:      -",
        *(f"  {_layer_run_text(run)}" for run in _layer_runs(model.layers)),
        f"rpcs:        {', '.join(model.supported_rpcs) or '-'}",
        f"inputs:      {', '.join(model.input_modalities) or '-'}",
        f"operations:  {', '.join(operations) or '-'}",
        f"readouts:    {', '.join(readouts) or '-'}",
        f"recipes:     {', '.join(model.supported_recipes) or '-'}",
        "limits:",
        f"  max prompt tokens    {limits.max_prompt_tokens}",
        f"  max tokens           {limits.max_tokens}",
        f"  max interventions    {limits.max_interventions}",
        f"  max readout values   {limits.max_readout_values}",
        f"  max logprobs         {limits.max_logprobs}",
        "parameter ranges:" if model.parameter_ranges else "parameter ranges: -",
        *(f"  {r.field:<24} {_range_text(r)}" for r in model.parameter_ranges),
        "presets:" if model.presets else "presets:     -",
    ]
    for preset in model.presets:
        lines.append(
            f"  {preset.name}: {preset.description} ({_count(len(preset.interventions), 'intervention')})"
        )
        lines += [f"    {key}: {value}" for key, value in sorted(preset.provenance.items())]
    return "\n".join(lines)


def _range_text(r: model_pb2.ParameterRange) -> str:
    interval = f"{'(' if r.min_exclusive else '['}{r.min:g}, {r.max:g}{')' if r.max_exclusive else ']'}"
    return f"0 or {interval}" if r.zero_allowed else interval


#: Unset on layers without sinks (bidirectional and cross-attention).
_SINK_STATISTICS = ("sink_mass", "sink_mass_first4", "hidden_sinks")


def layer_statistics_table(statistics: Sequence[readout_pb2.LayerStatistics]) -> str:
    headers = ["layer", "entropy", "norm entropy", "sink mass", "first-4 mass", "hidden sinks", "queries"]
    ranges = max((len(s.range_mass) for s in statistics), default=0)
    headers += [f"range {i} mass" for i in range(ranges)]
    rows = [
        [
            s.layer,
            s.entropy,
            s.normalized_entropy,
            *(getattr(s, name) if s.HasField(name) else "-" for name in _SINK_STATISTICS),
            s.query_count,
        ]
        + list(s.range_mass)
        for s in statistics
    ]
    return table(headers, rows)


def top_logprobs_table(tokens: Sequence[service_pb2.GeneratedToken]) -> str:
    rows = [
        (
            t.index,
            t.token_id,
            repr(t.text),
            t.logprob,
            "  ".join(f"{alt.text!r} {alt.logprob:.3f}" for alt in t.top_logprobs),
        )
        for t in tokens
    ]
    return table(("index", "id", "text", "logprob", "top alternatives"), rows)


def scores_table(response: service_pb2.ScoreResponse) -> str:
    """Candidates in request order with their log-probabilities; the most likely one marked."""
    best = max(range(len(response.scores)), key=lambda i: response.scores[i].logprob)
    rows = [
        (repr(s.candidate), s.logprob, s.num_tokens, "*" if i == best else "")
        for i, s in enumerate(response.scores)
    ]
    return table(("candidate", "logprob", "tokens", "best"), rows)


def completion_footer(complete: service_pb2.GenerateComplete) -> str:
    usage = complete.usage
    return (
        f"finish: {finish_reason_name(complete.finish_reason)}; "
        f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens; "
        f"{_count(complete.interventions_applied, 'intervention')} applied"
    )


def _layer_runs(layers: Sequence[model_pb2.AttentionLayer]) -> list[list[model_pb2.AttentionLayer]]:
    """Consecutive layers grouped while they share component, kind, causality and shape."""
    runs: list[list[model_pb2.AttentionLayer]] = []
    for layer in layers:
        if runs and _layer_shape(runs[-1][-1]) == _layer_shape(layer):
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return runs


def _layer_shape(layer: model_pb2.AttentionLayer) -> tuple:
    return (layer.component, layer.kind, layer.causal, layer.num_heads, layer.num_kv_heads, layer.head_dim)


def _layer_run_text(run: Sequence[model_pb2.AttentionLayer]) -> str:
    """One line per run: indices, component, kind, shape and the first and last names."""
    first, last = run[0], run[-1]
    indices = str(first.index) if len(run) == 1 else f"{first.index}..{last.index}"
    names = first.name if len(run) == 1 else f"{first.name} .. {last.name}"
    component = enum_label(model_pb2.ModelComponent, first.component, "MODEL_COMPONENT_")
    kind = enum_label(intervention_pb2.AttentionKind, first.kind, "ATTENTION_KIND_")
    return (
        f"{indices:<8} {component} {kind}{' causal' if first.causal else ''}, {first.num_heads} heads, "
        f"{first.num_kv_heads} kv heads, head dim {first.head_dim}: {names}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _cell(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
