"""Every dashboard query and every recording rule, run by a real Prometheus scraping a real
attnserve (transformers engine, the real SmolLM2) that served plain requests, requests with
interventions, a cancelled one and a refused one, returns data for that model; every series
name they read is one the live server exports (or a rule records)."""

from __future__ import annotations

import concurrent.futures
import math
import os
import pathlib
import time
import urllib.request

import grpc
import pytest
import yaml
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc
from attnserve_client.v1 import intervention_pb2 as ipb
from e2e.conftest import running_server
from e2e.helpers import act, chat_request, run

from . import live
from .conftest import RULES, dashboard_queries, exported_sample_names, metric_names, recording_rules

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not live.PROMETHEUS.exists(), reason="no /usr/bin/prometheus (make tools)"),
]
MODEL, ENGINE = "smollm2", "transformers"
# 5m: the whole run, however slowly a loaded machine serves it.
LIVE = {"$model": MODEL, "$engine": ENGINE, "$__rate_interval": "5m"}
#: Set to a path to also plot the main panels from the live data (docs/dashboard-live.png).
PNG_ENV = "ATTNSERVE_DASHBOARD_PNG"


def serve_traffic(target: str, api: str) -> None:
    """Plain and intervened generations side by side, one cancelled, one refused (twice)."""
    calibrated = ipb.InterventionSpec(interventions=[act(list(range(2, 30)))])
    requests = [chat_request(max_tokens=6) for _ in range(2)]
    requests += [chat_request("Name three rivers.", max_tokens=6, interventions=calibrated) for _ in range(2)]
    requests += [chat_request(max_tokens=6, interventions=ipb.InterventionSpec(presets=["act-l5"]))]
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        # A model's series appear, at 0, when it is loaded; rate() sees only what is counted
        # after Prometheus has scraped them once.
        loaded = [
            f'attnserve_intervention_applied_total{{model="{MODEL}"}}',
            f'attnserve_attention_sink_mass_ratio_count{{model="{MODEL}", layer="29"}}',
        ]
        assert all(wait_for_data(api, loaded).values()), "the model's series were not scraped at zero"
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            for _, complete in pool.map(lambda request: run(stub, request), requests):
                assert complete is not None
        stream = stub.Generate(chat_request("Count to one hundred.", max_tokens=100))
        next(stream)
        stream.cancel()
        # Twice, scrapes apart: the counter of a status code appears on its first rejection, at 1.
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as refused:
                run(stub, chat_request(interventions=ipb.InterventionSpec(interventions=[act([99])])))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            time.sleep(1.5)
    # A cancelled stream is counted when the engine next steps; then one more scrape and rule
    # evaluation.
    scraped = [
        'attnserve_request_finished_total{finish_reason="cancelled"} > 0',
        "attnserve_request_rejected_total > 1",
    ]
    assert all(wait_for_data(api, scraped).values()), "the cancelled and refused requests were never scraped"
    time.sleep(2)


def wait_for_data(api: str, exprs: list[str], timeout: float = 45) -> dict[str, list[dict]]:
    """Each expr's result once every one has data (scrapes and rule evaluations lag by seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        results = {expr: live.query(api, expr) for expr in exprs}
        empty = [expr for expr, result in results.items() if not result]
        if not empty or time.monotonic() > deadline:
            return results
        time.sleep(1)


def values(result: list[dict]) -> list[float]:
    return [float(series["value"][1]) for series in result]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory, smollm2_path):
    workdir = tmp_path_factory.mktemp("live-dashboard")
    config = {
        "statistics": {"sample_rate": 0.25},
        "models": [
            {
                "name": MODEL,
                "kind": "llm",
                "engine": ENGINE,
                "path": str(smollm2_path),
                "presets": [
                    {
                        "name": "act-l5",
                        "description": "sink calibration on layer 5",
                        "interventions": [{"layers": [5], "sink_calibration": {"tau": 0.1, "beta": 0.4}}],
                        "provenance": {"source": "tests"},
                    }
                ],
            }
        ],
    }
    config_path = workdir / "attnserve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with (
        running_server(config_path, workdir / "server.log") as server,
        live.prometheus(server["metrics_url"], workdir) as api,
    ):
        started = time.time()
        serve_traffic(server["target"], api)
        yield {"api": api, "metrics_url": server["metrics_url"], "started": started}


def test_recording_rules_return_data_for_the_model(live_server):
    api = live_server["api"]
    groups = yaml.safe_load(RULES.read_text())["spec"]["groups"]
    records = [rule for group in groups for rule in group["rules"] if "record" in rule]
    results = wait_for_data(api, [rule["expr"] for rule in records])
    for rule in records:
        result = results[rule["expr"]]
        ours = [
            s for s in result if s["metric"].get("model") == MODEL and s["metric"].get("engine") == ENGINE
        ]
        assert ours, f"{rule['record']} ({rule.get('labels', {})}) has no data for {MODEL}: {result}"
        assert all(not math.isnan(v) for v in values(ours)), f"{rule['record']}: {ours}"
    # The recorded series themselves exist too (Prometheus evaluated the rules).
    for record in recording_rules():
        assert live.query(api, f'{record}{{model="{MODEL}"}}'), record


def test_dashboard_queries_return_data_for_the_model(live_server):
    api = live_server["api"]
    queries = dashboard_queries(LIVE)
    results = wait_for_data(api, [expr for _, expr in queries])
    for title, expr in queries:
        result = results[expr]
        assert result, f"panel {title!r}: no data for {expr}"
        for series in result:
            assert series["metric"].get("model", MODEL) == MODEL, (title, series)
            assert not math.isnan(float(series["value"][1])), (title, expr, series)

    def panel(title: str, index: int = 0) -> list[dict]:
        return results[[expr for panel_title, expr in queries if panel_title == title][index]]

    # What the traffic must show: requests, tokens, latency, interventions, attention statistics.
    assert sum(values(panel("Requests finished"))) > 0
    assert min(values(panel("Tokens", 1))) > 0
    assert 0 < min(values(panel("Time to first token")))
    assert {s["metric"]["code"] for s in panel("Rejected by status code") if float(s["value"][1]) > 0} == {
        "INVALID_ARGUMENT"
    }
    cancelled = [s for s in panel("Errors and aborts") if s["metric"]["finish_reason"] == "cancelled"]
    assert values(cancelled)[0] > 0
    applied = {s["metric"]["operation"]: float(s["value"][1]) for s in panel("Interventions applied")}
    assert applied["sink_calibration"] > 0 and applied["key_emphasis"] == 0
    sink = {s["metric"]["layer"]: float(s["value"][1]) for s in panel("Sink mass")}
    assert len(sink) == 30 and all(0 < v <= 1 for v in sink.values())
    assert all(0 < v <= 1 for v in values(panel("Normalized entropy")))
    assert values(panel("Failing requests")) == [0.0]


def test_queries_read_only_exported_series(live_server):
    with urllib.request.urlopen(live_server["metrics_url"], timeout=10) as response:
        exported = exported_sample_names(response.read().decode())
    recorded = recording_rules()
    read = set().union(*(metric_names(expr) for _, expr in dashboard_queries(LIVE)))
    read |= set().union(*(metric_names(expr) for expr in recorded.values()))
    assert read - recorded.keys() <= exported, read - recorded.keys() - exported
    assert read & recorded.keys(), "the dashboard reads the recording rules"


@pytest.mark.skipif(not os.environ.get(PNG_ENV), reason=f"set {PNG_ENV}=docs/dashboard-live.png to plot")
def test_plot_main_panels(live_server):
    from .plot import plot_main_panels

    plot_main_panels(live_server["api"], live_server["started"], pathlib.Path(os.environ[PNG_ENV]))
