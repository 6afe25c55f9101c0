"""Typed exceptions for gRPC status codes, so callers can `except ResourceExhaustedError`."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2


class InterpgwError(Exception):
    """Base class; `code` is the grpc.StatusCode, `details` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgumentError(InterpgwError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(InterpgwError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhaustedError(InterpgwError):
    """A limit was hit. `retry_after` (seconds, or None) is the server's `google.rpc.RetryInfo`: when trying
    again can succeed (rate limits, a full admission queue); None when waiting will not help."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after: float | None = None


class UnavailableError(InterpgwError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(InterpgwError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(InterpgwError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(InterpgwError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPreconditionError(InterpgwError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class CancelledError(InterpgwError):
    code = grpc.StatusCode.CANCELLED


class InternalError(InterpgwError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        UnauthenticatedError,
        PermissionDeniedError,
        FailedPreconditionError,
        CancelledError,
        InternalError,
    )
}


def retry_delay(error: grpc.RpcError) -> float | None:
    """Seconds from a `google.rpc.RetryInfo` detail in the call's trailing metadata, if the server sent one."""
    try:
        trailers = error.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - not every RpcError carries trailers
        return None
    for key, value in trailers:
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                return info.retry_delay.ToNanoseconds() / 1e9
    return None


# gRPC core answers CANCELLED, with exactly these details, to a call that reached a server as it began to shut
# down, before any handler took it (grpc/grpc#41785): nothing ran and the server is going away, which is what
# UNAVAILABLE means. The client's own cancels say "Locally cancelled by application!" (or "Channel closed!"), and a
# handler cut at the end of the server's grace period is already UNAVAILABLE ("Cancelling all calls").
SHUTDOWN_CANCELLED_DETAILS = "CANCELLED"


def from_rpc_error(error: grpc.RpcError) -> InterpgwError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    if code == grpc.StatusCode.CANCELLED and details == SHUTDOWN_CANCELLED_DETAILS:
        return UnavailableError(
            "the server shut down as the call arrived; it did not run (gRPC reports this as CANCELLED, "
            "grpc/grpc#41785): retry, on another replica or after the restart"
        )
    cls = _BY_CODE.get(code, InterpgwError)
    exc = cls(details or code.name, code) if cls is InterpgwError else cls(details or code.name)
    if isinstance(exc, ResourceExhaustedError):
        exc.retry_after = retry_delay(error)
    return exc
