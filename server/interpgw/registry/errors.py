"""Typed errors of the steering-vector registry.

Each also derives from the matching core `GatewayError`, so the transport's single error mapping turns them into
the right gRPC status without knowing about the registry.
"""

from __future__ import annotations

from interpgw.core.errors import Internal, ResourceExhausted, Unavailable


class CorruptRecord(Internal, ValueError):
    """Stored record bytes failed to parse or their integrity check (truncated, bit-flipped, foreign data)."""


class RegistryFull(ResourceExhausted):
    """The store holds its maximum number of records; delete some before adding more."""


class RegistryUnavailable(Unavailable):
    """The backing store (Redis) cannot be reached or refused the command."""
