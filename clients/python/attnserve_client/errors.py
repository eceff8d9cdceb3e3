"""AttnserveError: a failed RPC with its status code, message and field violations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field (a proto field path such as `sampling.top_p`) and why."""

    field: str
    description: str


class AttnserveError(Exception):
    """An RPC to attnserve failed.

    `code` is the gRPC status code, `message` the server's message, `field_violations` the
    google.rpc.BadRequest violations of an INVALID_ARGUMENT and `status` the full
    google.rpc.Status when the server sent one.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        field_violations: Sequence[FieldViolation] = (),
        status: status_pb2.Status | None = None,
    ):
        self.code = code
        self.message = message
        self.field_violations = tuple(field_violations)
        self.status = status
        super().__init__(code, message)

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> AttnserveError:
        code = _CODES_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
        return cls(code, status.message, _field_violations(status), status)

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> AttnserveError:
        """Convert the error of a sync call or a grpc.aio.AioRpcError.

        Both expose code(), details() and trailing_metadata(), which is all that
        rpc_status.from_call reads.
        """
        try:
            status = rpc_status.from_call(error)
        except ValueError:  # the rich status contradicts the call's status; trust the call
            status = None
        if status is not None:
            return cls.from_status(status)
        return cls(error.code(), error.details() or "")

    def __str__(self) -> str:
        violations = [f"{v.field}: {v.description}" for v in self.field_violations]
        # Servers often put the violations in the message too; list them once, one per line.
        repeats_violations = violations and all(v in self.message for v in violations)
        header = (
            self.code.name if not self.message or repeats_violations else f"{self.code.name}: {self.message}"
        )
        return "\n".join([header] + [f"  {v}" for v in violations])


def _field_violations(status: status_pb2.Status) -> list[FieldViolation]:
    violations = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
    return violations
