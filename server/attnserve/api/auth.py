"""Bearer-token authentication: UNAUTHENTICATED without a known token, PERMISSION_DENIED for a
model outside the token's list. The health service stays open for probes."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from ..spec.errors import quoted
from .interception import checked, is_async_unary_request, refused
from .tokens import TokenStore

#: Methods any caller may use: Kubernetes probes carry no token.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


class BearerTokens(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: TokenStore, on_rejected: Callable[[grpc.StatusCode], None]):
        self._tokens = tokens
        self._on_rejected = on_rejected

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        token = _bearer_token(handler_call_details.invocation_metadata)
        grant = self._tokens.grant_for(token) if token else None
        if grant is None:
            self._on_rejected(grpc.StatusCode.UNAUTHENTICATED)
            return refused(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "a known bearer token is required: send metadata 'authorization: Bearer <token>'",
            )
        if grant.models is None or not is_async_unary_request(handler):
            return handler
        allowed = grant.models

        async def check_model(request, context) -> None:
            name = _model_named(request)
            if name is not None and name not in allowed:
                self._on_rejected(grpc.StatusCode.PERMISSION_DENIED)
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, f"this token may not use model {quoted(name)}"
                )

        return checked(handler, check_model)


def _bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


def _model_named(request) -> str | None:
    """The model a request is for: Generate and Score name it in model, GetModel in name."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None:  # not a message (an undecodable request, refused further in)
        return None
    if "model" in descriptor.fields_by_name:
        return request.model
    if descriptor.name == "GetModelRequest":
        return request.name
    return None
