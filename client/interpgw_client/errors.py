"""Typed exceptions for gRPC status codes, so callers can `except ResourceExhaustedError`."""

from __future__ import annotations

import grpc


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
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(InterpgwError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(InterpgwError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(InterpgwError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(InterpgwError):
    code = grpc.StatusCode.PERMISSION_DENIED


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
        CancelledError,
        InternalError,
    )
}


def from_rpc_error(error: grpc.RpcError) -> InterpgwError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    cls = _BY_CODE.get(code, InterpgwError)
    return cls(details or code.name, code) if cls is InterpgwError else cls(details or code.name)
