"""AttnserveError from a google.rpc.Status and from an RpcError's trailing metadata."""

import grpc
from attnserve_client.errors import AttnserveError, FieldViolation
from fake_inference_service import bad_request_status
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status


class _FailedCall(grpc.RpcError):
    """What a failed sync call raises (and, in form, a grpc.aio.AioRpcError)."""

    def __init__(self, code, details, trailing_metadata=None):
        self._code, self._details, self._metadata = code, details, trailing_metadata

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._metadata


def test_from_status():
    status = bad_request_status(
        "interventions.interventions[0].selector.layers[0]", "layer 99 is out of range"
    )
    error = AttnserveError.from_status(status)

    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "invalid request"
    assert error.field_violations == (
        FieldViolation("interventions.interventions[0].selector.layers[0]", "layer 99 is out of range"),
    )
    assert str(error) == (
        "INVALID_ARGUMENT: invalid request\n"
        "  interventions.interventions[0].selector.layers[0]: layer 99 is out of range"
    )


def test_from_rpc_error_with_rich_status():
    status = bad_request_status("sampling.top_p", "must be in (0, 1]")
    grpc_status = rpc_status.to_status(status)
    call = _FailedCall(grpc_status.code, grpc_status.details, grpc_status.trailing_metadata)

    error = AttnserveError.from_rpc_error(call)
    assert error.status == status
    assert "sampling.top_p: must be in (0, 1]" in str(error)


def test_from_rpc_error_without_details():
    error = AttnserveError.from_rpc_error(_FailedCall(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert error.field_violations == ()
    assert str(error) == "UNAVAILABLE: connection refused"


def test_from_rpc_error_with_contradicting_status_trusts_the_call():
    status = status_pb2.Status(code=code_pb2.NOT_FOUND, message="other")
    metadata = (("grpc-status-details-bin", status.SerializeToString()),)
    error = AttnserveError.from_rpc_error(_FailedCall(grpc.StatusCode.INTERNAL, "boom", metadata))
    assert (error.code, error.message) == (grpc.StatusCode.INTERNAL, "boom")


def test_violations_repeated_in_the_message_are_listed_once():
    status = bad_request_status("sampling.top_p", "must be in (0, 1]")
    status.message = "sampling.top_p: must be in (0, 1]"
    assert str(AttnserveError.from_status(status)) == "INVALID_ARGUMENT\n  sampling.top_p: must be in (0, 1]"
