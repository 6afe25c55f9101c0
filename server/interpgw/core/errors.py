"""Typed errors of the core. The transport maps each to one gRPC status code, in one place."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error a client may see; `code` names the gRPC status it maps to."""

    code = "INTERNAL"


class InvalidArgument(GatewayError):
    code = "INVALID_ARGUMENT"


class NotFound(GatewayError):
    code = "NOT_FOUND"


class ResourceExhausted(GatewayError):
    """A limit was hit; `retry_after_s` (when set) tells the client when trying again can succeed."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(GatewayError):
    code = "UNAVAILABLE"


class Unauthenticated(GatewayError):
    code = "UNAUTHENTICATED"


class PermissionDenied(GatewayError):
    code = "PERMISSION_DENIED"


class FailedPrecondition(GatewayError):
    code = "FAILED_PRECONDITION"


class Internal(GatewayError):
    code = "INTERNAL"
