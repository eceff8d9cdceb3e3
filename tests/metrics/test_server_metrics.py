"""ServerMetrics: every recording call, series names and labels, promtool's lint."""

import os
import shutil
import subprocess
import sys
import urllib.request

import grpc
import pytest
from attnserve.metrics import FINISH_REASONS, INTERVENTION_OPERATIONS, ServerMetrics
from prometheus_client import CollectorRegistry

MODEL = {"model": "smollm2-135m", "engine": "hf"}


def record_everything(metrics: ServerMetrics) -> None:
    model, engine = MODEL["model"], MODEL["engine"]
    for _ in range(3):
        metrics.request_queued(model, engine)
    metrics.request_started(model, engine, queue_seconds=0.004)
    metrics.request_started(model, engine, queue_seconds=0.5)
    metrics.request_left_queue(model, engine, "cancelled")
    metrics.kv_cache_usage(model, engine, 0.25)
    metrics.first_token(model, engine, 0.09)
    metrics.inter_token(model, engine, 0.02)
    metrics.inter_token(model, engine, 0.03)
    metrics.request_finished(model, engine, "eos", prompt_tokens=42, generation_tokens=17, e2e_seconds=1.2)
    metrics.request_rejected(model, engine, grpc.StatusCode.INVALID_ARGUMENT)
    metrics.request_rejected(model, engine, grpc.StatusCode.RESOURCE_EXHAUSTED)
    metrics.request_rejected(model, engine, grpc.StatusCode.RESOURCE_EXHAUSTED)
    metrics.request_rejected("", "", grpc.StatusCode.NOT_FOUND)
    metrics.attention_statistics(model, engine, 0, sink_mass=0.7, normalized_entropy=0.3, hidden_sinks=1.5)
    metrics.attention_statistics(model, engine, 12, sink_mass=0.1, normalized_entropy=0.8, hidden_sinks=0.0)
    metrics.attention_statistics(
        model,
        engine,
        3,
        sink_mass=0.5,
        normalized_entropy=0.6,
        hidden_sinks=0.0,
        visual_share=0.2,
        visual_entropy=0.9,
    )
    metrics.interventions_applied(model, engine, "sink_calibration", count=4)
    metrics.interventions_applied(model, engine, "key_mask")


@pytest.fixture
def metrics() -> ServerMetrics:
    metrics = ServerMetrics(version="1.2.3")
    record_everything(metrics)
    return metrics


def value(metrics: ServerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_scheduling_gauges(metrics):
    assert value(metrics, "attnserve_scheduler_requests_waiting", **MODEL) == 0
    assert value(metrics, "attnserve_scheduler_requests_running", **MODEL) == 1
    assert value(metrics, "attnserve_scheduler_kv_cache_usage_ratio", **MODEL) == 0.25


def test_request_histograms_and_counters(metrics):
    assert value(metrics, "attnserve_request_queue_time_seconds_count", **MODEL) == 2
    assert value(metrics, "attnserve_request_queue_time_seconds_bucket", le="0.005", **MODEL) == 1
    assert value(metrics, "attnserve_request_time_to_first_token_seconds_sum", **MODEL) == pytest.approx(0.09)
    assert value(metrics, "attnserve_request_inter_token_latency_seconds_count", **MODEL) == 2
    assert value(metrics, "attnserve_request_e2e_latency_seconds_bucket", le="1.5", **MODEL) == 1
    assert value(metrics, "attnserve_request_prompt_length_tokens_bucket", le="50.0", **MODEL) == 1
    assert value(metrics, "attnserve_request_generation_length_tokens_sum", **MODEL) == 17
    assert value(metrics, "attnserve_request_prompt_tokens_total", **MODEL) == 42
    assert value(metrics, "attnserve_request_generation_tokens_total", **MODEL) == 17


def test_finish_reasons_exist_from_first_use(metrics):
    finished = {
        r: value(metrics, "attnserve_request_finished_total", finish_reason=r, **MODEL)
        for r in FINISH_REASONS
    }
    assert finished == {"eos": 1, "length": 0, "stop_string": 0, "cancelled": 1, "deadline": 0, "error": 0}


def test_rejections_by_model_and_status_code(metrics):
    assert value(metrics, "attnserve_request_rejected_total", code="RESOURCE_EXHAUSTED", **MODEL) == 2
    assert value(metrics, "attnserve_request_rejected_total", code="INVALID_ARGUMENT", **MODEL) == 1
    # A request that named no served model counts with empty model and engine labels.
    assert value(metrics, "attnserve_request_rejected_total", code="NOT_FOUND", model="", engine="") == 1


def test_attention_statistics_per_layer(metrics):
    layer0 = {**MODEL, "layer": "0"}
    assert value(metrics, "attnserve_attention_sink_mass_ratio_bucket", le="0.5", **layer0) == 0
    assert value(metrics, "attnserve_attention_sink_mass_ratio_bucket", le="0.7", **layer0) == 1
    assert value(metrics, "attnserve_attention_normalized_entropy_ratio_sum", layer="12", **MODEL) == 0.8
    assert value(metrics, "attnserve_attention_hidden_sinks_per_head_bucket", le="2.0", **layer0) == 1
    assert value(metrics, "attnserve_attention_samples_total", **MODEL) == 3
    layer3 = {**MODEL, "layer": "3"}
    assert value(metrics, "attnserve_attention_visual_share_ratio_sum", **layer3) == pytest.approx(0.2)
    assert value(metrics, "attnserve_attention_visual_entropy_ratio_bucket", le="0.9", **layer3) == 1
    # Text-only samples add no visual series.
    assert value(metrics, "attnserve_attention_visual_share_ratio_count", **layer0) is None


def test_a_loaded_model_has_its_series_at_zero_before_any_request():
    metrics = ServerMetrics()
    metrics.model_loaded(MODEL["model"], MODEL["engine"], statistics_layers=[0, 1, 2])
    for layer in ("0", "1", "2"):
        for name in (
            "attnserve_attention_sink_mass_ratio_count",
            "attnserve_attention_normalized_entropy_ratio_count",
            "attnserve_attention_hidden_sinks_per_head_count",
        ):
            assert value(metrics, name, layer=layer, **MODEL) == 0, (name, layer)
    assert value(metrics, "attnserve_attention_sink_mass_ratio_count", layer="3", **MODEL) is None
    assert value(metrics, "attnserve_attention_visual_share_ratio_count", layer="0", **MODEL) is None
    assert value(metrics, "attnserve_request_finished_total", finish_reason="eos", **MODEL) == 0
    assert value(metrics, "attnserve_visual_recipe_passes_total", recipe="carve", **MODEL) is None
    metrics.model_loaded("tiny-llava", "vllm", statistics_layers=[0, 1], visual=True, recipes=["carve"])
    vlm = {"model": "tiny-llava", "engine": "vllm", "layer": "1"}
    assert value(metrics, "attnserve_attention_visual_entropy_ratio_count", **vlm) == 0
    assert (
        value(
            metrics, "attnserve_visual_recipe_passes_total", model="tiny-llava", engine="vllm", recipe="carve"
        )
        == 0
    )
    assert value(metrics, "attnserve_intervention_applied_total", operation="key_mask", **MODEL) == 0


def test_recipe_passes_count_their_reading_passes_tokens():
    metrics = ServerMetrics()
    metrics.recipe_passes(
        MODEL["model"], MODEL["engine"], "visual_funnel", 2, prompt_tokens=70, generation_tokens=5
    )
    assert value(metrics, "attnserve_visual_recipe_passes_total", recipe="visual_funnel", **MODEL) == 2
    assert value(metrics, "attnserve_request_prompt_tokens_total", **MODEL) == 70
    assert value(metrics, "attnserve_request_generation_tokens_total", **MODEL) == 5


def test_interventions_by_operation(metrics):
    assert INTERVENTION_OPERATIONS == (
        "sink_calibration",
        "key_emphasis",
        "logit_rescale",
        "head_output_scale",
        "identity_blend",
        "temperature",
        "key_mask",
    )
    applied = {
        op: value(metrics, "attnserve_intervention_applied_total", operation=op, **MODEL)
        for op in INTERVENTION_OPERATIONS
    }
    assert applied == {op: 0 for op in INTERVENTION_OPERATIONS} | {"sink_calibration": 4, "key_mask": 1}


def test_unknown_label_values_are_refused(metrics):
    with pytest.raises(KeyError):
        metrics.request_finished("m", "hf", "timeout", 1, 1, 1.0)
    with pytest.raises(KeyError):
        metrics.interventions_applied("m", "hf", "dropout")


def test_server_info(metrics):
    assert value(metrics, "attnserve_server_info", version="1.2.3") == 1


def test_no_series_carries_a_request_id(metrics):
    allowed = {"model", "engine", "layer", "operation", "finish_reason", "code", "le", "version"}
    for family in metrics.registry.collect():
        if family.name.startswith("attnserve_"):
            for sample in family.samples:
                assert set(sample.labels) <= allowed, sample


def test_instances_have_their_own_registries():
    first, second = ServerMetrics(), ServerMetrics()
    first.request_queued("m", "hf")
    assert (
        second.registry.get_sample_value(
            "attnserve_scheduler_requests_waiting", {"model": "m", "engine": "hf"}
        )
        is None
    )


def test_a_given_registry_is_used():
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    metrics.request_queued("m", "hf")
    assert (
        registry.get_sample_value("attnserve_scheduler_requests_waiting", {"model": "m", "engine": "hf"}) == 1
    )
    assert registry.get_sample_value("process_cpu_seconds_total") is None


def test_promtool_accepts_the_exposition(metrics):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=metrics.exposition(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    lint = (result.stdout + result.stderr).decode()
    assert result.returncode == 0 and not lint.strip(), lint


def test_http_server_serves_the_registry(metrics, free_port):
    port = free_port()
    server, thread = metrics.start_http_server(port, host="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert 'attnserve_request_generation_tokens_total{engine="hf",model="smollm2-135m"} 17.0' in body
    assert 'attnserve_server_info{version="1.2.3"} 1.0' in body


def test_importing_metrics_does_not_import_torch():
    code = "import sys, attnserve.metrics; sys.exit('torch' in sys.modules)"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0
