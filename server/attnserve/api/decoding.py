"""Request bytes that do not parse get INVALID_ARGUMENT and one log line.

grpcio answers a request whose deserialisation raises (invalid UTF-8 in a string field, a
truncated message) with UNKNOWN and logs a traceback. This interceptor gives every unary-request
method of the server a deserializer that hands such bytes to the method as an Undecodable
marker instead, and a method wrapper that refuses the marker before the servicer sees it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from ..spec.errors import shorten
from . import errors

log = logging.getLogger("attnserve.api")

#: Called with the status code of each refused request (the rejected-requests counter).
OnRejected = Callable[[grpc.StatusCode], None]


@dataclass(frozen=True)
class Undecodable:
    """What a method receives in place of a request whose bytes did not parse."""

    message_type: str
    error: str


class UndecodableRequests(grpc.aio.ServerInterceptor):
    def __init__(self, on_rejected: OnRejected):
        self._on_rejected = on_rejected

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        behavior = getattr(handler, kind)
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # a synchronous method: grpc runs it in its thread pool, leave it be
        return handler._replace(
            request_deserializer=_tolerant(handler.request_deserializer),
            **{kind: self._refusing(behavior, handler_call_details.method)},
        )

    def _refusing(self, behavior, method: str):
        async def refuse(request: Undecodable, context) -> None:
            log.warning(
                "undecodable request to %s from %s: %s", method, context.peer(), shorten(request.error, 200)
            )
            self._on_rejected(grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort_with_status(errors.undecodable(request.message_type))

        if inspect.isasyncgenfunction(behavior):

            async def streaming(request, context):
                if isinstance(request, Undecodable):
                    await refuse(request, context)
                    return
                async for response in behavior(request, context):
                    yield response

            return streaming

        async def unary(request, context):
            if isinstance(request, Undecodable):
                await refuse(request, context)
                return None
            return await behavior(request, context)

        return unary


def _tolerant(deserialize: Callable[[bytes], object]) -> Callable[[bytes], object]:
    # The generated stubs pass a message class's FromString: its class names the type.
    message_class = getattr(deserialize, "__self__", None)
    message_type = message_class.DESCRIPTOR.full_name if message_class is not None else "request message"

    def tolerant(data: bytes) -> object:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return Undecodable(message_type, str(exc))

    return tolerant
