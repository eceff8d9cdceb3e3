"""Write attnserve's Grafana dashboard (attnserve.json beside this file) with grafana-foundation-sdk.

    python deploy/monitoring/dashboard/generate.py

deploy/monitoring's kustomization ships the JSON as a ConfigMap labelled for Grafana's sidecar;
tests/deploy regenerate it (and fail when the committed file is stale) and run every query
against a real Prometheus scraping a real server. Latency quantiles and per-layer attention
means come from the PrometheusRule's recording rules; the rest are raw queries.
"""

from __future__ import annotations

import json
import pathlib
import sys
from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dashboard_builder
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, DataSourceRef, VariableRefresh

OUTPUT = pathlib.Path(__file__).resolve().parent / "attnserve.json"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
#: Every query selects the dashboard's model and engine.
SELECTOR = 'model=~"$model", engine=~"$engine"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Chart:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    width: int = 8
    stacked: bool = False
    max_value: float | None = None


def quantiles(record: str) -> tuple[Query, ...]:
    """The p50, p95 and p99 series of one latency recording rule."""
    return (Query(f"{record}{{{SELECTOR}}}", "{{model}} p{{quantile}}"),)


def rate(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}{{{SELECTOR}}}[$__rate_interval]))"


ROWS: tuple[tuple[str, tuple[Chart, ...]], ...] = (
    (
        "Traffic and latency",
        (
            Chart(
                "Requests finished",
                "Requests finished per second, by finish reason.",
                "reqps",
                (
                    Query(
                        rate("attnserve_request_finished_total", "model, finish_reason"),
                        "{{model}} {{finish_reason}}",
                    ),
                ),
                stacked=True,
            ),
            Chart(
                "Tokens",
                "Prompt tokens processed and tokens generated per second.",
                "short",
                (
                    Query(rate("attnserve_request_prompt_tokens_total", "model"), "{{model}} prompt"),
                    Query(rate("attnserve_request_generation_tokens_total", "model"), "{{model}} generated"),
                ),
            ),
            Chart(
                "Time to first token",
                "From admission to the first generated token, queue time included (5 minute window).",
                "s",
                quantiles("attnserve:request_time_to_first_token_seconds:quantile_rate5m"),
            ),
            Chart(
                "Inter-token latency",
                "Between consecutive generated tokens of a request (5 minute window).",
                "s",
                quantiles("attnserve:request_inter_token_latency_seconds:quantile_rate5m"),
            ),
            Chart(
                "End-to-end latency",
                "From admission to the end of a finished request (5 minute window).",
                "s",
                quantiles("attnserve:request_e2e_latency_seconds:quantile_rate5m"),
            ),
            Chart(
                "Queue time",
                "From admission to the start of generation (5 minute window).",
                "s",
                quantiles("attnserve:request_queue_time_seconds:quantile_rate5m"),
            ),
        ),
    ),
    (
        "Capacity",
        (
            Chart(
                "Requests running",
                "Requests being generated, per replica.",
                "short",
                (Query(f"attnserve_scheduler_requests_running{{{SELECTOR}}}", "{{model}} {{pod}}"),),
                stacked=True,
            ),
            Chart(
                "Requests waiting",
                "Admitted, not started: the total, and per replica (what the autoscalers target).",
                "short",
                (
                    Query(
                        f"sum by (model) (attnserve_scheduler_requests_waiting{{{SELECTOR}}})",
                        "{{model}} total",
                    ),
                    Query(
                        f"avg by (model) (attnserve_scheduler_requests_waiting{{{SELECTOR}}})",
                        "{{model}} per replica",
                    ),
                ),
            ),
            Chart(
                "KV cache usage",
                "Share of each replica's KV cache in use; above 0.9 for long, latency climbs.",
                "percentunit",
                (Query(f"attnserve_scheduler_kv_cache_usage_ratio{{{SELECTOR}}}", "{{model}} {{pod}}"),),
                max_value=1,
            ),
        ),
    ),
    (
        "Errors",
        (
            Chart(
                "Failing requests",
                "Share of requests that ended in an error or were refused as overloaded, unavailable "
                "or internal (the AttnserveRequestsFailing alert's expression).",
                "percentunit",
                (Query(f"attnserve:request_errors:ratio_rate5m{{{SELECTOR}}}", "{{model}}"),),
            ),
            Chart(
                "Rejected by status code",
                "Requests refused before generation, per second, by gRPC status code.",
                "reqps",
                (Query(rate("attnserve_request_rejected_total", "model, code"), "{{model}} {{code}}"),),
                stacked=True,
            ),
            Chart(
                "Errors and aborts",
                "Requests that ended in an error, were cancelled or passed their deadline, per second.",
                "reqps",
                (
                    Query(
                        "sum by (model, finish_reason) (rate(attnserve_request_finished_total{"
                        + SELECTOR
                        + ', finish_reason=~"error|cancelled|deadline"}[$__rate_interval]))',
                        "{{model}} {{finish_reason}}",
                    ),
                ),
                stacked=True,
            ),
        ),
    ),
    (
        "Interventions",
        (
            Chart(
                "Interventions applied",
                "Attention interventions applied per second, by operation.",
                "ops",
                (
                    Query(
                        rate("attnserve_intervention_applied_total", "model, operation"),
                        "{{model}} {{operation}}",
                    ),
                ),
                width=16,
                stacked=True,
            ),
            Chart(
                "Attention statistics samples",
                "Per-layer statistics samples recorded per second (statistics.sample_rate of steps).",
                "ops",
                (Query(rate("attnserve_attention_samples_total", "model"), "{{model}}"),),
            ),
        ),
    ),
    (
        "Attention statistics per layer",
        (
            Chart(
                "Sink mass",
                "Attention mass on token 0, mean over queries and heads, per layer (5 minute window).",
                "percentunit",
                (
                    Query(
                        f"attnserve:attention_sink_mass_ratio:mean_rate5m{{{SELECTOR}}}",
                        "{{model}} layer {{layer}}",
                    ),
                ),
                max_value=1,
            ),
            Chart(
                "Normalized entropy",
                "Attention entropy over ln(number of keys), mean per layer (5 minute window).",
                "percentunit",
                (
                    Query(
                        f"attnserve:attention_normalized_entropy_ratio:mean_rate5m{{{SELECTOR}}}",
                        "{{model}} layer {{layer}}",
                    ),
                ),
                max_value=1,
            ),
            Chart(
                "Hidden sinks per head",
                "Keys after token 0 with column-mean attention above 0.1, mean per head (5 minute window).",
                "short",
                (
                    Query(
                        f"attnserve:attention_hidden_sinks_per_head:mean_rate5m{{{SELECTOR}}}",
                        "{{model}} layer {{layer}}",
                    ),
                ),
            ),
            Chart(
                "Sink mass against its baseline",
                "Mean over all layers: the last 30 minutes and the last day (the "
                "AttnserveAttentionSinkMassDrift alert fires when they differ by more than 0.1).",
                "percentunit",
                (
                    Query(
                        f"attnserve:attention_sink_mass_ratio:mean_rate30m{{{SELECTOR}}}", "{{model}} 30 min"
                    ),
                    Query(
                        f"attnserve:attention_sink_mass_ratio:mean_rate1d{{{SELECTOR}}}", "{{model}} 1 day"
                    ),
                ),
                width=12,
                max_value=1,
            ),
            Chart(
                "Layers with a strong sink",
                "Share of samples whose sink mass exceeds 0.5, per layer.",
                "percentunit",
                (
                    Query(
                        "1 - sum by (model, layer) (rate(attnserve_attention_sink_mass_ratio_bucket{"
                        + SELECTOR
                        + ', le="0.5"}[$__rate_interval])) / sum by (model, layer) '
                        "(rate(attnserve_attention_sink_mass_ratio_count{"
                        + SELECTOR
                        + "}[$__rate_interval]))",
                        "{{model}} layer {{layer}}",
                    ),
                ),
                width=12,
                max_value=1,
            ),
        ),
    ),
)


def chart_panel(chart: Chart) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(chart.title)
        .description(chart.description)
        .datasource(DATASOURCE)
        .unit(chart.unit)
        .min(0)
        .span(chart.width)
        .height(8)
        .fill_opacity(10)
        .legend(
            common_builder.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
        )
    )
    if chart.max_value is not None:
        panel = panel.max(chart.max_value)
    if chart.stacked:
        panel = panel.stacking(common_builder.StackingConfig().mode(common.StackingMode.NORMAL))
    for index, query in enumerate(chart.queries):
        panel = panel.with_target(
            prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(chr(ord("A") + index))
        )
    return panel


def overview() -> list[stat.Panel]:
    """The top line: replicas serving, request rate, p95 time to first token, failing share."""
    stats = (
        ("Replicas", "short", f"count(attnserve_scheduler_requests_running{{{SELECTOR}}})"),
        (
            "Requests / s",
            "reqps",
            f"sum(rate(attnserve_request_finished_total{{{SELECTOR}}}[$__rate_interval]))",
        ),
        (
            "p95 time to first token",
            "s",
            "max(attnserve:request_time_to_first_token_seconds:quantile_rate5m{"
            + SELECTOR
            + ', quantile="0.95"})',
        ),
        ("Failing requests", "percentunit", f"max(attnserve:request_errors:ratio_rate5m{{{SELECTOR}}})"),
    )
    return [
        stat.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(6)
        .height(4)
        .with_target(prometheus.Dataquery().expr(expr).instant().ref_id("A"))
        for title, unit, expr in stats
    ]


def label_variable(name: str, query: str) -> dashboard_builder.QueryVariable:
    return (
        dashboard_builder.QueryVariable(name)
        .label(name.capitalize())
        .datasource(DATASOURCE)
        .query({"query": query, "refId": name})
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )


def build() -> dict:
    board = (
        dashboard_builder.Dashboard("attnserve")
        .uid("attnserve")
        .description("attnserve serving, capacity, errors, interventions and attention statistics.")
        .tags(["attnserve", "llm", "grpc"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("browser")
        .with_variable(
            dashboard_builder.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(label_variable("model", "label_values(attnserve_request_finished_total, model)"))
        .with_variable(
            label_variable(
                "engine", 'label_values(attnserve_request_finished_total{model=~"$model"}, engine)'
            )
        )
    )
    for panel in overview():
        board = board.with_panel(panel)
    for title, charts in ROWS:
        board = board.with_row(dashboard_builder.Row(title))
        for chart in charts:
            board = board.with_panel(chart_panel(chart))
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render())
    sys.stdout.write(f"wrote {OUTPUT}\n")
