"""The one place that maps request errors to gRPC statuses with google.rpc details."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..spec.errors import InvalidRequest, ModelNotFound, Overloaded, RequestError, Unsupported


def to_status(exc: RequestError) -> grpc.Status:
    """A grpc.Status (code, message, google.rpc.Status details) for a refused request."""
    detail = any_pb2.Any()
    if isinstance(exc, InvalidRequest):
        code = code_pb2.INVALID_ARGUMENT
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in exc.violations
                ]
            )
        )
    elif isinstance(exc, ModelNotFound):
        code = code_pb2.NOT_FOUND
        detail.Pack(
            error_details_pb2.ResourceInfo(
                resource_type="model", resource_name=exc.name, description=str(exc)
            )
        )
    elif isinstance(exc, Unsupported):
        code = code_pb2.FAILED_PRECONDITION
        detail.Pack(error_details_pb2.ErrorInfo(reason="UNSUPPORTED", domain="attnserve"))
    elif isinstance(exc, Overloaded):
        code = code_pb2.RESOURCE_EXHAUSTED
        detail.Pack(error_details_pb2.RetryInfo(retry_delay={"seconds": 1}))
    else:
        code = code_pb2.INVALID_ARGUMENT
        detail.Pack(error_details_pb2.ErrorInfo(reason="INVALID_REQUEST", domain="attnserve"))
    return rpc_status.to_status(status_pb2.Status(code=code, message=str(exc), details=[detail]))
