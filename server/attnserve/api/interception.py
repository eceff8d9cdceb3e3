"""Wrapping a gRPC method handler so that a check runs before the servicer sees the request.

The server's interceptors (decoding.py, auth.py) refuse some calls before they reach a servicer:
a check awaits (request, context) and aborts the call to refuse it.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import grpc

#: Awaited with (request, context) before the method runs; aborts the call to refuse it.
RequestCheck = Callable[[object, grpc.aio.ServicerContext], Awaitable[None]]


def is_async_unary_request(handler: grpc.RpcMethodHandler | None) -> bool:
    """Whether checked() can wrap the handler: one request message, an async method."""
    if handler is None or handler.request_streaming:
        return False
    behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


def checked(handler: grpc.RpcMethodHandler, check: RequestCheck, **replace) -> grpc.RpcMethodHandler:
    """The handler (is_async_unary_request) with check awaited before its method; replace sets
    other handler fields (e.g. request_deserializer)."""
    kind = "unary_stream" if handler.response_streaming else "unary_unary"
    behavior = getattr(handler, kind)
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request, context):
            await check(request, context)
            async for response in behavior(request, context):
                yield response

        wrapped = streaming
    else:

        async def unary(request, context):
            await check(request, context)
            return await behavior(request, context)

        wrapped = unary
    return handler._replace(**{kind: wrapped}, **replace)


def refused(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape that aborts every call with code and message."""

    async def refuse(_request_or_iterator, context):
        await context.abort(code, message)

    kind = {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }[handler.request_streaming, handler.response_streaming]
    return handler._replace(**{kind: refuse})
