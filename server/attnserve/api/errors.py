"""The one place that maps request and engine errors to gRPC statuses with google.rpc details.

Every status is bounded: grpcio clients refuse trailers above 8 KiB by default (16 KiB hard)
and then report their own RESOURCE_EXHAUSTED instead of the server's status, so a request with
fifty bad fields or a 3,000-character name must still get a status that fits. A status lists
at most MAX_VIOLATIONS field violations (an ErrorInfo counts the rest), and every field, text
and message is cut to a fixed length.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..engines.base import NonFiniteOutput
from ..spec.errors import (
    FieldViolation,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    RequestError,
    Unsupported,
    shorten,
)

MAX_VIOLATIONS = 8
MAX_FIELD_BYTES = 100
MAX_DESCRIPTION_BYTES = 200
MAX_MESSAGE_BYTES = 500
DOMAIN = "attnserve"


def to_status(exc: RequestError) -> grpc.Status:
    """A grpc.Status (code, message, google.rpc.Status details) for a refused request."""
    if isinstance(exc, InvalidRequest):
        return _invalid_request(exc.violations)
    if isinstance(exc, ModelNotFound):
        name = shorten(exc.name, MAX_FIELD_BYTES)
        info = error_details_pb2.ResourceInfo(resource_type="model", resource_name=name, description=str(exc))
        return _status(code_pb2.NOT_FOUND, str(exc), info)
    if isinstance(exc, Unsupported):
        return _status(code_pb2.FAILED_PRECONDITION, str(exc), _error_info("UNSUPPORTED"))
    if isinstance(exc, Overloaded):
        return _status(
            code_pb2.RESOURCE_EXHAUSTED, str(exc), error_details_pb2.RetryInfo(retry_delay={"seconds": 1})
        )
    return _status(code_pb2.INVALID_ARGUMENT, str(exc), _error_info("INVALID_REQUEST"))


def undecodable(message_type: str) -> grpc.Status:
    """INVALID_ARGUMENT for request bytes that do not parse as message_type."""
    return _status(
        code_pb2.INVALID_ARGUMENT,
        f"the request is not a valid {message_type} (protobuf parsing failed, e.g. invalid UTF-8 "
        "in a string field)",
        _error_info("UNDECODABLE_REQUEST"),
    )


def non_finite_output(exc: NonFiniteOutput, request_id: str) -> grpc.Status:
    """INTERNAL for one request whose numbers went bad; the rest of its batch was unharmed."""
    return _status(
        code_pb2.INTERNAL,
        f"{exc} (request_id {shorten(request_id, 64)}); the other requests in its batch were not affected",
        _error_info("NON_FINITE_OUTPUT"),
    )


def _invalid_request(violations: list[FieldViolation]) -> grpc.Status:
    listed = [
        error_details_pb2.BadRequest.FieldViolation(
            field=shorten(v.field, MAX_FIELD_BYTES), description=shorten(v.description, MAX_DESCRIPTION_BYTES)
        )
        for v in violations[:MAX_VIOLATIONS]
    ]
    details: list[Message] = [error_details_pb2.BadRequest(field_violations=listed)]
    message = "; ".join(f"{v.field}: {v.description}" for v in listed[:3])
    if len(violations) > len(listed[:3]):
        message += f"; and {len(violations) - len(listed[:3])} more invalid field(s)"
    if len(violations) > MAX_VIOLATIONS:
        details.append(
            _error_info(
                "TOO_MANY_VIOLATIONS",
                violations=str(len(violations)),
                violations_listed=str(MAX_VIOLATIONS),
            )
        )
    return _status(code_pb2.INVALID_ARGUMENT, message, *details)


def _error_info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)


def _status(code: int, message: str, *details: Message) -> grpc.Status:
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    message = shorten(message, MAX_MESSAGE_BYTES)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))
