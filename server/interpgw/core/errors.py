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
    code = "RESOURCE_EXHAUSTED"


class Unavailable(GatewayError):
    code = "UNAVAILABLE"


class Internal(GatewayError):
    code = "INTERNAL"
