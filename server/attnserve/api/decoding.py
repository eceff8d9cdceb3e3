"""Request bytes that do not parse get INVALID_ARGUMENT and one log line.

grpcio answers a request whose deserialisation raises (invalid UTF-8 in a string field, a
truncated message) with UNKNOWN and logs a traceback. This interceptor gives every unary-request
method of the server a deserializer that hands such bytes to the method as an Undecodable
marker instead, and a check that refuses the marker before the servicer sees it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from ..spec.errors import shorten
from . import errors
from .interception import checked, is_async_unary_request

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
        if not is_async_unary_request(handler) or handler.request_deserializer is None:
            return handler  # streaming requests, and synchronous methods grpc runs in its pool
        method = handler_call_details.method

        async def refuse_undecodable(request, context) -> None:
            if isinstance(request, Undecodable):
                log.warning(
                    "undecodable request to %s from %s: %s",
                    method,
                    context.peer(),
                    shorten(request.error, 200),
                )
                self._on_rejected(grpc.StatusCode.INVALID_ARGUMENT)
                await context.abort_with_status(errors.undecodable(request.message_type))

        return checked(
            handler, refuse_undecodable, request_deserializer=_tolerant(handler.request_deserializer)
        )


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
