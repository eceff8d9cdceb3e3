"""The gRPC server: inference service, standard health, reflection and the metrics endpoint.

Lifecycle: health NOT_SERVING while models load; SERVING once every engine runs; on SIGTERM
NOT_SERVING for good, new calls refused, in-flight requests finish within the grace period,
then the engines stop and the process exits 0. An engine that dies (vLLM's engine core
process killed, say) fails its requests with UNAVAILABLE and stops the server the same way, with
exit status 1, so that Kubernetes restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

import grpc
from attnserve_client.v1 import inference_service_pb2, inference_service_pb2_grpc
from google.rpc import error_details_pb2  # noqa: F401 - registers the detail types for reflection
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .api.auth import BearerTokens
from .api.decoding import UndecodableRequests
from .api.servicer import InferenceServicer
from .engines.registry import ENGINES
from .metrics import ServerMetrics
from .models.config import ModelConfig, ServerConfig, TlsConfig
from .models.registry import ModelRegistry, ServedModel, preset_proto, visual_recipes

log = logging.getLogger("attnserve.server")

SERVICE_NAME = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Long streams: let clients ping without calls in flight, but not more than every 10 s.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass
class RunningServer:
    grpc_server: grpc.aio.Server
    health: health.aio.HealthServicer
    inference: InferenceServicer
    registry: ModelRegistry
    port: int

    async def stop(self, grace: float) -> None:
        """Drain: health NOT_SERVING and new calls UNAVAILABLE at once (probes still get an
        answer), calls in flight finish within grace (the rest are cancelled), then stop."""
        await self.health.enter_graceful_shutdown()
        self.inference.start_draining()
        if not await self.inference.wait_idle(grace):
            log.warning("calls still in flight after the %.0f s grace period are cancelled", grace)
        await self.grpc_server.stop(0)
        for model in self.registry:
            await model.engine.shutdown()


async def start_server(
    config: ServerConfig, metrics: ServerMetrics, *, host: str, port: int
) -> RunningServer:
    """Bind the port at once (health answers NOT_SERVING), then load models and go SERVING."""

    def rejected(code: grpc.StatusCode) -> None:  # before any model is resolved
        metrics.request_rejected("", "", code)

    interceptors: list[grpc.aio.ServerInterceptor] = []
    if config.security.tokens is not None:
        interceptors.append(BearerTokens(config.security.tokens, rejected))
    interceptors.append(UndecodableRequests(rejected))
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=interceptors)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    registry = ModelRegistry()
    inference = InferenceServicer(registry, metrics)
    inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(inference, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    tls = config.security.tls
    if tls is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", _server_credentials(tls))
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    log.info(
        "listening on %s:%d (%s%s); loading %d model(s)",
        host,
        bound,
        "plaintext" if tls is None else ("mTLS" if tls.client_ca_file else "TLS"),
        f", {len(config.security.tokens)} bearer token(s)" if config.security.tokens else "",
        len(config.models),
    )

    for model_config in config.models.values():
        registry.add(await _load_model(model_config, config, metrics))
    # Liveness ("") and readiness (the service name) both SERVING once models are loaded.
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("ready: serving %s", ", ".join(m.name for m in registry))
    return RunningServer(server, health_servicer, inference, registry, bound)


def _server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


async def _load_model(model: ModelConfig, config: ServerConfig, metrics: ServerMetrics) -> ServedModel:
    log.info("loading model %s (%s engine)", model.name, model.engine)
    path = await asyncio.to_thread(model.resolve_path, config.cache_dir)
    build = ENGINES[model.engine].build  # the config parser checked the name
    engine = await asyncio.to_thread(build, path, model, config, metrics)
    await engine.start()
    # The engines sample statistics on causal self-attention layers (diffusion models have none).
    sampled = config.statistics.sample_rate > 0
    metrics.model_loaded(
        model.name,
        model.engine,
        statistics_layers=[layer.index for layer in engine.info.geometry.layers if sampled and layer.causal],
        visual=engine.info.vision is not None,
        recipes=visual_recipes(engine.info),
    )
    presets = {
        name: preset_proto(name, p.description, p.interventions, p.provenance)
        for name, p in model.presets.items()
    }
    log.info("model %s ready from %s", model.name, path)
    return ServedModel(model.name, model.kind, model.engine, engine, model.limits, presets)


async def serve(config: ServerConfig, *, host: str, port: int, metrics_port: int, grace: float = 25.0) -> int:
    """Run until SIGTERM or SIGINT (exit status 0), or until an engine dies (1: the pod is
    restarted)."""
    metrics = ServerMetrics()
    metrics.start_http_server(metrics_port, host)
    log.info("metrics on http://%s:%d/metrics", host, metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start_server(config, metrics, host=host, port=port)
    signalled = asyncio.create_task(stop.wait())
    engine_failed = asyncio.create_task(_engine_failure(running.registry, running.inference))
    await asyncio.wait((signalled, engine_failed), return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if engine_failed.done():
        name, reason = engine_failed.result()
        log.error("model %s can serve no more (%s): stopping so that the server is restarted", name, reason)
        status = 1
    for task in (signalled, engine_failed):
        task.cancel()
    log.info("shutting down: draining for up to %.0f s", grace)
    await running.stop(grace)
    return status


async def _engine_failure(registry: ModelRegistry, inference: InferenceServicer, period: float = 0.5):
    """(model, reason) of the first engine found dead: checked every period seconds, and at
    once when a call finds its engine dead."""
    while True:
        for model in registry:
            if model.engine.failure:
                return model.name, model.engine.failure
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(inference.engine_died.wait(), period)
        if inference.dead_engine is not None:
            return inference.dead_engine
